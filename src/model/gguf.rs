//! GGUF files (llama.cpp's format): configuration from metadata, tensors dequantised to
//! f32 under Hugging Face names, and the conversions llama.cpp applied undone
//! (q/k row permutation for llama, `+1` on Gemma's norm weights).

use super::config::{Activation, Architecture, ModelConfig, RopeScaling};
use super::weights::TensorMap;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

pub struct GgufModel {
    pub config: ModelConfig,
    pub tensors: TensorMap,
    pub metadata: HashMap<String, Value>,
}

/// Reads the metadata only: cheap, for `model info` and tokenizer checks.
pub fn read_metadata(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    Ok((content, reader))
}

pub fn load(path: &Path) -> Result<GgufModel> {
    let (content, mut reader) = read_metadata(path)?;
    let config = config_from_metadata(path, &content)?;
    let mut tensors = TensorMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for gguf_name in names {
        let Some(hf_name) = hf_name(config.architecture, gguf_name) else {
            continue;
        };
        let tensor = content
            .tensor(&mut reader, gguf_name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| Error::format(path, format!("tensor `{gguf_name}` is truncated or corrupt: {e}")))?;
        let tensor = convert(&config, &hf_name, tensor)?;
        tensors.insert(hf_name, tensor);
    }
    Ok(GgufModel {
        config,
        tensors,
        metadata: content.metadata,
    })
}

/// llama.cpp tensor names to Hugging Face names; `None` for tensors we do not use.
fn hf_name(arch: Architecture, gguf: &str) -> Option<String> {
    let global = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = global {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, param) = rest.rsplit_once('.')?;
    let hf_module = match module {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        // Both put this norm before the MLP, but name it differently.
        "ffn_norm" if arch == Architecture::Gemma3 => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_module}.{param}"))
}

fn convert(cfg: &ModelConfig, name: &str, tensor: Tensor) -> Result<Tensor> {
    let gemma = cfg.architecture == Architecture::Gemma3;
    if name.ends_with("norm.weight") && gemma {
        return Ok((tensor - 1.0)?);
    }
    if cfg.architecture == Architecture::Llama {
        if name.ends_with("self_attn.q_proj.weight") {
            return unpermute(tensor, cfg.num_heads);
        }
        if name.ends_with("self_attn.k_proj.weight") {
            return unpermute(tensor, cfg.num_kv_heads);
        }
    }
    Ok(tensor)
}

/// Inverse of llama.cpp's `permute`: rows of each head go from interleaved rope pairs
/// back to the rotate-half layout.
fn unpermute(w: Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, rows / heads / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

pub fn config_from_metadata(path: &Path, content: &Content) -> Result<ModelConfig> {
    let md = &content.metadata;
    let arch_name = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| Error::format(path, "GGUF metadata lacks `general.architecture`"))?;
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "gemma3" => Architecture::Gemma3,
        other => {
            return Err(Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
                supported: "llama, qwen2, gemma3 (GGUF)".to_string(),
            })
        }
    };
    let field = |key: &str| format!("{arch_name}.{key}");
    let get_u32 = |key: &str| -> Result<Option<u32>> {
        md.get(&field(key))
            .map(|v| {
                v.to_u32()
                    .map_err(|_| Error::format(path, format!("metadata `{}` is not an unsigned integer", field(key))))
            })
            .transpose()
    };
    let need = |key: &str| -> Result<usize> {
        get_u32(key)?
            .map(|v| v as usize)
            .ok_or_else(|| Error::format(path, format!("GGUF metadata lacks `{}`", field(key))))
    };
    let get_f32 = |key: &str| md.get(&field(key)).and_then(|v| v.to_f32().ok()).map(f64::from);

    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::format(
            path,
            "per-frequency rope factors (`rope_freqs.weight`, Llama 3.1 scaling) are not supported \
             in GGUF files yet; load the Hugging Face folder instead",
        ));
    }
    let embedding = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| Error::format(path, "GGUF file has no `token_embd.weight` tensor"))?;
    let vocab_size = embedding.shape.dims()[0];
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_layers = need("block_count")?;
    let gemma = architecture == Architecture::Gemma3;
    let sliding_window = if gemma {
        get_u32("attention.sliding_window")?.map(|w| w as usize)
    } else {
        None
    };
    // llama.cpp hard-codes Gemma 3's pattern: five local layers, then one global.
    let pattern = get_u32("attention.sliding_window_pattern")?.unwrap_or(6) as usize;
    let sliding_layers = (0..num_layers)
        .map(|i| sliding_window.is_some() && (i + 1) % pattern != 0)
        .collect();
    let rope_scaling = match md.get(&field("rope.scaling.type")).and_then(|v| v.to_string().ok()) {
        Some(kind) if kind == "linear" => get_f32("rope.scaling.factor").map(|factor| RopeScaling::Linear { factor }),
        _ => None,
    };
    let token_id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: need("feed_forward_length")?,
        num_layers,
        num_heads,
        num_kv_heads: get_u32("attention.head_count_kv")?.map_or(num_heads, |v| v as usize),
        head_dim: get_u32("attention.key_length")?.map_or(hidden_size / num_heads, |v| v as usize),
        rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        rope_theta: get_f32("rope.freq_base").unwrap_or(if gemma { 1_000_000.0 } else { 10_000.0 }),
        rope_local_theta: gemma.then_some(10_000.0),
        rope_scaling,
        sliding_window,
        sliding_layers,
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        activation: if gemma { Activation::GeluTanh } else { Activation::Silu },
        max_position_embeddings: need("context_length")?,
        query_pre_attn_scalar: None,
        final_logit_softcapping: get_f32("final_logit_softcapping"),
        attn_logit_softcapping: get_f32("attn_logit_softcapping"),
        bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token_id("tokenizer.ggml.eos_token_id").into_iter().collect(),
    };
    config.validate(path)?;
    Ok(config)
}
