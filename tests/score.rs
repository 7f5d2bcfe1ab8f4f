//! The fast scorer (shared prompt caches, stacked into length-sorted batches) against the
//! obvious one-candidate-at-a-time computation, per token.

use candle_core::{DType, Device};
use grape_harness::model::{self, weights, Decoder, LoadedModel, ModelConfig};
use grape_harness::score::{self, Group, Overflow, ScoreOptions};
use std::path::Path;

mod common;

use common::story_groups as groups;

/// stories260K's tokenizer and plain template around `decoder`.
fn with_decoder(config: Option<serde_json::Value>) -> Option<LoadedModel> {
    let stories = Path::new("../shared/models/stories260K.gguf");
    if !stories.exists() {
        eprintln!("skipped: {} is not here", stories.display());
        return None;
    }
    let Some(json) = config else {
        return Some(model::load("stories260k", &model::LoadOptions::default()).unwrap());
    };
    let mut m = model::inspect("stories260k", None).unwrap();
    let cfg = ModelConfig::from_hf_json(Path::new("random.json"), &json.to_string()).unwrap();
    let tensors = weights::random(&cfg, 29, &Device::Cpu).unwrap();
    m.decoder = Some(Decoder::from_tensors(&cfg, tensors, DType::F32, &Device::Cpu, Path::new("random")).unwrap());
    m.config = cfg;
    Some(m)
}

fn models() -> Vec<(&'static str, LoadedModel)> {
    let llama = serde_json::json!({
        "model_type": "llama", "vocab_size": 512, "hidden_size": 48, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256
    });
    let gemma = serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 512, "hidden_size": 48, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 24,
        "max_position_embeddings": 256, "sliding_window": 8, "sliding_window_pattern": 2,
        "query_pre_attn_scalar": 24
    });
    [("stories260k", None), ("random llama", Some(llama)), ("random gemma3", Some(gemma))]
        .into_iter()
        .filter_map(|(name, cfg)| Some((name, with_decoder(cfg)?)))
        .collect()
}

fn options(batch_tokens: usize, share_prefix: bool) -> ScoreOptions {
    ScoreOptions { batch_tokens, share_prefix, keep_token_logprobs: true, ..ScoreOptions::default() }
}

#[test]
fn batched_prefix_shared_scores_equal_naive_per_token() {
    for (name, m) in models() {
        let groups = groups();
        // A small budget forces several batches, split groups and stacked prompt caches.
        let fast = score::score(&m, &groups, &options(96, true)).unwrap();
        for (g, group) in groups.iter().enumerate() {
            let naive = score::score_naive(&m, group, &options(0, false)).unwrap();
            for (i, (a, b)) in fast[g].iter().zip(&naive).enumerate() {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert_eq!(a.n_tokens, b.n_tokens, "{name} {g}/{i}");
                assert!(a.n_tokens > 0 && a.n_bytes == group.responses[i].len());
                let worst = a.token_logprobs.as_ref().unwrap().iter()
                    .zip(b.token_logprobs.as_ref().unwrap())
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{name} {g}/{i}: per-token difference {worst}");
            }
        }
    }
}

#[test]
fn padding_and_batch_composition_do_not_change_scores() {
    for (name, m) in models() {
        let groups = groups();
        let reference = score::score(&m, &groups, &options(1_000_000, true)).unwrap();
        for (budget, share) in [(40, true), (200, true), (1_000_000, false), (64, false)] {
            let other = score::score(&m, &groups, &options(budget, share)).unwrap();
            for (g, (x, y)) in reference.iter().zip(&other).enumerate() {
                for (i, (x, y)) in x.iter().zip(y).enumerate() {
                    let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
                    let diff = (x.sum_logprob - y.sum_logprob).abs();
                    assert!(diff < 1e-4, "{name} budget {budget} share {share}: {g}/{i} differs by {diff}");
                }
            }
        }
    }
}

#[test]
fn long_pairs_are_truncated_and_flagged_or_skipped() {
    let Some(m) = with_decoder(None) else { return };
    let long = "The dog ran and ran. ".repeat(40);
    let groups = vec![Group { prompt: "Tell me about the dog.".into(), responses: vec!["A dog.".into(), long] }];
    let mut opts = options(4096, true);
    opts.max_len = 48;
    let truncated = score::score(&m, &groups, &opts).unwrap();
    let (short, long) = (truncated[0][0].as_ref().unwrap(), truncated[0][1].as_ref().unwrap());
    assert!(!short.truncated && long.truncated);
    let prompt_tokens = 48 - long.n_tokens;
    assert!(long.n_tokens > 0 && prompt_tokens > 0, "{long:?}");
    opts.overflow = Overflow::Skip;
    let skipped = score::score(&m, &groups, &opts).unwrap();
    assert!(skipped[0][0].is_some() && skipped[0][1].is_none());
}
