//! Scoring split over machines: `--shard i/N` scores the instructions whose id hashes to `i`
//! (a deterministic split that does not depend on row order), into its own store with a
//! sidecar naming the shard, the pool and the model; [`merge`] folds N such stores into one
//! and refuses a missing shard, a shard given twice, or shards of another pool or model.

use super::ScoreStore;
use crate::pool::Pool;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Shard `index` of `count`, as written `i/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s.split_once('/').and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("`{s}`: expected i/N with 0 <= i < N, e.g. 0/8")),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether an instruction belongs to this shard: its id's sha256, modulo the count.
    pub fn owns(&self, instruction_id: &str) -> bool {
        let digest = crate::util::sha256_bytes(instruction_id.as_bytes());
        let value = u64::from_str_radix(&digest[..16], 16).expect("hex digest");
        (value % self.count as u64) as usize == self.index
    }

    /// The instructions of `pool` this shard scores.
    pub fn of(&self, pool: &Pool) -> Pool {
        let instructions = pool.instructions.iter().filter(|i| self.owns(&i.id)).cloned().collect();
        Pool { instructions, skipped: Vec::new() }
    }
}

/// What a shard's store holds, written beside it as `<store>.shard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub shard: Shard,
    /// [`Pool::digest`] of the whole pool the shard was cut from.
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
    let Some((first_path, first)) = records.first() else {
        return Err(Error::Invalid("no shard stores to merge".into()));
    };
    for (path, r) in &records {
        let differs = |what: &str, a: &str, b: &str| {
            Error::Invalid(format!(
                "{} and {} are shards of different {what} ({a} vs {b}); merge shards of one scoring run",
                first_path.display(),
                path.display()
            ))
        };
        if r.shard.count != first.shard.count {
            return Err(differs("splits", &first.shard.to_string(), &r.shard.to_string()));
        }
        if r.pool != first.pool {
            return Err(differs("pools", &first.pool[..12], &r.pool[..12]));
        }
        if r.fingerprint != first.fingerprint {
            return Err(differs("models", &first.fingerprint[..12], &r.fingerprint[..12]));
        }
    }
    let count = first.shard.count;
    for index in 0..count {
        let holders: Vec<&PathBuf> = records.iter().filter(|(_, r)| r.shard.index == index).map(|(p, _)| p).collect();
        match holders.as_slice() {
            [_] => {}
            [] => return Err(Error::Invalid(format!("shard {index}/{count} is missing from the stores given"))),
            many => {
                let names: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
                return Err(Error::Invalid(format!("shard {index}/{count} is given twice: {}", names.join(", "))));
            }
        }
    }
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
