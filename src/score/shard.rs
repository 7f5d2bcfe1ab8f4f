//! Scoring split over machines: `--shard i/N` ([`crate::shard`]) scores its instructions
//! into its own store with a sidecar naming the shard, the pool and the model; [`merge`]
//! folds N such stores into one and refuses a missing shard, a shard given twice, or shards
//! of another pool or model.

use super::ScoreStore;
pub use crate::shard::Shard;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a shard's store holds, written beside it as `<store>.shard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub shard: Shard,
    /// [`crate::pool::Pool::digest`] of the whole pool the shard was cut from.
    pub pool: String,
    pub fingerprint: String,
    pub instructions: usize,
}

fn record_path(store: &Path) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".shard.json");
    store.with_file_name(name)
}

/// Records which shard `store` holds (once its scores are all saved).
pub fn write_record(store: &Path, record: &ShardRecord) -> Result<()> {
    let path = record_path(store);
    let json = serde_json::to_string_pretty(record).expect("plain data serialises");
    std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
}

fn read_record(store: &Path) -> Result<ShardRecord> {
    let path = record_path(store);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Invalid(format!("{}: not a finished shard ({} is missing: {e})", store.display(), path.display()))
    })?;
    serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not a shard record: {e}")))
}

/// Folds the shard stores `parts` into the store at `out`; every shard of one split of one
/// pool under one model must be there exactly once. Returns the number of scores merged.
pub fn merge(parts: &[PathBuf], out: &Path) -> Result<usize> {
    let records: Vec<(PathBuf, ShardRecord)> =
        parts.iter().map(|p| Ok((p.clone(), read_record(p)?))).collect::<Result<_>>()?;
    let runs: Vec<(PathBuf, Shard, String)> = records
        .iter()
        .map(|(p, r)| (p.clone(), r.shard, format!("pool {} model {}", &r.pool[..12], &r.fingerprint[..12])))
        .collect();
    crate::shard::check_cover(&runs)?;
    let first = &records[0].1;
    let mut merged = ScoreStore::open(out, &first.fingerprint)?;
    let mut total = 0;
    for (path, _) in &records {
        let part = ScoreStore::open(path, &first.fingerprint)?;
        let mut by_length: std::collections::BTreeMap<usize, Vec<(String, super::Score)>> = Default::default();
        for ((max_len, pair), score) in part.entries() {
            by_length.entry(*max_len).or_default().push((pair.clone(), score.clone()));
        }
        for (max_len, rows) in by_length {
            total += rows.len();
            merged.append(max_len, rows)?;
        }
    }
    merged.compact()?;
    Ok(total)
}
