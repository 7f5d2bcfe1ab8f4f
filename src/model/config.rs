//! One configuration for every supported decoder, read from a Hugging Face `config.json`
//! or from GGUF metadata. Architectures differ by a handful of switches (q/k/v bias,
//! sliding windows, q/k norms, norm offset), so one struct describes them all.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, gemma3 (gemma3_text)";

    pub fn hf_model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gemma3 => "gemma3_text",
        }
    }

    fn from_hf_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Architecture::Llama),
            "mistral" => Some(Architecture::Mistral),
            "qwen2" => Some(Architecture::Qwen2),
            "gemma3_text" | "gemma3" => Some(Architecture::Gemma3),
            _ => None,
        }
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hf_model_type())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (Gemma 3's global layers in the larger sizes).
    Linear { factor: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Rope base of the sliding-window layers when it differs (Gemma 3).
    pub rope_local_theta: Option<f64>,
    pub rope_scaling: Option<RopeScaling>,
    pub sliding_window: Option<usize>,
    /// Which layers attend within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
    pub attention_bias: bool,
    pub tie_word_embeddings: bool,
    pub activation: Activation,
    pub max_position_embeddings: usize,
    /// Attention scale is `query_pre_attn_scalar^-1/2` (Gemma) instead of `head_dim^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`. Unknown keys are ignored, as transformers does.
    pub fn from_hf_json(path: &Path, text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("invalid JSON at line {}: {e}", e.line())))?;
        // Multimodal Gemma 3 checkpoints nest the decoder under `text_config`.
        let root = json.get("text_config").unwrap_or(&json);
        let model_type = root
            .get("model_type")
            .or_else(|| json.get("model_type"))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::format(path, "missing string field `model_type`"))?;
        let architecture = Architecture::from_hf_model_type(model_type).ok_or_else(|| {
            Error::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: model_type.to_string(),
                supported: Architecture::SUPPORTED.to_string(),
            }
        })?;
        let fields = JsonFields { path, root };
        let hidden_size = fields.usize("hidden_size")?;
        let num_heads = fields.usize("num_attention_heads")?;
        let num_layers = fields.usize("num_hidden_layers")?;
        let is_gemma = architecture == Architecture::Gemma3;
        let sliding_window = match architecture {
            Architecture::Llama => None,
            Architecture::Qwen2 if !fields.opt_bool("use_sliding_window")?.unwrap_or(false) => None,
            _ => fields.opt_usize("sliding_window")?,
        };
        let sliding_layers = match (architecture, sliding_window) {
            (_, None) => vec![false; num_layers],
            (Architecture::Gemma3, Some(_)) => gemma_sliding_layers(&fields, num_layers)?,
            (Architecture::Qwen2, Some(_)) => {
                let first = fields.opt_usize("max_window_layers")?.unwrap_or(num_layers);
                (0..num_layers).map(|i| i >= first).collect()
            }
            (_, Some(_)) => vec![true; num_layers],
        };
        let activation_name = fields
            .opt_str("hidden_activation")?
            .or(fields.opt_str("hidden_act")?)
            .unwrap_or(if is_gemma { "gelu_pytorch_tanh" } else { "silu" });
        let activation = match activation_name {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(Error::format(
                    path,
                    format!("field `hidden_act`: unsupported activation `{other}` (expected silu or gelu_pytorch_tanh)"),
                ))
            }
        };
        // transformers 5 writes the rope settings as `rope_parameters` (per layer type for
        // Gemma 3) instead of `rope_theta` and `rope_scaling`; either is read.
        let (global_rope, local_rope) = match root.get("rope_parameters").filter(|v| v.is_object()) {
            Some(p) if p.get("full_attention").is_some() => (p.get("full_attention"), p.get("sliding_attention")),
            Some(p) => (Some(p), None),
            None => (None, None),
        };
        let theta_of = |p: Option<&Value>| p.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64);
        let rope_scaling = match (root.get("rope_scaling"), global_rope) {
            (None | Some(Value::Null), None) => None,
            (None | Some(Value::Null), Some(p)) => parse_rope_scaling(path, p)?,
            (Some(v), _) => parse_rope_scaling(path, v)?,
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: fields.usize("vocab_size")?,
            hidden_size,
            intermediate_size: fields.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads: fields.opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: fields.opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads),
            rms_norm_eps: fields.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: fields.opt_f64("rope_theta")?.or(theta_of(global_rope)).unwrap_or(10_000.0),
            rope_local_theta: fields.opt_f64("rope_local_base_freq")?.or(theta_of(local_rope)),
            rope_scaling,
            sliding_window,
            sliding_layers,
            attention_bias: fields
                .opt_bool("attention_bias")?
                .unwrap_or(architecture == Architecture::Qwen2),
            tie_word_embeddings: fields.opt_bool("tie_word_embeddings")?.unwrap_or(is_gemma),
            activation,
            max_position_embeddings: fields.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            query_pre_attn_scalar: fields.opt_f64("query_pre_attn_scalar")?,
            final_logit_softcapping: fields.opt_f64("final_logit_softcapping")?,
            attn_logit_softcapping: fields.opt_f64("attn_logit_softcapping")?,
            bos_token_id: fields.opt_u32("bos_token_id")?,
            eos_token_ids: token_ids(root.get("eos_token_id")),
        })
    }

    /// The `config.json` transformers and vLLM expect for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut json = serde_json::json!({
            "model_type": self.architecture.hf_model_type(),
            "architectures": [match self.architecture {
                Architecture::Llama => "LlamaForCausalLM",
                Architecture::Mistral => "MistralForCausalLM",
                Architecture::Qwen2 => "Qwen2ForCausalLM",
                Architecture::Gemma3 => "Gemma3ForCausalLM",
            }],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": match self.activation {
                Activation::Silu => "silu",
                Activation::GeluTanh => "gelu_pytorch_tanh",
            },
            "torch_dtype": "float32",
        });
        let obj = json.as_object_mut().expect("json! built an object");
        let mut put = |key: &str, value: Value| {
            obj.insert(key.to_string(), value);
        };
        if let Some(bos) = self.bos_token_id {
            put("bos_token_id", bos.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => put("eos_token_id", (*one).into()),
            many => put("eos_token_id", many.into()),
        }
        if let Some(scaling) = &self.rope_scaling {
            put("rope_scaling", serde_json::to_value(scaling).expect("plain data"));
        }
        if let Some(window) = self.sliding_window {
            put("sliding_window", window.into());
        }
        match self.architecture {
            Architecture::Gemma3 => {
                let types: Vec<&str> = self
                    .sliding_layers
                    .iter()
                    .map(|&s| if s { "sliding_attention" } else { "full_attention" })
                    .collect();
                put("layer_types", types.into());
                put("hidden_activation", "gelu_pytorch_tanh".into());
                if let Some(theta) = self.rope_local_theta {
                    put("rope_local_base_freq", theta.into());
                }
                if let Some(s) = self.query_pre_attn_scalar {
                    put("query_pre_attn_scalar", s.into());
                }
                put("final_logit_softcapping", self.final_logit_softcapping.into());
                put("attn_logit_softcapping", self.attn_logit_softcapping.into());
            }
            Architecture::Qwen2 => {
                let first = self.sliding_layers.iter().position(|&s| s);
                put("use_sliding_window", first.is_some().into());
                put(
                    "max_window_layers",
                    first.unwrap_or(self.num_layers).into(),
                );
            }
            Architecture::Llama | Architecture::Mistral => {}
        }
        json
    }

    /// Parameters in the weight tensors (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * self.hidden_size * self.intermediate_size;
        let norms = match self.architecture {
            Architecture::Gemma3 => 4 * self.hidden_size + 2 * self.head_dim,
            _ => 2 * self.hidden_size,
        };
        let per_layer = attn + bias + mlp + norms;
        let embed = self.vocab_size * self.hidden_size;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_layers * per_layer + embed + head + self.hidden_size
    }

    /// FLOPs (2 per multiply-add) of one token through the decoder body at context length
    /// `context`: every weight matrix plus attention scores and values, without the head.
    pub fn body_flops_per_token(&self, context: usize) -> f64 {
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let linear = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size;
        let attention = 2 * q * context;
        2.0 * (self.num_layers * (linear + attention)) as f64
    }

    /// FLOPs of the output projection for one position.
    pub fn head_flops(&self) -> f64 {
        2.0 * (self.vocab_size * self.hidden_size) as f64
    }

    /// Checks the invariants the decoder relies on, so a bad file fails at load, not mid-run.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::format(path, what));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "attention heads {} must be a positive multiple of key/value heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head dimension {} must be even and positive", self.head_dim));
        }
        if self.sliding_layers.len() != self.num_layers {
            return bad(format!(
                "{} layer attention types for {} layers",
                self.sliding_layers.len(),
                self.num_layers
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_layers == 0 {
            return bad("hidden size, vocabulary and layer count must be positive".into());
        }
        Ok(())
    }
}

fn gemma_sliding_layers(fields: &JsonFields, num_layers: usize) -> Result<Vec<bool>> {
    if let Some(types) = fields.root.get("layer_types").and_then(Value::as_array) {
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(Error::format(
                    fields.path,
                    format!("field `layer_types`: expected \"sliding_attention\" or \"full_attention\", got {t}"),
                )),
            })
            .collect();
    }
    let pattern = fields.opt_usize("sliding_window_pattern")?.unwrap_or(6);
    Ok((0..num_layers).map(|i| (i + 1) % pattern != 0).collect())
}

fn parse_rope_scaling(path: &Path, v: &Value) -> Result<Option<RopeScaling>> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let fields = JsonFields { path, root: v };
    match kind {
        "default" => Ok(None),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: fields.f64("factor")?,
            low_freq_factor: fields.f64("low_freq_factor")?,
            high_freq_factor: fields.f64("high_freq_factor")?,
            original_max_position_embeddings: fields.usize("original_max_position_embeddings")?,
        })),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: fields.f64("factor")?,
        })),
        other => Err(Error::format(
            path,
            format!("field `rope_scaling.rope_type`: unsupported `{other}` (expected default, llama3 or linear)"),
        )),
    }
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|n| n as u32)).collect(),
        _ => Vec::new(),
    }
}

/// Typed field access that names the file and the field on error.
struct JsonFields<'a> {
    path: &'a Path,
    root: &'a Value,
}

impl<'a> JsonFields<'a> {
    fn wrong(&self, key: &str, expected: &str) -> Error {
        Error::format(self.path, format!("field `{key}`: expected {expected}"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(key, "a number")),
        }
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.wrong(key, "a number (missing)"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, "a non-negative integer")),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.wrong(key, "a non-negative integer (missing)"))
    }
    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.opt_usize(key)?.map(|n| n as u32))
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "true or false")),
        }
    }
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.root.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers 5 keeps rope settings in `rope_parameters` (what its save_pretrained
    /// writes): read as the older top-level fields are.
    #[test]
    fn rope_parameters_of_transformers_5_are_read() {
        let base = r#""model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2"#;
        let plain = format!(r#"{{{base}, "rope_parameters": {{"rope_theta": 100000.0, "rope_type": "default"}}}}"#);
        let c = ModelConfig::from_hf_json(Path::new("c"), &plain).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.is_none()), (100000.0, true));
        let llama3 = format!(
            r#"{{{base}, "rope_parameters": {{"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        );
        let c = ModelConfig::from_hf_json(Path::new("c"), &llama3).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        let old = format!(r#"{{{base}, "rope_theta": 100000.0}}"#);
        assert_eq!(ModelConfig::from_hf_json(Path::new("c"), &old).unwrap().rope_theta, 100000.0);
    }

    /// Export writes what import reads: every architecture survives the round trip.
    #[test]
    fn hf_json_round_trips() {
        let configs = [
            r#"{"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                "eos_token_id": [1, 2], "bos_token_id": 0}"#,
            r#"{"model_type": "mistral", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 8, "sliding_window": 7}"#,
            r#"{"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                "sliding_window": 9, "use_sliding_window": true, "max_window_layers": 1,
                "tie_word_embeddings": true}"#,
            r#"{"model_type": "gemma3_text", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 8,
                "rope_scaling": {"rope_type": "linear", "factor": 8.0}}"#,
        ];
        let path = Path::new("config.json");
        for text in configs {
            let cfg = ModelConfig::from_hf_json(path, text).unwrap();
            cfg.validate(path).unwrap();
            let again = ModelConfig::from_hf_json(path, &cfg.to_hf_json().to_string()).unwrap();
            assert_eq!(cfg, again, "{text}");
        }
        let qwen = ModelConfig::from_hf_json(path, configs[2]).unwrap();
        assert_eq!(qwen.sliding_layers, vec![false, true, true]);
        assert!(qwen.attention_bias);
    }

    #[test]
    fn errors_name_the_field() {
        let path = Path::new("dir/config.json");
        let err = ModelConfig::from_hf_json(path, r#"{"model_type": "llama", "hidden_size": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dir/config.json") && err.contains("num_attention_heads"), "{err}");
        let err = ModelConfig::from_hf_json(path, "{ not json").unwrap_err().to_string();
        assert!(err.contains("invalid JSON at line 1"), "{err}");
        let bad = r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2}"#;
        let cfg = ModelConfig::from_hf_json(path, bad).unwrap();
        let err = cfg.validate(path).unwrap_err().to_string();
        assert!(err.contains("multiple of key/value heads"), "{err}");
    }
}
