//! Result tables as the paper prints them (rows: each target's base model and one row per
//! selector; columns: the benchmarks, their average and "Abs. Δ" to GRAPE), for the terminal
//! (comfy-table), Markdown, CSV and JSON; the paper's own numbers beside ours when asked; the
//! training-loss figure, the weight-drift table and the selection-cost table.

pub mod paper;
pub mod plot;

use crate::experiment::{ResultRow, Results};
use crate::{Error, Result};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A table as plain strings, rendered several ways.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn terminal(&self) -> comfy_table::Table {
        let mut table = comfy_table::Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header(&self.header);
        for row in &self.rows {
            table.add_row(row);
        }
        table
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n| {} |\n|{}\n", self.title, self.header.join(" | "), "---|".repeat(self.header.len()));
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }

    pub fn csv(&self) -> String {
        let quote = |s: &String| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.clone()
            }
        };
        std::iter::once(&self.header)
            .chain(&self.rows)
            .map(|r| r.iter().map(quote).collect::<Vec<_>>().join(",") + "\n")
            .collect()
    }
}

fn number(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v:.1}"))
}

/// The mean over `benchmarks`, when the row has all of them.
fn average(row: &ResultRow, benchmarks: &[String]) -> Option<f64> {
    let values: Option<Vec<f64>> = benchmarks.iter().map(|b| row.metrics.get(b).map(|c| c.value)).collect();
    values.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// The paper's Tables 1 and 2: per row the benchmarks, their average and GRAPE's average
/// minus the row's (the paper's "Abs. Δ"), within the same target and run. `with_ci` adds the
/// 95% intervals; `paper` adds its numbers for the rows it has.
pub fn results_table(results: &Results, with_ci: bool, paper: Option<&paper::PaperTable>) -> Table {
    let benchmarks = &results.benchmarks;
    let swept = results.rows.iter().any(|r| !r.variant.is_empty());
    let mut header = vec!["target".to_string()];
    if swept {
        header.push("run".into());
    }
    header.extend(["data".to_string(), "examples".to_string()]);
    for b in benchmarks {
        header.push(b.clone());
        if paper.is_some() {
            header.push(format!("{b} (paper)"));
        }
    }
    header.extend(["Avg.".to_string(), "Abs. Δ".to_string()]);
    if paper.is_some() {
        header.push("Avg. (paper)".into());
    }
    let mut rows = Vec::new();
    for row in &results.rows {
        let grape = results
            .rows
            .iter()
            .find(|r| r.target == row.target && r.variant == row.variant && r.selector.as_deref() == Some("grape"))
            .and_then(|r| average(r, benchmarks));
        let paper_row = paper.and_then(|p| p.row(&row.target, &row.label));
        let mut cells = vec![row.target.clone()];
        if swept {
            cells.push(row.variant.clone());
        }
        cells.push(row.label.clone());
        cells.push(row.examples.map_or("-".into(), |n| n.to_string()));
        for b in benchmarks {
            cells.push(match row.metrics.get(b) {
                Some(c) if with_ci => format!("{:.1} ({:.1}-{:.1})", c.value, c.ci95.0, c.ci95.1),
                Some(c) => format!("{:.1}", c.value),
                None => "-".into(),
            });
            if let Some(p) = paper {
                cells.push(number(paper_row.and_then(|r| p.value(r, b))));
            }
        }
        let avg = average(row, benchmarks);
        cells.push(number(avg));
        let is_grape = row.selector.as_deref() == Some("grape");
        cells.push(if is_grape { String::new() } else { number(grape.zip(avg).map(|(g, a)| g - a)) });
        if let Some(p) = paper {
            cells.push(number(paper_row.and_then(|r| p.average(r, benchmarks))));
        }
        rows.push(cells);
    }
    let mut title = format!("{}: results (%)", results.experiment);
    if let Some(p) = paper {
        let missing = p.missing(benchmarks);
        if !missing.is_empty() {
            title += &format!(
                "; {} averages columns this run lacks ({}), so no paper average is shown",
                p.name,
                missing.join(", ")
            );
        }
    }
    Table { title, header, rows }
}

/// The paper's Appendix A (Table 7): how far fine-tuning moved the weights, per selection.
pub fn weight_drift_table(results: &Results) -> Table {
    let rows = results
        .rows
        .iter()
        .filter_map(|r| {
            let t = r.train.as_ref()?;
            Some(vec![
                r.target.clone(),
                r.label.clone(),
                format!("{:.4}", t.weight_l2_distance),
                t.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
                t.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
                t.steps.to_string(),
                format!("{:.0}", t.tokens_per_second),
            ])
        })
        .collect();
    let header = ["target", "data", "L2 distance from base", "first loss", "final loss", "steps", "tokens/s"];
    Table { title: "weight drift and training".into(), header: header.map(String::from).to_vec(), rows }
}

/// The paper's Table 10, measured: what each selection's inputs cost to compute.
pub fn cost_table(results: &Results) -> Table {
    let rows = results
        .rows
        .iter()
        .filter_map(|r| {
            let c = r.selection_cost.as_ref()?;
            Some(vec![
                r.target.clone(),
                r.label.clone(),
                c.forward_tokens.to_string(),
                c.train_tokens.to_string(),
                format!("{:.1}", c.seconds),
            ])
        })
        .collect();
    let header = ["target", "data", "forward tokens", "training tokens", "seconds"];
    Table { title: "selection cost".into(), header: header.map(String::from).to_vec(), rows }
}

/// Training-loss curves of every selection of one target in one SVG (the paper's Figure 2).
pub fn loss_figure(results: &Results, target: &str) -> Result<Option<String>> {
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for row in results.rows.iter().filter(|r| r.target == target) {
        let Some(path) = &row.train_log else { continue };
        let Ok(text) = std::fs::read_to_string(path) else { continue };
        let points: Vec<(f64, f64)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<crate::train::StepLog>(l).ok())
            .map(|l| (l.step as f64, l.loss))
            .collect();
        let name = if row.variant.is_empty() { row.label.clone() } else { format!("{} {}", row.label, row.variant) };
        curves.push((name, points));
    }
    if curves.is_empty() {
        return Ok(None);
    }
    let series: Vec<plot::Series> = curves.iter().map(|(n, p)| plot::Series { name: n, points: p }).collect();
    Ok(Some(plot::line_chart(&format!("{target}: training loss"), "step", "loss", &series)))
}

/// Writes `results.{md,csv,json}`, one loss figure per target and the side tables into `dir`;
/// returns the files written.
pub fn write(results: &Results, dir: &Path, paper: Option<&paper::PaperTable>) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let main = results_table(results, false, paper);
    let with_ci = results_table(results, true, None);
    let mut markdown = main.markdown();
    for table in [weight_drift_table(results), cost_table(results)] {
        if !table.rows.is_empty() {
            markdown.push('\n');
            markdown.push_str(&table.markdown());
        }
    }
    markdown.push_str("\n");
    markdown.push_str(&Table { title: "with 95% bootstrap intervals".into(), ..with_ci }.markdown());
    let mut targets: Vec<&str> = results.rows.iter().map(|r| r.target.as_str()).collect();
    targets.dedup();
    let mut files = Vec::new();
    for target in targets {
        if let Some(svg) = loss_figure(results, target)? {
            let name = format!("losses-{}.svg", target.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-', "_"));
            let _ = writeln!(markdown, "\n![{target}: training loss]({name})");
            files.push((dir.join(name), svg));
        }
    }
    let json = serde_json::to_string_pretty(results).expect("plain data serialises");
    files.extend([
        (dir.join("results.md"), markdown),
        (dir.join("results.csv"), main.csv()),
        (dir.join("results.json"), json),
    ]);
    for (path, text) in &files {
        std::fs::write(path, text).map_err(|e| Error::io(path, e))?;
    }
    Ok(files.into_iter().map(|(p, _)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{Cell, ResultRow};

    fn row(label: &str, selector: Option<&str>, values: &[(&str, f64)]) -> ResultRow {
        ResultRow {
            variant: String::new(),
            target: "Llama3.1-8B".into(),
            label: label.into(),
            selector: selector.map(str::to_string),
            metrics: values.iter().map(|&(b, v)| (b.to_string(), Cell { value: v, ci95: (v - 1.0, v + 1.0), n: 10 })).collect(),
            examples: Some(4),
            train: None,
            train_log: None,
            selection_cost: None,
        }
    }

    #[test]
    fn average_and_abs_delta_to_grape_with_the_papers_numbers() {
        let results = Results {
            experiment: "t".into(),
            paper: Some("table1".into()),
            benchmarks: vec!["humaneval".into(), "gsmplus".into()],
            rows: vec![
                row("Original-UI", Some("strongest"), &[("humaneval", 50.0), ("gsmplus", 40.0)]),
                row("GRAPE", Some("grape"), &[("humaneval", 60.0), ("gsmplus", 50.0)]),
                row("Half", Some("random"), &[("humaneval", 10.0)]),
            ],
        };
        let paper = paper::PaperTable::load("table1", &paper::baselines_dir()).unwrap();
        let table = results_table(&results, false, Some(&paper));
        let column = |name: &str| table.header.iter().position(|h| h == name).unwrap();
        let (avg, delta) = (column("Avg."), column("Abs. Δ"));
        assert_eq!(table.rows[0][avg], "45.0");
        assert_eq!(table.rows[0][delta], "10.0", "GRAPE's average minus the row's");
        assert_eq!(table.rows[1][delta], "");
        assert_eq!(table.rows[2][avg], "-", "a row missing a benchmark has no average");
        assert_eq!(table.rows[0][column("humaneval (paper)")], "54.3");
        // Two of the paper's nine columns: no paper average, and the title says why.
        assert_eq!(table.rows[1][column("Avg. (paper)")], "-");
        assert!(table.title.contains("lacks (leetcode, mbpp, math_cot, math_pot,"), "{}", table.title);
        assert_eq!(table.rows[2][column("humaneval (paper)")], "-");
        let markdown = table.markdown();
        assert!(markdown.lines().nth(3).unwrap().ends_with("---|") && !markdown.contains("||"), "{markdown}");
        let csv = table.csv();
        assert_eq!(csv.lines().count(), 4);
        let with_ci = results_table(&results, true, None);
        assert_eq!(with_ci.rows[1][3], "60.0 (59.0-61.0)");
    }
}
