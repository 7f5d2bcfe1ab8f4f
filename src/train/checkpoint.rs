//! Checkpoints: weights, AdamW moments and where training stands, written whole or not at
//! all (into a temporary folder, then renamed), the last N kept. Snapshots: weights only,
//! every one kept, for what studies the path of training (S2L's loss trajectories).

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where training stands. Batches are a function of (seed, epoch), so the step is the whole
/// data cursor and no generator state needs saving beyond the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub seed: u64,
    /// Fingerprint of the model training started from; a checkpoint of another is refused.
    pub base_fingerprint: String,
}

pub struct Checkpoint {
    pub state: TrainState,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

const STATE: &str = "state.json";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

fn dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn snapshot_dir(out: &Path) -> PathBuf {
    out.join("snapshots")
}

/// Saves the weights after `step` as `out/snapshots/step-NNNNNNNN.safetensors`, written aside
/// and renamed so a killed run never leaves half a file under the final name.
pub fn save_snapshot(out: &Path, step: usize, weights: &[(String, Tensor)]) -> Result<PathBuf> {
    let root = snapshot_dir(out);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let path = root.join(format!("step-{step:08}.safetensors"));
    let aside = root.join(format!(".step-{step:08}.tmp"));
    candle_core::safetensors::save(&weights.iter().cloned().collect::<HashMap<_, _>>(), &aside)?;
    std::fs::rename(&aside, &path).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// Every snapshot under `out` as (step, file), in step order.
pub fn snapshots(out: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = snapshot_dir(out);
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(Vec::new()) };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p.file_name()?.to_str()?.strip_prefix("step-")?.strip_suffix(".safetensors")?.parse().ok()?;
            Some((step, p))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The tensors of a weights file (a checkpoint's or a snapshot's).
pub fn load_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device).map_err(|e| Error::format(path, format!("unreadable: {e}")))
}

/// Saves `step-NNNNNNNN` under `out/checkpoints` and removes all but the newest `keep`.
pub fn save(
    out: &Path,
    state: &TrainState,
    weights: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let root = dir(out);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = format!("step-{:08}", state.step);
    let aside = root.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&aside);
    std::fs::create_dir_all(&aside).map_err(|e| Error::io(&aside, e))?;
    candle_core::safetensors::save(&weights.iter().cloned().collect::<HashMap<_, _>>(), aside.join(WEIGHTS))?;
    candle_core::safetensors::save(&optimizer.iter().cloned().collect::<HashMap<_, _>>(), aside.join(OPTIMIZER))?;
    let json = serde_json::to_string_pretty(state).expect("plain data serialises");
    std::fs::write(aside.join(STATE), json).map_err(|e| Error::io(aside.join(STATE), e))?;
    let final_dir = root.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&aside, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    let all = list(out)?;
    for old in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
    }
    Ok(final_dir)
}

/// Finished checkpoints, oldest first.
fn list(out: &Path) -> Result<Vec<PathBuf>> {
    let root = dir(out);
    let Ok(entries) = std::fs::read_dir(&root) else { return Ok(Vec::new()) };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .filter(|p| p.join(STATE).is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// `saved[key]`, checked to have the shape of `like`; errors name `what` was saved.
pub fn saved_like<'a>(saved: &'a HashMap<String, Tensor>, key: &str, like: &Tensor, what: &str) -> Result<&'a Tensor> {
    let tensor = saved.get(key).ok_or_else(|| Error::Invalid(format!("the saved {what} lacks `{key}`")))?;
    if tensor.shape() != like.shape() {
        return Err(Error::Invalid(format!(
            "the saved {what} `{key}` has shape {:?}, the model needs {:?}",
            tensor.dims(),
            like.dims()
        )));
    }
    Ok(tensor)
}

/// The newest checkpoint under `out`, if any, checked to come from `base_fingerprint`.
pub fn latest(out: &Path, base_fingerprint: &str, device: &Device) -> Result<Option<Checkpoint>> {
    let Some(path) = list(out)?.pop() else { return Ok(None) };
    let state_path = path.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState =
        serde_json::from_str(&text).map_err(|e| Error::format(&state_path, format!("not a training state: {e}")))?;
    if state.base_fingerprint != base_fingerprint {
        return Err(Error::mismatch(
            &path,
            format!(
                "this checkpoint continues model {}…, not the model given ({}…); use a fresh --out",
                &state.base_fingerprint[..state.base_fingerprint.len().min(12)],
                &base_fingerprint[..base_fingerprint.len().min(12)]
            ),
        ));
    }
    let read = |name: &str| load_weights(&path.join(name), device);
    Ok(Some(Checkpoint { state, weights: read(WEIGHTS)?, optimizer: read(OPTIMIZER)? }))
}
