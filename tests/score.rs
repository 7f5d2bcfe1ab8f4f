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

#[test]
fn pairs_of_the_models_full_length_score_beside_long_shared_prompts() {
    // stories260K has 2048 positions, the default max length. A long shared prompt with short
    // answers batched with a pair cut at the full length used to give its padding positions
    // past the model's end ("position 2048 exceeds the model's 2048 rotary positions").
    let Some(m) = with_decoder(None) else { return };
    let positions = m.config.max_position_embeddings;
    assert_eq!(ScoreOptions::default().max_len, positions);
    let groups = vec![
        Group { prompt: "Tell me a story.".into(), responses: vec!["The dog ran and ran. ".repeat(400)] },
        Group { prompt: "Once upon a time there was a cat. ".repeat(180), responses: vec!["Yes.".into(), "No, a dog.".into()] },
    ];
    let long = m.encode_pair(&groups[0].prompt, &groups[0].responses[0]).unwrap();
    assert!(long.ids.len() > positions, "{}", long.ids.len());
    let prompt = m.encode_pair(&groups[1].prompt, "Yes.").unwrap().first_response;
    assert!(prompt > positions / 2, "{prompt}");
    let opts = options(1 << 20, true);
    let fast = score::score(&m, &groups, &opts).unwrap();
    let full = fast[0][0].as_ref().unwrap();
    assert!(full.truncated);
    assert_eq!(full.n_tokens, positions - long.first_response, "every position up to the last scored");
    for (g, group) in groups.iter().enumerate() {
        let naive = score::score_naive(&m, group, &opts).unwrap();
        for (a, b) in fast[g].iter().zip(&naive) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert!((a.sum_logprob - b.sum_logprob).abs() <= 1e-3 * a.n_tokens as f64, "{a:?} vs {b:?}");
        }
    }
    // A longer max length is cut to the model's positions.
    let beyond = ScoreOptions { max_len: 4 * positions, ..opts };
    assert_eq!(beyond.fitted(&m).max_len, positions);
    assert_eq!(score::score(&m, &groups[..1], &beyond).unwrap()[0][0].as_ref().unwrap().n_tokens, full.n_tokens);
}

#[test]
fn the_question_answer_template_scores_the_response_after_answer() {
    let Some(m) = with_decoder(None) else { return };
    let qa = m.with_template("question-answer").unwrap();
    assert_ne!(qa.fingerprint().unwrap(), m.fingerprint().unwrap());
    let pair = qa.template.render_pair("Who ran?", "The dog ran.").unwrap();
    assert_eq!(&pair.text[pair.response_start..], " The dog ran.</s>");
    assert!(pair.text.ends_with("Question: Who ran?\nAnswer: The dog ran.</s>"), "{:?}", pair.text);
    let encoded = qa.encode_pair("Who ran?", "The dog ran.").unwrap();
    let tokens = qa.tokenizer.inner.decode(&encoded.ids[encoded.first_response..], false).unwrap();
    let before = qa.tokenizer.inner.decode(&encoded.ids[..encoded.first_response], false).unwrap();
    assert!(before.trim_end().ends_with("Answer:"), "{before:?}");
    assert!(tokens.trim_start().starts_with("The dog ran."), "{tokens:?}");
}
