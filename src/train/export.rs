//! A fine-tuned model as a Hugging Face folder: what transformers, vLLM and our own loader
//! read, with the chat template it was trained under.

use crate::model::LoadedModel;
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// Writes `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json`.
pub fn hugging_face(model: &LoadedModel, weights: &[(String, Tensor)], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let write_json = |name: &str, value: &serde_json::Value| {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).expect("plain data serialises");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &model.config.to_hf_json())?;
    let tensors: HashMap<String, Tensor> = weights.iter().cloned().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    tokenizer(model, dir)
}

/// Writes `tokenizer.json` and `tokenizer_config.json`, with the chat template `model` was
/// trained under, into a model folder.
pub fn tokenizer(model: &LoadedModel, dir: &Path) -> Result<()> {
    let tokenizer_path = dir.join("tokenizer.json");
    model
        .tokenizer
        .inner
        .save(&tokenizer_path, false)
        .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", tokenizer_path.display())))?;
    tokenizer_config(model, dir)
}

/// `tokenizer_config.json` alone: special tokens and the chat template, so a folder a
/// training engine wrote is evaluated under the template it trained under.
pub fn tokenizer_config(model: &LoadedModel, dir: &Path) -> Result<()> {
    let tokenizer = &model.tokenizer;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": model.template.source(),
        "bos_token": tokenizer.bos.as_ref().map(|t| t.text.clone()),
        "eos_token": tokenizer.eos.as_ref().map(|t| t.text.clone()),
        "add_bos_token": tokenizer.add_bos,
        "model_max_length": model.config.max_position_embeddings,
    });
    let path = dir.join("tokenizer_config.json");
    let text = serde_json::to_string_pretty(&config).expect("plain data serialises");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}
