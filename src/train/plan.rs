//! Memory and time of a fine-tuning run before it starts, per device: weights, gradients,
//! optimiser state and an activation estimate, for the engine, precision and device count
//! the run asks for. The dry run shows it; a GPU run that cannot fit is refused with it.

use super::{Engine, TrainConfig};
use crate::model::config::ModelConfig;
use std::fmt;

const GB: f64 = 1e9;
/// Dense bf16 peak of an H100 SXM; runs are assumed to reach 40% of it.
const GPU_PEAK_FLOPS: f64 = 989e12;
const GPU_UTILISATION: f64 = 0.4;

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub engine: String,
    /// Processes (devices) the state is split over, or replicated across.
    pub devices: usize,
    pub on_gpu: bool,
    /// Bytes per device.
    pub weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    /// Bytes one device holds (`HARNESS_GPU_MEMORY_GB`, default 80), on GPUs.
    pub capacity: Option<f64>,
    /// Training FLOPs of the whole run (6 per parameter per token) and its time at the assumed rate.
    pub flops: f64,
    pub seconds: Option<f64>,
}

impl MemoryPlan {
    pub fn total(&self) -> f64 {
        self.weights + self.gradients + self.optimizer + self.activations
    }

    pub fn fits(&self) -> bool {
        self.capacity.is_none_or(|c| self.total() <= c)
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device = if self.on_gpu { "GPU" } else { "process" };
        write!(
            f,
            "{} on {} {device}(s): per {device} weights {:.1} GB + gradients {:.1} GB + optimizer {:.1} GB + activations ~{:.1} GB = {:.1} GB",
            self.engine,
            self.devices,
            self.weights / GB,
            self.gradients / GB,
            self.optimizer / GB,
            self.activations / GB,
            self.total() / GB
        )?;
        if let Some(capacity) = self.capacity {
            let verdict = if self.fits() { "fits" } else { "DOES NOT FIT" };
            write!(f, " of {:.0} GB: {verdict}", capacity / GB)?;
        }
        write!(f, "; {:.2e} FLOP", self.flops)?;
        if let Some(s) = self.seconds {
            write!(f, ", about {:.1} h at 40% of an H100's bf16 peak per GPU", s / 3600.0)?;
        }
        Ok(())
    }
}

/// The plan for training `model` as `config` says on `tokens` tokens per epoch. `on_gpu`: the
/// native trainer's device (the trl engine's comes from its accelerate config).
pub fn plan(model: &ModelConfig, config: &TrainConfig, tokens: f64, on_gpu: bool) -> MemoryPlan {
    let p = model.parameter_count() as f64;
    let accelerate = config.accelerate.as_deref().unwrap_or("cpu");
    // A config that cannot be read is refused before training; planned here as one GPU.
    let launch = super::engine::Launch::of(config).unwrap_or(super::engine::Launch { on_cpu: false, sharded: false, deepspeed: false });
    let sharded = config.engine == Engine::Trl && launch.sharded;
    let gpu = if config.engine == Engine::Trl { !launch.on_cpu } else { on_gpu };
    let devices = if config.engine == Engine::Trl { config.processes.unwrap_or(1).max(1) } else { 1 };
    let (engine, weights, gradients, optimizer) = if sharded {
        // bf16 weights and f32 master copies, bf16 gradients, f32 moments: 16 bytes a
        // parameter, split over the devices.
        let n = devices as f64;
        (format!("trl ({accelerate}, bf16 with f32 master weights)"), 6.0 * p / n, 2.0 * p / n, 8.0 * p / n)
    } else {
        // f32 weights, gradients and both moments, whole on every device.
        let name = if config.engine == Engine::Trl { format!("trl ({accelerate}, f32)") } else { "native (f32)".into() };
        (name, 4.0 * p, 4.0 * p, 8.0 * p)
    };
    let activations = activation_bytes(model, config, sharded);
    let capacity = gpu.then(|| {
        std::env::var("HARNESS_GPU_MEMORY_GB").ok().and_then(|v| v.parse::<f64>().ok()).unwrap_or(80.0) * GB
    });
    let flops = 6.0 * p * tokens * config.epochs.max(1) as f64;
    let seconds = gpu.then(|| flops / (GPU_PEAK_FLOPS * GPU_UTILISATION * devices as f64));
    MemoryPlan { engine, devices, on_gpu: gpu, weights, gradients, optimizer, activations, capacity, flops, seconds }
}

/// Activations of one micro-batch (`micro_batch_tokens` tokens): every layer's saved inputs
/// and intermediates, or with gradient checkpointing (the sharded GPU configs) each layer's
/// input plus one layer recomputed; and the f32 logits with their gradient.
fn activation_bytes(model: &ModelConfig, config: &TrainConfig, checkpointed: bool) -> f64 {
    let t = config.micro_batch_tokens.min(config.max_len.max(1) * 64) as f64;
    let (h, i, l) = (model.hidden_size as f64, model.intermediate_size as f64, model.num_layers as f64);
    let logits = 8.0 * t * model.vocab_size as f64;
    let layer = |bytes: f64| bytes * t * (10.0 * h + 3.0 * i);
    if checkpointed {
        2.0 * t * h * l + layer(2.0) + logits
    } else {
        l * layer(4.0) + logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_8b_target_fits_4_gpus_under_zero3_but_not_the_native_trainer() {
        let (_, json) = crate::model::random::SHAPES.iter().find(|(n, _)| *n == "llama-3.1-8b").unwrap();
        let llama = ModelConfig::from_hf_json(std::path::Path::new("llama-3.1-8b"), json).unwrap();
        let tokens = 1e9;
        let native = plan(&llama, &TrainConfig { micro_batch_tokens: 8192, max_len: 4096, ..TrainConfig::default() }, tokens, true);
        assert!(!native.fits(), "{native}");
        assert!((native.weights + native.gradients + native.optimizer) / GB > 120.0, "{native}");
        let zero3 = TrainConfig {
            engine: Engine::Trl,
            accelerate: Some("zero3".into()),
            processes: Some(4),
            micro_batch_tokens: 8192,
            max_len: 4096,
            ..TrainConfig::default()
        };
        let sharded = plan(&llama, &zero3, tokens, true);
        eprintln!("{native}\n{sharded}");
        assert!(sharded.fits(), "{sharded}");
        assert!((sharded.weights + sharded.gradients + sharded.optimizer) / GB < 35.0, "{sharded}");
    }
}
