//! From a name or path to a ready model: weights, tokenizer and chat template together,
//! checked against each other.

use super::chat::{BuiltinTemplate, ChatTemplate, TemplateSource};
use super::config::ModelConfig;
use super::pull::{self, ModelFiles};
use super::tokenizer::Tokenizer;
use super::weights::TensorMap;
use super::{gguf, hf, Decoder};
use crate::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::VarMap;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    #[serde(rename = "huggingface")]
    HuggingFace,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// `None` or "auto": the model's own template, else `plain`. "model" insists on the
    /// model's own; "chatml", "tulu", "plain" pick a built-in.
    pub template: Option<String>,
}

impl Default for LoadOptions {
    /// The process's [`Placement`] (the CPU in f32 unless the CLI said otherwise).
    fn default() -> Self {
        let Placement { device, dtype } = Placement::current();
        Self { device, dtype, template: None }
    }
}

/// Where models run and in what precision. Set once per process (the CLI's `--device` and
/// `--dtype`), so every command and experiment stage follows the one flag.
#[derive(Debug, Clone)]
pub struct Placement {
    pub device: Device,
    /// Inference precision. Training keeps f32 weights and moments whatever this says.
    pub dtype: DType,
}

static PLACEMENT: std::sync::OnceLock<Placement> = std::sync::OnceLock::new();

impl Placement {
    /// `device`: `cpu`, `cuda` or `cuda:N`; `dtype`: `auto` (f32 on the CPU, bf16 on a GPU,
    /// where log-softmax still runs in f32), `f32`, `bf16` or `f16`.
    pub fn parse(device: &str, dtype: &str) -> Result<Self> {
        let device = match device {
            "cpu" => Device::Cpu,
            "cuda" => cuda_device(0)?,
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => cuda_device(ordinal)?,
                _ => return Err(Error::Invalid(format!("--device `{other}`: expected cpu, cuda or cuda:N"))),
            },
        };
        let dtype = match dtype {
            "auto" if device.is_cpu() => DType::F32,
            "auto" => DType::BF16,
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => return Err(Error::Invalid(format!("--dtype `{other}`: expected auto, f32, bf16 or f16"))),
        };
        Ok(Self { device, dtype })
    }

    /// Makes this the process's placement; only the first call counts.
    pub fn install(self) {
        if PLACEMENT.set(self).is_err() {
            tracing::warn!("the device and precision were already chosen; keeping the first choice");
        }
    }

    pub fn current() -> Self {
        PLACEMENT.get().cloned().unwrap_or(Self { device: Device::Cpu, dtype: DType::F32 })
    }
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::Invalid(
            "--device cuda: this harness was built without CUDA; build it with scripts/build-cuda.sh".into(),
        ));
    }
    // candle appends a backtrace to CUDA errors; the first line says what went wrong.
    Device::new_cuda(ordinal).map_err(|e| {
        let first = e.to_string().lines().next().unwrap_or_default().to_string();
        Error::Invalid(format!("--device cuda:{ordinal}: no usable GPU ({first})"))
    })
}

/// See [`LoadedModel::encode_pair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    pub response_mask: Vec<bool>,
    /// Index of the first response token (at least 1: something precedes it).
    pub first_response: usize,
}

impl EncodedPair {
    /// Keeps the first `max_len` tokens; `None` when no response token would remain to
    /// predict (the first one needs a token before it).
    pub fn truncated(mut self, max_len: usize) -> Option<Self> {
        if self.first_response >= max_len {
            return None;
        }
        self.ids.truncate(max_len);
        self.response_mask.truncate(max_len);
        Some(self)
    }

    /// Flat positions whose hidden state predicts a response token, and those tokens.
    pub fn targets(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (1..self.ids.len()).filter(|&t| self.response_mask[t]).map(|t| (t - 1, self.ids[t]))
    }
}

/// Cloning is cheap for the weights (candle shares tensors) but copies the tokenizer.
#[derive(Clone)]
pub struct LoadedModel {
    pub name: String,
    pub files: ModelFiles,
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// `None` when only inspected (`model info`).
    pub decoder: Option<Decoder>,
    /// Kept so a trainer can turn them into variables without reading the file again.
    pub tensors: Option<TensorMap>,
    /// Where the decoder's weights live (inputs must be created there).
    pub device: Device,
    /// The precision the decoder computes in; part of the fingerprint unless f32, since
    /// bf16 scores differ from f32 ones in their last digits.
    pub dtype: DType,
    /// sha256 of the weight files (a built-in's pinned hash); `None` when only inspected.
    /// Whoever swaps in other weights must set it, or scores would be stored under the
    /// old model's fingerprint.
    pub weights_sha256: Option<String>,
}

impl LoadedModel {
    pub fn decoder(&self) -> Result<&Decoder> {
        self.decoder
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("model `{}` was inspected, not loaded", self.name)))
    }

    /// A prompt/response pair as the model sees it in scoring and in training alike: token
    /// ids of the chat-rendered text and which of them are response tokens. The boundary
    /// comes from character offsets of this one joint tokenization.
    pub fn encode_pair(&self, prompt: &str, response: &str) -> Result<EncodedPair> {
        let pair = self.template.render_pair(prompt, response)?;
        let encoding = self.tokenizer.encode(&pair.text)?;
        let response_mask = super::chat::response_mask(encoding.get_offsets(), pair.response_start);
        let first_response = response_mask.iter().position(|&m| m).unwrap_or(response_mask.len());
        if first_response == response_mask.len() || first_response == 0 {
            return Err(Error::Invalid(
                "the chat template left no response tokens (or no prompt token before them)".into(),
            ));
        }
        Ok(EncodedPair { ids: encoding.get_ids().to_vec(), response_mask, first_response })
    }

    /// This model under another built-in template: GRAPE scores under the paper's plain
    /// question/answer prompt while training and evaluation keep the chat template. The
    /// fingerprint follows the template, so scores under two templates never share a store.
    pub fn with_template(&self, name: &str) -> Result<LoadedModel> {
        let builtin: BuiltinTemplate = name.parse()?;
        let bos = self.tokenizer.bos.as_ref().map(|t| t.text.clone());
        let eos = self.tokenizer.eos.as_ref().map(|t| t.text.clone());
        Ok(LoadedModel { template: ChatTemplate::builtin(builtin, bos, eos)?, ..self.clone() })
    }

    /// What a score depends on besides the pair: weights, tokenizer and chat template.
    /// The score store refuses scores made under another fingerprint.
    pub fn fingerprint(&self) -> Result<String> {
        let weights = self
            .weights_sha256
            .as_deref()
            .ok_or_else(|| Error::Invalid(format!("model `{}` has no weights to fingerprint", self.name)))?;
        let mut text = format!(
            "weights {weights}\ntokenizer {}\ntemplate {}\n",
            self.tokenizer.digest()?,
            self.template.digest()
        );
        if self.dtype != DType::F32 {
            text += &format!("dtype {:?}\n", self.dtype);
        }
        Ok(crate::util::sha256_bytes(text.as_bytes()))
    }
}

/// Loads weights, tokenizer and template. `name_or_path` is a built-in name (pulled on
/// first use), a `.gguf` file, or a Hugging Face folder.
pub fn load(name_or_path: &str, options: &LoadOptions) -> Result<LoadedModel> {
    let mut model = read(name_or_path, options.template.as_deref(), true)?;
    let tensors = model.tensors.take().expect("read with weights");
    let path = model.files.weights.clone();
    model.decoder = Some(Decoder::from_tensors(&model.config, tensors, options.dtype, &options.device, &path)?);
    model.device = options.device.clone();
    model.dtype = options.dtype;
    Ok(model)
}

/// [`load`] with every weight a variable, for fine-tuning; the map owns the variables.
/// The variables are f32 whatever `options.dtype` says: AdamW's small updates vanish in
/// bf16 weights, so master weights and moments stay f32 on every device.
pub fn load_trainable(name_or_path: &str, options: &LoadOptions) -> Result<(LoadedModel, VarMap)> {
    let mut model = read(name_or_path, options.template.as_deref(), true)?;
    let tensors = model.tensors.take().expect("read with weights");
    let path = model.files.weights.clone();
    let (decoder, vars) = Decoder::trainable(&model.config, tensors, DType::F32, &options.device, &path)?;
    model.decoder = Some(decoder);
    model.device = options.device.clone();
    Ok((model, vars))
}

/// Reads configuration, tokenizer and template without the weights.
pub fn inspect(name_or_path: &str, template: Option<&str>) -> Result<LoadedModel> {
    read(name_or_path, template, false)
}

/// [`inspect`] plus the digest of the weight files, so that [`LoadedModel::fingerprint`]
/// works without loading them (an experiment's dry run).
pub fn inspect_fingerprinted(name_or_path: &str, template: Option<&str>) -> Result<LoadedModel> {
    let mut model = read(name_or_path, template, false)?;
    model.weights_sha256 = Some(weights_digest(&model.files)?);
    model.dtype = Placement::current().dtype;
    Ok(model)
}

fn read(name_or_path: &str, template_choice: Option<&str>, with_weights: bool) -> Result<LoadedModel> {
    let files = pull::resolve(name_or_path)?;
    let weights_path = files.weights.clone();
    let (format, config, tensors, tokenizer, own_template) = if weights_path.is_dir() {
        let (config, tensors) = if with_weights {
            let model = hf::load(&weights_path)?;
            (model.config, Some(model.tensors))
        } else {
            (hf::read_config(&weights_path)?, None)
        };
        let tokenizer_json = files.tokenizer_json.clone().unwrap_or_else(|| weights_path.join("tokenizer.json"));
        let tokenizer_config = existing(tokenizer_json.with_file_name("tokenizer_config.json"));
        let tokenizer = Tokenizer::from_hf_files(&tokenizer_json, tokenizer_config.as_deref())?;
        let template = hf_chat_template(&weights_path, tokenizer_config.as_deref())?;
        (ModelFormat::HuggingFace, config, tensors, tokenizer, template)
    } else {
        let (config, metadata, tensors) = if with_weights {
            let model = gguf::load(&weights_path)?;
            (model.config, model.metadata, Some(model.tensors))
        } else {
            let (content, _) = gguf::read_metadata(&weights_path)?;
            (gguf::config_from_metadata(&weights_path, &content)?, content.metadata, None)
        };
        // A packaged tokenizer.json (Gemma 3) takes precedence over the GGUF vocabulary.
        let (tokenizer, side_template) = match &files.tokenizer_json {
            Some(json) => {
                let tokenizer_config = existing(json.with_file_name("tokenizer_config.json"));
                let tokenizer = Tokenizer::from_hf_files(json, tokenizer_config.as_deref())?;
                (tokenizer, hf_chat_template(json.parent().unwrap_or(Path::new(".")), tokenizer_config.as_deref())?)
            }
            None => (Tokenizer::from_gguf(&weights_path, &metadata)?, None),
        };
        let gguf_template = metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        (ModelFormat::Gguf, config, tensors, tokenizer, side_template.or(gguf_template))
    };

    check_vocabulary(&tokenizer, &config, &weights_path)?;
    let template = choose_template(template_choice, own_template, &tokenizer)?;
    let weights_sha256 = if with_weights { Some(weights_digest(&files)?) } else { None };
    Ok(LoadedModel {
        name: name_or_path.to_string(),
        files,
        format,
        config,
        tokenizer,
        template,
        decoder: None,
        tensors,
        device: Device::Cpu,
        dtype: DType::F32,
        weights_sha256,
    })
}

/// A GGUF file's sha256, or for a Hugging Face folder the hash of its config's and
/// safetensors files' hashes.
fn weights_digest(files: &ModelFiles) -> Result<String> {
    if let Some(builtin) = files.builtin {
        return Ok(builtin.sha256.to_string());
    }
    let path = &files.weights;
    if !path.is_dir() {
        return pull::file_sha256(path);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") || p.ends_with("config.json"))
        .collect();
    names.sort();
    let mut listing = String::new();
    for file in &names {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        listing.push_str(&format!("{name} {}\n", pull::file_sha256(file)?));
    }
    Ok(crate::util::sha256_bytes(listing.as_bytes()))
}

/// Every ordinary token needs an embedding row. Added special tokens past the last row
/// exist in shared tokenizers (Gemma 3's `<image_soft_token>` in the text-only models):
/// those are reported, since they cannot be embedded, but do not stop the load.
fn check_vocabulary(tokenizer: &Tokenizer, config: &ModelConfig, path: &Path) -> Result<()> {
    let base = tokenizer.inner.get_vocab_size(false);
    if base > config.vocab_size {
        return Err(Error::mismatch(
            path,
            format!(
                "tokenizer has {base} tokens but the embedding has only {} rows",
                config.vocab_size
            ),
        ));
    }
    let beyond: Vec<String> = tokenizer
        .inner
        .get_added_vocabulary()
        .get_vocab()
        .iter()
        .filter(|(_, &id)| id as usize >= config.vocab_size)
        .map(|(token, id)| format!("{token} ({id})"))
        .collect();
    if !beyond.is_empty() {
        tracing::warn!(
            "{}: special tokens without an embedding row, never feed them to the model: {}",
            path.display(),
            beyond.join(", ")
        );
    }
    Ok(())
}

fn existing(path: PathBuf) -> Option<PathBuf> {
    path.exists().then_some(path)
}

fn choose_template(choice: Option<&str>, own: Option<String>, tokenizer: &Tokenizer) -> Result<ChatTemplate> {
    let bos = tokenizer.bos.as_ref().map(|t| t.text.clone());
    let eos = tokenizer.eos.as_ref().map(|t| t.text.clone());
    let source = match (choice.unwrap_or("auto"), own) {
        ("auto", Some(text)) | ("model", Some(text)) => TemplateSource::Model(text),
        ("auto", None) => TemplateSource::Builtin(BuiltinTemplate::Plain),
        ("model", None) => {
            return Err(Error::Template(
                "template `model` was asked for, but this model ships no chat template \
                 (choose chatml, tulu or plain)"
                    .into(),
            ))
        }
        (name, _) => TemplateSource::Builtin(name.parse()?),
    };
    ChatTemplate::new(source, bos, eos)
}

/// The template from `tokenizer_config.json` (a string, or a list of named templates) or
/// from a `chat_template.jinja` file beside it, as newer transformers save it.
fn hf_chat_template(dir: &Path, tokenizer_config: Option<&Path>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
    }
    let Some(path) = tokenizer_config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("invalid JSON at line {}: {e}", e.line())))?;
    Ok(match json.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}
