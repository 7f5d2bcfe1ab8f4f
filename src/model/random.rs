//! Models of real shapes with random weights, written as Hugging Face folders: throughput
//! can then be measured where the real weights cannot go (a GPU machine with no package
//! registry and little disk), with every command that takes a model.

use super::config::ModelConfig;
use super::weights;
use crate::{Error, Result};
use candle_core::{DType, Device};
use std::path::Path;

/// The shapes of the paper's targets and our CPU model, as their `config.json`s give them.
pub const SHAPES: &[(&str, &str)] = &[
    (
        "smollm2-135m",
        r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true}"#,
    ),
    (
        "qwen2.5-0.5b",
        r#"{"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true}"#,
    ),
    (
        "llama-3.1-8b",
        r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": false}"#,
    ),
];

/// Writes `config.json`, a seeded random `model.safetensors` in `dtype`, and a word-level
/// `tokenizer.json` whose tokens `t0`..`tN` cover the whole vocabulary (any id decodes; no
/// EOS, so generation runs to its token budget). `shape` is a name from [`SHAPES`] or the
/// path of a `config.json`.
pub fn write_folder(shape: &str, seed: u64, dtype: DType, out: &Path) -> Result<ModelConfig> {
    let (source, text) = match SHAPES.iter().find(|(name, _)| *name == shape) {
        Some((name, json)) => (Path::new(name).to_path_buf(), json.to_string()),
        None if Path::new(shape).is_file() => {
            (shape.into(), std::fs::read_to_string(shape).map_err(|e| Error::io(shape, e))?)
        }
        None => {
            let names: Vec<&str> = SHAPES.iter().map(|(name, _)| *name).collect();
            return Err(Error::Invalid(format!(
                "shape `{shape}`: expected one of {} or the path of a config.json",
                names.join(", ")
            )));
        }
    };
    let config = ModelConfig::from_hf_json(&source, &text)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let config_path = out.join("config.json");
    let json = serde_json::to_string_pretty(&config.to_hf_json()).expect("plain data serialises");
    std::fs::write(&config_path, json).map_err(|e| Error::io(&config_path, e))?;

    let tensors = weights::random_as(&config, seed, dtype, &Device::Cpu)?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;

    let vocab = (0..config.vocab_size as u32).map(|id| (format!("t{id}"), id)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab)
        .unk_token("t0".into())
        .build()
        .map_err(|e| Error::Tokenizer(format!("word-level vocabulary: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
    let tokenizer_path = out.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", tokenizer_path.display())))?;
    Ok(config)
}
