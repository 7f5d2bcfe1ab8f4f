//! Stage folders: `runs/<experiment>/<stage>/<key>/`, where the key is a hash of everything the
//! stage's output depends on. A stage works inside its folder (so a killed one resumes where
//! its own code can) and is finished when its `DONE` file exists, written last and atomically:
//! a finished stage is never redone, and changing one input reruns only what depends on it.

use crate::shard::Shard;
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

const DONE: &str = "DONE";
const INPUTS: &str = "inputs.json";
const FAILED: &str = "FAILED";
/// Every stage each invocation reused or computed, one JSON line each, under the experiment.
pub const EVENTS: &str = "stages.jsonl";

#[derive(Debug, Clone)]
pub struct Stage {
    pub kind: &'static str,
    /// sha256 of the stage's inputs; the folder is named by its first 16 hex digits.
    pub key: String,
    pub dir: PathBuf,
    root: PathBuf,
}

impl Stage {
    /// The stage of `kind` for these `inputs` under the experiment folder `root`.
    pub fn new(root: &Path, kind: &'static str, inputs: &impl Serialize) -> Self {
        Self::with_key(root, kind, &Self::key_of(inputs))
    }

    pub fn with_key(root: &Path, kind: &'static str, key: &str) -> Self {
        let dir = root.join(kind).join(&key[..16]);
        Stage { kind, key: key.to_string(), dir, root: root.to_path_buf() }
    }

    pub fn key_of(inputs: &impl Serialize) -> String {
        let json = serde_json::to_string(inputs).expect("plain data serialises");
        crate::util::sha256_bytes(json.as_bytes())
    }

    pub fn is_done(&self) -> bool {
        self.dir.join(DONE).is_file()
    }

    /// Creates the folder and records the inputs (for people reading `runs/`).
    pub fn start(&self, inputs: &impl Serialize) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(INPUTS);
        let json = serde_json::to_string_pretty(inputs).expect("plain data serialises");
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))
    }

    /// Marks the stage finished with its summary.
    pub fn finish(&self, summary: &impl Serialize, seconds: f64) -> Result<()> {
        write_last(&self.dir.join(DONE), summary)?;
        self.log("computed", seconds)
    }

    /// The summary a finished stage recorded.
    pub fn summary<T: DeserializeOwned>(&self) -> Result<T> {
        let path = self.dir.join(DONE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not a {} summary: {e}", self.kind)))
    }

    /// A finished stage's summary (logged as reused); else, unless `report_only`, `compute`
    /// run in the stage's folder and its summary recorded. `None`: not finished, not computed.
    pub fn ensure<T: Serialize + DeserializeOwned>(
        &self,
        inputs: &impl Serialize,
        report_only: bool,
        compute: impl FnOnce() -> Result<T>,
    ) -> Result<Option<T>> {
        if self.is_done() {
            self.reused()?;
            return self.summary().map(Some);
        }
        if report_only {
            return Ok(None);
        }
        let started = std::time::Instant::now();
        self.start(inputs)?;
        let summary = compute()?;
        self.finish(&summary, started.elapsed().as_secs_f64())?;
        Ok(Some(summary))
    }

    /// Where the `--shard i/N` parts of a split stage work.
    pub fn shards_dir(&self) -> PathBuf {
        self.dir.join("shards")
    }

    fn shard_marker(&self, shard: Shard) -> PathBuf {
        self.shards_dir().join(format!("DONE-{}-of-{}", shard.index, shard.count))
    }

    /// Whether part `shard` finished; its summary then.
    pub fn shard_summary<T: DeserializeOwned>(&self, shard: Shard) -> Option<T> {
        let text = std::fs::read_to_string(self.shard_marker(shard)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Marks part `shard` finished (written last, like `DONE`).
    pub fn finish_shard(&self, shard: Shard, summary: &impl Serialize, seconds: f64) -> Result<()> {
        std::fs::create_dir_all(self.shards_dir()).map_err(|e| Error::io(&self.dir, e))?;
        write_last(&self.shard_marker(shard), summary)?;
        self.log(&format!("computed shard {shard}"), seconds)
    }

    /// Keeps the error a run of the stage (or of its part `shard`) ended with, for `harness
    /// status`.
    pub fn record_failure(&self, shard: Option<Shard>, error: &str) {
        let path = self.failure_path(shard);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::write(path, format!("{error}\n"));
    }

    /// The error the last run (of part `shard`) ended with, unless one started since.
    pub fn failure(&self, shard: Option<Shard>) -> Option<String> {
        std::fs::read_to_string(self.failure_path(shard)).ok().map(|s| s.trim().to_string())
    }

    pub fn clear_failure(&self, shard: Option<Shard>) {
        let _ = std::fs::remove_file(self.failure_path(shard));
    }

    fn failure_path(&self, shard: Option<Shard>) -> PathBuf {
        match shard {
            Some(s) => self.shards_dir().join(format!("FAILED-{}-of-{}", s.index, s.count)),
            None => self.dir.join(FAILED),
        }
    }

    /// Records that a finished stage was used as it is.
    pub fn reused(&self) -> Result<()> {
        self.log("reused", 0.0)
    }

    fn log(&self, action: &str, seconds: f64) -> Result<()> {
        let path = self.root.join(EVENTS);
        let line = serde_json::json!({
            "stage": self.kind,
            "key": &self.key[..16],
            "action": action,
            "seconds": seconds,
        });
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        writeln!(file, "{line}").map_err(|e| Error::io(&path, e))
    }
}

/// Writes a finished marker with its summary atomically (aside, then renamed): a marker is
/// there whole or not at all.
fn write_last(path: &Path, summary: &impl Serialize) -> Result<()> {
    let aside = path.with_extension("tmp");
    let json = serde_json::to_string_pretty(summary).expect("plain data serialises");
    std::fs::write(&aside, json).map_err(|e| Error::io(&aside, e))?;
    std::fs::rename(&aside, path).map_err(|e| Error::io(path, e))
}
