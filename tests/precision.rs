//! Precision and devices. Scores computed in bf16 (on the CPU here; on a GPU in a `cuda`
//! build) agree with CPU f32 scores within [`BF16_TOLERANCE`]; on a GPU, f32 scores agree
//! within [`F32_TOLERANCE`], batched greedy generation equals one prompt at a time, and a
//! few training steps lower the loss. The GPU tests exist only in a `cuda` build and say
//! why they skip when no GPU answers.

use candle_core::{DType, Device};
use grape_harness::model::{self, LoadOptions, LoadedModel};
use grape_harness::score::{self, ScoreOptions};

/// Largest gap allowed in a candidate's mean log-probability per response token (nats),
/// bf16 weights and activations against f32. bf16 keeps 8 bits of mantissa, so logits
/// carry about 0.4% relative error; log-softmax runs in f32 on the cast logits.
const BF16_TOLERANCE: f64 = 0.05;
/// The same, f32 on another device: only summation order differs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const F32_TOLERANCE: f64 = 1e-3;

mod common;

use common::STORIES;

fn stories(device: &Device, dtype: DType) -> Option<LoadedModel> {
    if !common::have(&[STORIES]) {
        return None;
    }
    Some(model::load("stories260k", &LoadOptions { device: device.clone(), dtype, template: None }).unwrap())
}

/// Mean log-probability per response token of every candidate, in order.
fn mean_logprobs(m: &LoadedModel) -> Vec<f64> {
    let options = ScoreOptions { batch_tokens: 256, ..ScoreOptions::default() };
    let scores = score::score(m, &common::story_groups(), &options).unwrap();
    scores.into_iter().flatten().map(|s| s.unwrap()).map(|s| s.sum_logprob / s.n_tokens as f64).collect()
}

fn assert_agree(reference: &[f64], other: &[f64], tolerance: f64, what: &str) {
    assert_eq!(reference.len(), other.len());
    let worst = reference.iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("{what}: largest gap {worst:.2e} nats per token (tolerance {tolerance:.0e})");
    assert!(worst <= tolerance, "{what}: {reference:?} vs {other:?}");
    assert!(reference.iter().all(|x| x.is_finite() && *x < 0.0));
}

#[test]
fn bf16_scores_agree_with_f32_on_the_cpu() {
    let (Some(f32_model), Some(bf16_model)) = (stories(&Device::Cpu, DType::F32), stories(&Device::Cpu, DType::BF16))
    else {
        return;
    };
    assert_agree(&mean_logprobs(&f32_model), &mean_logprobs(&bf16_model), BF16_TOLERANCE, "cpu bf16");
    // bf16 scores are stored apart from f32 ones.
    assert_ne!(f32_model.fingerprint().unwrap(), bf16_model.fingerprint().unwrap());
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use grape_harness::generate::{generate, prompt_ids, GenerateOptions};
    use grape_harness::train::{self, optim::Schedule, TrainConfig, Trainable};

    fn gpu() -> Option<Device> {
        match model::Placement::parse("cuda", "auto") {
            Ok(placement) => Some(placement.device),
            Err(e) => {
                eprintln!("skipped: no GPU answers ({e})");
                None
            }
        }
    }

    #[test]
    fn gpu_scores_agree_with_cpu_f32() {
        let Some(gpu) = gpu() else { return };
        let Some(cpu) = stories(&Device::Cpu, DType::F32) else { return };
        let reference = mean_logprobs(&cpu);
        let f32_gpu = stories(&gpu, DType::F32).unwrap();
        assert_agree(&reference, &mean_logprobs(&f32_gpu), F32_TOLERANCE, "gpu f32");
        let bf16_gpu = stories(&gpu, DType::BF16).unwrap();
        assert_agree(&reference, &mean_logprobs(&bf16_gpu), BF16_TOLERANCE, "gpu bf16");
    }

    #[test]
    fn gpu_batched_greedy_equals_one_prompt_at_a_time() {
        let Some(gpu) = gpu() else { return };
        let Some(m) = stories(&gpu, DType::F32) else { return };
        let prompts: Vec<Vec<u32>> = ["Once upon a time", "The sun", "Lily and Tom went to the park. They saw"]
            .iter()
            .map(|p| prompt_ids(&m, p, "").unwrap())
            .collect();
        let one = GenerateOptions { max_new_tokens: 32, batch_size: 1, ..Default::default() };
        let alone = generate(&m, &prompts, &one, |_| {}).unwrap();
        let batched = generate(&m, &prompts, &GenerateOptions { batch_size: 3, ..one }, |_| {}).unwrap();
        assert_eq!(alone, batched);
    }

    #[test]
    fn gpu_training_steps_lower_the_loss() {
        let Some(gpu) = gpu() else { return };
        if !common::have(&[STORIES]) {
            return;
        }
        let options = LoadOptions { device: gpu, dtype: DType::F32, template: None };
        let (m, vars) = model::load_trainable("stories260k", &options).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<String> = [("Who is Tom?", "Tom is a big dog who likes to run."), ("Where is the ball?", "The ball is in the park.")]
            .iter()
            .map(|(p, r)| serde_json::json!({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}).to_string())
            .collect();
        std::fs::write(dir.path().join("sft.jsonl"), rows.join("\n")).unwrap();
        let data = train::data::read(&dir.path().join("sft.jsonl"), &m, 256).unwrap();
        let config = TrainConfig {
            lr: 3e-3,
            max_steps: Some(20),
            micro_batch_tokens: 256,
            schedule: Schedule::Constant,
            warmup_ratio: 0.0,
            ..TrainConfig::default()
        };
        let target = Trainable { model: &m, vars: &vars, base_fingerprint: m.fingerprint().unwrap() };
        let report = train::train(&target, &data, &config, dir.path(), false, false).unwrap();
        let (first, last) = (report.first_loss.unwrap(), report.final_loss.unwrap());
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}
