//! The score store: a Parquet table of scores keyed by (model fingerprint, maximum length,
//! pair hash), reused by every selector, experiment and run that scores the same pairs.
//!
//! Scores are saved as they are computed, one small Parquet part per batch under
//! `<path>.parts/`, so a killed run loses at most the batch in flight and the next run
//! scores only what is missing; [`ScoreStore::compact`] folds the parts into `<path>`. A
//! store belongs to one model fingerprint: opening it for another model is refused rather
//! than silently mixing scores of two models.

use super::Score;
use crate::{Error, Result};
use polars::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const COLUMNS: [&str; 8] =
    ["fingerprint", "max_len", "pair", "sum_logprob", "n_tokens", "n_bytes", "truncated", "token_logprobs"];

/// The key of one scored pair within a fingerprint.
pub type PairKey = (usize, String);

pub struct ScoreStore {
    path: PathBuf,
    fingerprint: String,
    rows: HashMap<PairKey, Score>,
    /// Whether parts exist that `compact` has not folded in yet.
    dirty: bool,
    next_part: u64,
}

/// Hash of one prompt/response pair; lengths are included so that no two different pairs
/// concatenate to the same text.
pub fn pair_hash(prompt: &str, response: &str) -> String {
    let text = format!("{}:{prompt}{}:{response}", prompt.len(), response.len());
    crate::util::sha256_bytes(text.as_bytes())[..32].to_string()
}

impl ScoreStore {
    /// Reads `path` (if present) and any parts an earlier run left behind; an empty
    /// `fingerprint` adopts the file's.
    pub fn open(path: &Path, fingerprint: &str) -> Result<Self> {
        let mut store = Self {
            path: path.to_path_buf(),
            fingerprint: fingerprint.to_string(),
            rows: HashMap::new(),
            dirty: false,
            next_part: 0,
        };
        if path.exists() {
            store.read(path)?;
        }
        for (number, part) in store.parts()? {
            store.read(&part)?;
            store.next_part = store.next_part.max(number + 1);
            store.dirty = true;
        }
        Ok(store)
    }

    /// Opens an existing store for reading whatever model it belongs to (for analytics).
    pub fn open_existing(path: &Path) -> Result<Self> {
        if !path.exists() && !parts_dir(path).is_dir() {
            return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        Self::open(path, "")
    }

    /// Where a model's scores go when no file is named: one store per fingerprint in the
    /// cache, shared by every run with that model.
    pub fn default_path(fingerprint: &str) -> PathBuf {
        crate::model::pull::cache_dir().join("scores").join(format!("{}.parquet", &fingerprint[..16.min(fingerprint.len())]))
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Every stored score with its (maximum length, pair hash) key.
    pub fn entries(&self) -> impl Iterator<Item = (&PairKey, &Score)> {
        self.rows.iter()
    }

    /// The maximum lengths the stored scores were made with.
    pub fn max_lens(&self) -> std::collections::BTreeSet<usize> {
        self.rows.keys().map(|(max_len, _)| *max_len).collect()
    }

    pub fn get(&self, max_len: usize, pair: &str) -> Option<&Score> {
        self.rows.get(&(max_len, pair.to_string()))
    }

    /// Saves one batch of scores as a new part file (atomically: written aside, then renamed).
    pub fn append(&mut self, max_len: usize, scored: Vec<(String, Score)>) -> Result<()> {
        if scored.is_empty() {
            return Ok(());
        }
        let dir = parts_dir(&self.path);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let part = dir.join(format!("{:08}.parquet", self.next_part));
        let rows: Vec<(PairKey, Score)> = scored.into_iter().map(|(pair, s)| ((max_len, pair), s)).collect();
        self.write(&part, rows.iter().map(|(k, s)| (k, s)))?;
        self.next_part += 1;
        self.dirty = true;
        self.rows.extend(rows);
        Ok(())
    }

    /// Folds every part into the main file and removes the parts. A crash in between
    /// leaves both, which the next `open` reads without harm (same keys, same values).
    pub fn compact(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut keys: Vec<&PairKey> = self.rows.keys().collect();
        keys.sort();
        self.write(&self.path, keys.into_iter().map(|k| (k, &self.rows[k])))?;
        for (_, part) in self.parts()? {
            std::fs::remove_file(&part).map_err(|e| Error::io(&part, e))?;
        }
        let dir = parts_dir(&self.path);
        // Best effort: only an empty folder goes, and a leftover one is harmless.
        let _ = std::fs::remove_dir(&dir);
        self.dirty = false;
        Ok(())
    }

    fn parts(&self) -> Result<Vec<(u64, PathBuf)>> {
        let dir = parts_dir(&self.path);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut parts = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            let number = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".parquet"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(number) = number {
                parts.push((number, path));
            }
        }
        parts.sort();
        Ok(parts)
    }

    fn read(&mut self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::format(path, format!("not a score store: {what}"));
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let df = ParquetReader::new(file).finish().map_err(|e| bad(e.to_string()))?;
        let column = |name: &str| df.column(name).map_err(|_| bad(format!("column `{name}` is missing")));
        let typed = |name: &str, e: PolarsError| bad(format!("column `{name}`: {e}"));
        let fingerprints = column(COLUMNS[0])?.str().map_err(|e| typed(COLUMNS[0], e))?;
        if self.fingerprint.is_empty() {
            self.fingerprint = fingerprints.get(0).unwrap_or_default().to_string();
        }
        if let Some(other) = (0..fingerprints.len()).filter_map(|i| fingerprints.get(i)).find(|f| *f != self.fingerprint) {
            return Err(Error::mismatch(
                path,
                format!(
                    "scores were made with model fingerprint {}…, not this model's {}…; \
                     use another score file (or delete this one) rather than mix two models' scores",
                    &other[..other.len().min(12)],
                    &self.fingerprint[..self.fingerprint.len().min(12)]
                ),
            ));
        }
        let max_len = column(COLUMNS[1])?.u32().map_err(|e| typed(COLUMNS[1], e))?;
        let pair = column(COLUMNS[2])?.str().map_err(|e| typed(COLUMNS[2], e))?;
        let sum = column(COLUMNS[3])?.f64().map_err(|e| typed(COLUMNS[3], e))?;
        let n_tokens = column(COLUMNS[4])?.u32().map_err(|e| typed(COLUMNS[4], e))?;
        let n_bytes = column(COLUMNS[5])?.u64().map_err(|e| typed(COLUMNS[5], e))?;
        let truncated = column(COLUMNS[6])?.bool().map_err(|e| typed(COLUMNS[6], e))?;
        let token_logprobs = column(COLUMNS[7])?.list().map_err(|e| typed(COLUMNS[7], e))?;
        for i in 0..df.height() {
            let missing = || bad(format!("row {}: a required value is null", i + 1));
            let token_logprobs = match token_logprobs.get_as_series(i) {
                None => None,
                Some(s) => {
                    let values = s.f32().map_err(|e| typed(COLUMNS[7], e))?;
                    Some((0..values.len()).map(|j| values.get(j).ok_or_else(missing)).collect::<Result<Vec<f32>>>()?)
                }
            };
            let key = (max_len.get(i).ok_or_else(missing)? as usize, pair.get(i).ok_or_else(missing)?.to_string());
            let score = Score {
                sum_logprob: sum.get(i).ok_or_else(missing)?,
                n_tokens: n_tokens.get(i).ok_or_else(missing)? as usize,
                n_bytes: n_bytes.get(i).ok_or_else(missing)? as usize,
                truncated: truncated.get(i).ok_or_else(missing)?,
                token_logprobs,
            };
            self.rows.insert(key, score);
        }
        Ok(())
    }

    fn write<'a>(&self, path: &Path, rows: impl Iterator<Item = (&'a PairKey, &'a Score)>) -> Result<()> {
        let rows: Vec<(&PairKey, &Score)> = rows.collect();
        let n = rows.len();
        let token_logprobs: Vec<Option<Series>> = rows
            .iter()
            .map(|(_, s)| s.token_logprobs.as_ref().map(|lps| Series::new("".into(), lps.as_slice())))
            .collect();
        let columns = vec![
            Column::new(COLUMNS[0].into(), vec![self.fingerprint.as_str(); n]),
            Column::new(COLUMNS[1].into(), rows.iter().map(|((m, _), _)| *m as u32).collect::<Vec<u32>>()),
            Column::new(COLUMNS[2].into(), rows.iter().map(|((_, p), _)| p.as_str()).collect::<Vec<&str>>()),
            Column::new(COLUMNS[3].into(), rows.iter().map(|(_, s)| s.sum_logprob).collect::<Vec<f64>>()),
            Column::new(COLUMNS[4].into(), rows.iter().map(|(_, s)| s.n_tokens as u32).collect::<Vec<u32>>()),
            Column::new(COLUMNS[5].into(), rows.iter().map(|(_, s)| s.n_bytes as u64).collect::<Vec<u64>>()),
            Column::new(COLUMNS[6].into(), rows.iter().map(|(_, s)| s.truncated).collect::<Vec<bool>>()),
            list_column(COLUMNS[7], token_logprobs),
        ];
        let failed = |e: PolarsError| Error::format(path, format!("cannot write the score store: {e}"));
        let mut df = DataFrame::new(n, columns).map_err(failed)?;
        let aside = path.with_extension("parquet.tmp");
        let file = std::fs::File::create(&aside).map_err(|e| Error::io(&aside, e))?;
        ParquetWriter::new(file).finish(&mut df).map_err(failed)?;
        std::fs::rename(&aside, path).map_err(|e| Error::io(path, e))
    }
}

/// A `list[f32]` column; all-null columns still get the list type so every part has one schema.
fn list_column(name: &str, values: Vec<Option<Series>>) -> Column {
    let series = Series::new(name.into(), values);
    let typed = DataType::List(Box::new(DataType::Float32));
    match series.cast(&typed) {
        Ok(s) => s.into(),
        Err(_) => series.into(),
    }
}

fn parts_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    path.with_file_name(name)
}
