//! Hugging Face model folders: `config.json`, one or many `*.safetensors` (with the
//! `model.safetensors.index.json` map when sharded), `tokenizer.json`, `tokenizer_config.json`.

use super::config::ModelConfig;
use super::weights::TensorMap;
use crate::{Error, Result};
use candle_core::Device;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub struct HfModel {
    pub config: ModelConfig,
    pub tensors: TensorMap,
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config = ModelConfig::from_hf_json(&path, &text)?;
    config.validate(&path)?;
    Ok(config)
}

pub fn load(dir: &Path) -> Result<HfModel> {
    let config = read_config(dir)?;
    let mut tensors = TensorMap::new();
    for file in safetensors_files(dir)? {
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| Error::format(&file, format!("unreadable safetensors (truncated?): {e}")))?;
        for (name, tensor) in loaded {
            // Multimodal Gemma 3 checkpoints keep the decoder under `language_model.`.
            let name = name.strip_prefix("language_model.").unwrap_or(&name).to_string();
            tensors.insert(name, tensor);
        }
    }
    Ok(HfModel { config, tensors })
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(&index, format!("invalid JSON at line {}: {e}", e.line())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(&index, "field `weight_map`: expected an object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return files
            .into_iter()
            .map(|f| {
                let path = dir.join(f);
                if path.exists() {
                    Ok(path)
                } else {
                    Err(Error::format(&index, format!("names shard `{f}`, which does not exist")))
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json in this folder"))
}
