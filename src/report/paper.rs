//! The paper's published tables (`baselines/*.csv`), matched to our rows by target and data
//! label and to our benchmarks by column, so a report can put "paper" beside "reproduced".

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Our benchmark -> the paper's column where the names differ (Table 1 reports CoT and PoT;
/// ours are CoT); a table without the column is tried under our own name (Table 2's `math`).
const COLUMNS: &[(&str, &str)] = &[
    ("humaneval", "humaneval"),
    ("mbpp", "mbpp"),
    ("math", "math_cot"),
    ("math500", "math_cot"),
    ("gsmplus", "gsmplus_cot"),
    ("leetcode", "leetcode"),
    ("theoremqa", "theoremqa_cot"),
];

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
        Ok(PaperTable { name: name.to_string(), header, rows })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    /// The row for our `target` and data `label` (the paper's `model` and `data` columns).
    pub fn row(&self, target: &str, label: &str) -> Option<usize> {
        let (m, d) = (self.column("model")?, self.column("data")?);
        self.rows.iter().position(|r| r[m] == target && r[d] == label)
    }

    /// The paper's number for our benchmark in a row; markers such as `31.5**` are dropped.
    pub fn value(&self, row: usize, benchmark: &str) -> Option<f64> {
        let mapped = COLUMNS.iter().find(|(ours, _)| *ours == benchmark).map_or(benchmark, |(_, theirs)| theirs);
        let cell = &self.rows[row][self.column(mapped).or_else(|| self.column(benchmark))?];
        cell.trim_end_matches('*').parse().ok()
    }

    /// The paper's average over the columns matching `benchmarks`, when it has them all.
    pub fn average(&self, row: usize, benchmarks: &[String]) -> Option<f64> {
        let values: Option<Vec<f64>> = benchmarks.iter().map(|b| self.value(row, b)).collect();
        values.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64)
    }
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
        let four = ["humaneval", "mbpp", "math", "gsmplus"].map(String::from);
        let avg = table.average(grape, &four).unwrap();
        assert!((avg - (57.3 + 63.8 + 34.8 + 56.6) / 4.0).abs() < 1e-9);
        assert!(table.row("Llama3.1-8B", "S2L").is_none());
        let t2 = PaperTable::load("table2", &baselines_dir()).unwrap();
        let lowest = t2.row("Llama3.1-8B", "Highest*").unwrap();
        assert_eq!(t2.value(lowest, "math"), Some(22.9));
        let tulu = t2.row("Llama3.1-8B", "Tulu3-SFT").unwrap();
        assert_eq!(t2.value(tulu, "math"), Some(31.5), "the 4-shot marker is dropped");
        assert!(PaperTable::load("table99", &baselines_dir()).is_err());
    }
}
