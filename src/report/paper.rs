//! The paper's published tables (`baselines/*.csv`), matched to our rows by target and data
//! label and to our benchmarks by column, so a report can put "paper" beside "reproduced".

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Our benchmark -> the paper's column where the names differ (Tables 1, 8 and 9 report CoT
/// and PoT); a table without the column is tried under our own name (Table 2's `math`).
const COLUMNS: &[(&str, &str)] = &[
    ("math", "math_cot"),
    ("math500", "math_cot"),
    ("gsmplus", "gsmplus_cot"),
    ("theoremqa", "theoremqa_cot"),
    ("math-pot", "math_pot"),
    ("gsmplus-pot", "gsmplus_pot"),
    ("theoremqa-pot", "theoremqa_pot"),
];

/// Columns of a paper table that are not benchmarks.
const NOT_BENCHMARKS: [&str; 5] = ["model", "data", "instances", "avg", "abs_delta_to_grape"];

/// A table's rows as `model, data, <columns>`, whatever layout its CSV has; `*` as the model
/// matches every target (Table 8 is of one model, which it does not name).
pub struct PaperTable {
    pub name: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// Where the paper's tables live: `HARNESS_BASELINES_DIR`, else this repository's `baselines/`.
pub fn baselines_dir() -> PathBuf {
    std::env::var_os("HARNESS_BASELINES_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("baselines"), PathBuf::from)
}

impl PaperTable {
    /// `table1` reads `baselines/table1-*.csv`.
    pub fn load(name: &str, dir: &Path) -> Result<Self> {
        let prefix = format!("{name}-");
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".csv")))
            .collect();
        found.sort();
        let path = found.first().ok_or_else(|| {
            Error::Invalid(format!("no paper table `{name}` in {} (files are named {name}-*.csv)", dir.display()))
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<String> = lines.next().unwrap_or_default().split(',').map(str::to_string).collect();
        let rows: Vec<Vec<String>> = lines.map(|l| l.split(',').map(str::to_string).collect()).collect();
        if let Some((i, _)) = rows.iter().enumerate().find(|(_, r)| r.len() != header.len()) {
            return Err(Error::format(path, format!("line {}: {} fields, the header has {}", i + 2, rows[i].len(), header.len())));
        }
        let (header, rows) = canonical(header, rows).map_err(|what| Error::format(path, what))?;
        Ok(PaperTable { name: name.to_string(), header, rows })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// The row for our `target` and data `label` (the paper's `model` and `data` columns).
    pub fn row(&self, target: &str, label: &str) -> Option<usize> {
        let (m, d) = (self.column("model")?, self.column("data")?);
        self.rows.iter().position(|r| (r[m] == target || r[m] == "*") && r[d] == label)
    }

    /// The paper's column for our benchmark.
    fn column_of(&self, benchmark: &str) -> Option<usize> {
        let mapped = COLUMNS.iter().find(|(ours, _)| *ours == benchmark).map_or(benchmark, |(_, theirs)| theirs);
        self.column(mapped).or_else(|| self.column(benchmark))
    }

    /// The paper's number for our benchmark in a row; markers such as `31.5**` are dropped.
    pub fn value(&self, row: usize, benchmark: &str) -> Option<f64> {
        self.rows[row][self.column_of(benchmark)?].trim_end_matches('*').parse().ok()
    }

    /// The benchmark columns of the paper's average that `benchmarks` leave out.
    pub fn missing(&self, benchmarks: &[String]) -> Vec<String> {
        let ours: Vec<usize> = benchmarks.iter().filter_map(|b| self.column_of(b)).collect();
        self.header
            .iter()
            .enumerate()
            .filter(|(i, h)| !NOT_BENCHMARKS.contains(&h.as_str()) && !ours.contains(i))
            .map(|(_, h)| h.clone())
            .collect()
    }

    /// The paper's average for a row, when `benchmarks` are exactly the columns it averages
    /// (its printed `avg` where it has one); `None` when they are not, so no average of other
    /// columns is ever set beside ours.
    pub fn average(&self, row: usize, benchmarks: &[String]) -> Option<f64> {
        let columns: Vec<usize> = benchmarks.iter().map(|b| self.column_of(b)).collect::<Option<_>>()?;
        if columns.is_empty() || !self.missing(benchmarks).is_empty() {
            return None;
        }
        if let Some(printed) = self.column("avg").and_then(|c| self.rows[row][c].parse().ok()) {
            return Some(printed);
        }
        let values: Option<Vec<f64>> = benchmarks.iter().map(|b| self.value(row, b)).collect();
        values.map(|v| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// The CSV layouts of `baselines/` brought to `model, data, <columns>`.
fn canonical(header: Vec<String>, rows: Vec<Vec<String>>) -> std::result::Result<(Vec<String>, Vec<Vec<String>>), String> {
    let has = |name: &str| header.iter().any(|h| h == name);
    let at = |name: &str| header.iter().position(|h| h == name);
    if (has("model") || has("target")) && has("data") {
        // Tables 1, 2, 4 and 9.
        let header = header.into_iter().map(|h| if h == "target" { "model".to_string() } else { h }).collect();
        return Ok((header, rows));
    }
    if header.len() > 3 && header[..3] == ["benchmark", "metric", "data"] {
        // Table 3: one row per benchmark, metric and data; one column per model.
        let mut columns: Vec<String> = Vec::new();
        for r in &rows {
            let name = format!("{}_{}", r[0], r[1]).to_lowercase();
            if !columns.contains(&name) {
                columns.push(name);
            }
        }
        let mut out: Vec<Vec<String>> = Vec::new();
        for (m, model) in header.iter().enumerate().skip(3) {
            for r in &rows {
                let column = columns.iter().position(|c| *c == format!("{}_{}", r[0], r[1]).to_lowercase()).expect("listed above");
                let found = out.iter().position(|o| o[0] == *model && o[1] == r[2]);
                let i = found.unwrap_or_else(|| {
                    out.push([vec![model.clone(), r[2].clone()], vec![String::new(); columns.len()]].concat());
                    out.len() - 1
                });
                out[i][2 + column] = r[m].clone();
            }
        }
        return Ok(([vec!["model".to_string(), "data".to_string()], columns].concat(), out));
    }
    if header.first().is_some_and(|h| h == "benchmark") {
        // Table 8: one row per benchmark, one column per data; of one (unnamed) model.
        let columns: Vec<String> = rows.iter().map(|r| r[0].clone()).collect();
        let out = header[1..]
            .iter()
            .enumerate()
            .map(|(d, data)| [vec!["*".to_string(), data.clone()], rows.iter().map(|r| r[d + 1].clone()).collect()].concat())
            .collect();
        return Ok(([vec!["model".to_string(), "data".to_string()], columns].concat(), out));
    }
    if let (Some(dataset), Some(model), Some(generator), Some(accuracy)) =
        (at("dataset"), at("model"), at("response_generator"), at("accuracy"))
    {
        // Table 6: a fine-tuned model's solutions (FT-*) are named after the generator of the
        // data it was fine-tuned on, the row above.
        let mut out = Vec::new();
        let mut teacher = String::new();
        let mut columns: Vec<String> = Vec::new();
        for r in &rows {
            let column = r[dataset].to_lowercase();
            if !columns.contains(&column) {
                columns.push(column.clone());
            }
            let data = match r[generator].strip_prefix("FT-") {
                Some(_) => format!("{} (from {teacher})", r[generator]),
                None => {
                    teacher = r[generator].clone();
                    teacher.clone()
                }
            };
            let mut row = vec![r[model].clone(), data];
            row.extend(columns.iter().map(|c| if *c == column { r[accuracy].clone() } else { String::new() }));
            out.push(row);
        }
        return Ok(([vec!["model".to_string(), "data".to_string()], columns].concat(), out));
    }
    Err(format!("an unknown layout (header {})", header.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table1_rows_and_columns_match_ours() {
        let table = PaperTable::load("table1", &baselines_dir()).unwrap();
        let grape = table.row("Llama3.1-8B", "GRAPE").unwrap();
        assert_eq!(table.value(grape, "humaneval"), Some(57.3));
        assert_eq!(table.value(grape, "math500"), Some(34.8));
        assert_eq!(table.value(grape, "gsmplus"), Some(56.6));
        // The paper averages nine columns: four of them give no paper average, and say which
        // are missing.
        let four = ["humaneval", "mbpp", "math", "gsmplus"].map(String::from);
        assert_eq!(table.average(grape, &four), None);
        assert_eq!(table.missing(&four), ["leetcode", "math_pot", "gsmplus_pot", "theoremqa_cot", "theoremqa_pot"]);
        let nine = ["humaneval", "leetcode", "mbpp", "math", "math-pot", "gsmplus", "gsmplus-pot", "theoremqa", "theoremqa-pot"]
            .map(String::from);
        assert!(table.missing(&nine).is_empty());
        assert_eq!(table.average(grape, &nine), Some(41.5));
        assert_eq!(table.value(grape, "theoremqa-pot"), Some(23.9));
        assert!(table.row("Llama3.1-8B", "S2L").is_none());
        let t2 = PaperTable::load("table2", &baselines_dir()).unwrap();
        let lowest = t2.row("Llama3.1-8B", "Highest*").unwrap();
        assert_eq!(t2.value(lowest, "math"), Some(22.9));
        let tulu = t2.row("Llama3.1-8B", "Tulu3-SFT").unwrap();
        assert_eq!(t2.value(tulu, "math"), Some(31.5), "the 4-shot marker is dropped");
        assert!(PaperTable::load("table99", &baselines_dir()).is_err());
    }

    #[test]
    fn every_layout_of_the_baselines_reads_as_model_data_columns() {
        let dir = baselines_dir();
        let t3 = PaperTable::load("table3", &dir).unwrap();
        let grape = t3.row("mistral-7b-v0.3", "GRAPE").unwrap();
        assert_eq!(t3.value(grape, "alpacaeval2_lc"), Some(8.2));
        assert_eq!(t3.value(grape, "truthfulqa_mc2"), Some(51.6));
        let t4 = PaperTable::load("table4", &dir).unwrap();
        assert_eq!(t4.value(t4.row("Mistral-7B-v0.3", "Llama3.1-405B").unwrap(), "alpacaeval2_wr"), Some(17.0));
        let t6 = PaperTable::load("table6", &dir).unwrap();
        assert_eq!(t6.value(t6.row("Mistral", "FT-Mistral (from MM-AnsAug)").unwrap(), "math"), Some(20.6));
        assert_eq!(t6.value(t6.row("Mistral", "FT-Mistral (from Llama3.1-70B)").unwrap(), "math"), Some(15.9));
        let t8 = PaperTable::load("table8", &dir).unwrap();
        let closest = t8.row("Mistral-7B", "Closest-1").unwrap();
        assert_eq!(t8.value(closest, "theoremqa-pot"), Some(12.9));
        let nine = ["humaneval", "leetcode", "mbpp", "math", "math-pot", "gsmplus", "gsmplus-pot", "theoremqa", "theoremqa-pot"]
            .map(String::from);
        assert_eq!(t8.average(closest, &nine), Some(29.8));
        let t9 = PaperTable::load("table9", &dir).unwrap();
        assert_eq!(t9.value(t9.row("Llama3.2-3B", "Self-Distilled").unwrap(), "leetcode"), Some(5.6));
    }
}
