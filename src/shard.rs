//! Work split over machines (a Slurm job array, say): `--shard i/N` takes the instructions
//! or benchmark items whose id hashes to `i`, a deterministic split that does not depend on
//! row order. Each shard writes its own part; [`check_cover`] is what every merge asks first.

use crate::pool::Pool;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// Whether an instruction (or a benchmark item) belongs to this shard: its id's sha256,
    /// modulo the count.
    pub fn owns(&self, id: &str) -> bool {
        let digest = crate::util::sha256_bytes(id.as_bytes());
        let value = u64::from_str_radix(&digest[..16], 16).expect("hex digest");
        (value % self.count as u64) as usize == self.index
    }

    /// The instructions of `pool` this shard works on.
    pub fn of(&self, pool: &Pool) -> Pool {
        let instructions = pool.instructions.iter().filter(|i| self.owns(&i.id)).cloned().collect();
        Pool { instructions, skipped: Vec::new() }
    }
}

/// Checks that `parts` are the shards of one run (`run` is whatever identifies it: pool,
/// model, settings) and that every shard of its split is there exactly once.
pub fn check_cover(parts: &[(PathBuf, Shard, String)]) -> Result<()> {
    let Some((first_path, first, first_run)) = parts.first() else {
        return Err(Error::Invalid("no shards to merge".into()));
    };
    for (path, shard, run) in parts {
        let differs = |what: &str, a: &str, b: &str| {
            Error::Invalid(format!(
                "{} and {} are shards of different {what} ({a} vs {b}); merge the shards of one run",
                first_path.display(),
                path.display()
            ))
        };
        if shard.count != first.count {
            return Err(differs("splits", &first.to_string(), &shard.to_string()));
        }
        if run != first_run {
            return Err(differs("runs", first_run, run));
        }
    }
    for index in 0..first.count {
        let holders: Vec<String> =
            parts.iter().filter(|(_, s, _)| s.index == index).map(|(p, _, _)| p.display().to_string()).collect();
        match holders.len() {
            1 => {}
            0 => return Err(Error::Invalid(format!("shard {index}/{} is missing from the parts given", first.count))),
            _ => return Err(Error::Invalid(format!("shard {index}/{} is given twice: {}", first.count, holders.join(", ")))),
        }
    }
    Ok(())
}
