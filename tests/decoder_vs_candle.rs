//! Our decoder against candle-transformers' own implementation of each architecture, on
//! seeded random weights: last-position logits must agree within 1e-4 (f32).

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models as ct;
use grape_harness::model::weights::{self, TensorMap};
use grape_harness::model::{Decoder, ModelConfig, Mode};
use serde_json::{json, Value};
use std::path::Path;

const TOLERANCE: f32 = 1e-4;

fn config(json: &Value) -> ModelConfig {
    ModelConfig::from_hf_json(Path::new("test-config.json"), &json.to_string()).unwrap()
}

fn ours(cfg: &ModelConfig, tensors: &TensorMap) -> Decoder {
    Decoder::from_tensors(cfg, tensors.clone(), DType::F32, &Device::Cpu, Path::new("random")).unwrap()
}

fn their_vb(tensors: &TensorMap) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu)
}

/// Two rows of 12 tokens, ids spread over the vocabulary.
fn input_ids(vocab: u32) -> Tensor {
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 11) % vocab).collect();
    Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap()
}

fn our_last_logits(decoder: &Decoder, ids: &Tensor) -> Tensor {
    let (b, t) = ids.dims2().unwrap();
    let lengths = vec![t; b];
    let hidden = decoder.forward(ids, &lengths, None, Mode::Infer).unwrap();
    decoder.last_logits(&hidden, &lengths).unwrap()
}

fn assert_close(ours: &Tensor, theirs: &Tensor, what: &str) {
    let theirs = theirs.reshape(ours.shape()).unwrap();
    let diff = (ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    println!("{what}: max |ours - candle| = {diff:e}");
    assert!(diff < TOLERANCE, "{what}: logits differ by {diff}");
}

fn llama_json(extra: Value) -> Value {
    let mut base = json!({
        "model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "tie_word_embeddings": false
    });
    base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    base
}

fn check_llama(json: Value, what: &str) {
    let cfg = config(&json);
    let tensors = weights::random(&cfg, 7, &Device::Cpu).unwrap();
    let ids = input_ids(cfg.vocab_size as u32);
    let theirs_cfg: ct::llama::LlamaConfig = serde_json::from_value(json).unwrap();
    let theirs_cfg = theirs_cfg.into_config(false);
    let theirs = ct::llama::Llama::load(their_vb(&tensors), &theirs_cfg).unwrap();
    let mut cache = ct::llama::Cache::new(false, DType::F32, &theirs_cfg, &Device::Cpu).unwrap();
    let expected = theirs.forward(&ids, 0, &mut cache).unwrap();
    assert_close(&our_last_logits(&ours(&cfg, &tensors), &ids), &expected, what);
}

#[test]
fn llama_matches_candle() {
    check_llama(llama_json(json!({})), "llama");
}

#[test]
fn llama_tied_embeddings_match_candle() {
    check_llama(llama_json(json!({"tie_word_embeddings": true})), "llama (tied, SmolLM2-like)");
}

#[test]
fn llama3_rope_scaling_matches_candle() {
    check_llama(
        llama_json(json!({"rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8
        }})),
        "llama 3.1 rope scaling",
    );
}

fn mistral_json(sliding_window: Option<usize>) -> Value {
    json!({
        "model_type": "mistral", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 80,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
        "max_position_embeddings": 64, "sliding_window": sliding_window, "hidden_act": "silu"
    })
}

fn check_mistral(our_window: Option<usize>, their_window: Option<usize>, what: &str) {
    let cfg = config(&mistral_json(our_window));
    let tensors = weights::random(&cfg, 11, &Device::Cpu).unwrap();
    let ids = input_ids(cfg.vocab_size as u32);
    let theirs_cfg: ct::mistral::Config = serde_json::from_value(mistral_json(their_window)).unwrap();
    let mut theirs = ct::mistral::Model::new(&theirs_cfg, their_vb(&tensors)).unwrap();
    let expected = theirs.forward(&ids, 0).unwrap();
    assert_close(&our_last_logits(&ours(&cfg, &tensors), &ids), &expected, what);
}

#[test]
fn mistral_matches_candle() {
    check_mistral(None, None, "mistral");
}

/// candle lets a query see `window + 1` keys; Hugging Face and llama.cpp see `window`
/// (`i - j < window`). We follow the latter, so our window 5 equals candle's 4.
#[test]
fn mistral_sliding_window_matches_candle_shifted_by_one() {
    check_mistral(Some(5), Some(4), "mistral, sliding window 5 over 12 tokens");
}

fn qwen2_json(tie: bool) -> Value {
    json!({
        "model_type": "qwen2", "vocab_size": 89, "hidden_size": 48, "intermediate_size": 72,
        "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 64,
        "sliding_window": 64, "max_window_layers": 2, "use_sliding_window": false,
        "tie_word_embeddings": tie, "hidden_act": "silu"
    })
}

#[test]
fn qwen2_matches_candle() {
    for tie in [false, true] {
        let json = qwen2_json(tie);
        let cfg = config(&json);
        assert!(cfg.attention_bias, "qwen2 has q/k/v biases");
        let tensors = weights::random(&cfg, 13, &Device::Cpu).unwrap();
        let ids = input_ids(cfg.vocab_size as u32);
        let theirs_cfg: ct::qwen2::Config = serde_json::from_value(json).unwrap();
        let mut theirs = ct::qwen2::ModelForCausalLM::new(&theirs_cfg, their_vb(&tensors)).unwrap();
        let expected = theirs.forward(&ids, 0).unwrap();
        assert_close(&our_last_logits(&ours(&cfg, &tensors), &ids), &expected, &format!("qwen2 (tied: {tie})"));
    }
}

fn gemma3_json(sliding_window: usize) -> Value {
    json!({
        "model_type": "gemma3_text", "vocab_size": 103, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "max_position_embeddings": 64, "sliding_window": sliding_window, "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 32, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": false,
        "final_logit_softcapping": null, "attn_logit_softcapping": null
    })
}

/// Layers 0 and 1 slide over a short window, layer 2 is global: the test covers both
/// rope bases, q/k norms, the sandwich norms, GeGLU and the embedding scale.
///
/// candle's gemma3 cannot prefill several tokens on the CPU (its KV cache rejects the
/// non-contiguous values), so it is fed one token at a time; its rotating cache then
/// holds exactly `window` keys, the Hugging Face semantics we implement.
#[test]
fn gemma3_matches_candle() {
    let cfg = config(&gemma3_json(4));
    assert_eq!(cfg.sliding_layers, vec![true, true, false]);
    let tensors = weights::random(&cfg, 17, &Device::Cpu).unwrap();
    let ids = input_ids(cfg.vocab_size as u32);
    let theirs_cfg: ct::gemma3::Config = serde_json::from_value(gemma3_json(4)).unwrap();
    let mut theirs = ct::gemma3::Model::new(false, &theirs_cfg, their_vb(&tensors)).unwrap();
    let mut expected = None;
    for t in 0..ids.dim(1).unwrap() {
        expected = Some(theirs.forward(&ids.i((.., t..t + 1)).unwrap(), t).unwrap());
    }
    assert_close(&our_last_logits(&ours(&cfg, &tensors), &ids), &expected.unwrap(), "gemma3");
}

/// A right-padded batch gives each row the logits it gets alone.
#[test]
fn padded_rows_match_unpadded_candle_rows() {
    let json = llama_json(json!({}));
    let cfg = config(&json);
    let tensors = weights::random(&cfg, 19, &Device::Cpu).unwrap();
    let ids = input_ids(cfg.vocab_size as u32);
    let lengths = [12usize, 7];
    let decoder = ours(&cfg, &tensors);
    let hidden = decoder.forward(&ids, &lengths, None, Mode::Infer).unwrap();
    let logits = decoder.last_logits(&hidden, &lengths).unwrap();

    let theirs_cfg: ct::llama::LlamaConfig = serde_json::from_value(json).unwrap();
    let theirs_cfg = theirs_cfg.into_config(false);
    let theirs = ct::llama::Llama::load(their_vb(&tensors), &theirs_cfg).unwrap();
    for (row, &len) in lengths.iter().enumerate() {
        let mut cache = ct::llama::Cache::new(false, DType::F32, &theirs_cfg, &Device::Cpu).unwrap();
        let alone = ids.i((row..row + 1, ..len)).unwrap();
        let expected = theirs.forward(&alone, 0, &mut cache).unwrap();
        assert_close(&logits.i(row..row + 1).unwrap(), &expected, &format!("row {row} of length {len}"));
    }
}

/// Sequences longer than one attention query block (128), right-padded, with a sliding
/// window: each row equals candle on that row alone.
#[test]
fn long_padded_rows_match_candle() {
    let json = mistral_json(Some(101));
    let mut json_long = json.clone();
    json_long["max_position_embeddings"] = 512.into();
    let cfg = config(&json_long);
    let tensors = weights::random(&cfg, 23, &Device::Cpu).unwrap();
    let vocab = cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..600u32).map(|i| (i * 7 + 3) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, 300), &Device::Cpu).unwrap();
    let lengths = [300usize, 203];
    let decoder = ours(&cfg, &tensors);
    let hidden = decoder.forward(&ids, &lengths, None, Mode::Infer).unwrap();
    let logits = decoder.last_logits(&hidden, &lengths).unwrap();

    let mut theirs_json = json_long.clone();
    theirs_json["sliding_window"] = 100.into();
    let theirs_cfg: ct::mistral::Config = serde_json::from_value(theirs_json).unwrap();
    for (row, &len) in lengths.iter().enumerate() {
        let mut theirs = ct::mistral::Model::new(&theirs_cfg, their_vb(&tensors)).unwrap();
        let expected = theirs.forward(&ids.i((row..row + 1, ..len)).unwrap(), 0).unwrap();
        assert_close(&logits.i(row..row + 1).unwrap(), &expected, &format!("row {row} of length {len}"));
    }
}
