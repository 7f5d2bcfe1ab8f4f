//! SmolLM2 and Gemma 3 against candle-transformers' quantized implementations run with
//! every weight dequantised to f32 (`CANDLE_DEQUANTIZE_ALL`): the same weights we load,
//! without the 8-bit activation rounding of quantised matmuls. Agreement here is exact
//! up to f32 arithmetic, which pins any gap in `real_models.rs` on quantisation alone.
//! Its own test binary because candle reads that variable once per thread.
//!
//! candle-transformers' `quantized_gemma3` gates its MLP with SiLU, but Gemma 3 uses
//! GELU-tanh (`gelu_pytorch_tanh` in transformers, `LLM_FFN_GELU` in llama.cpp), which we
//! implement. So Gemma 3 is compared with our activation switched to SiLU: exact agreement
//! then shows every other part (norm offsets, q/k norms, both rope bases, the layer
//! pattern, the embedding scale) matches, and the activation is the only difference.

use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama};
use candle_core::DType;
use grape_harness::model::config::Activation;
use grape_harness::model::{self, gguf, Decoder, Mode};

const PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The quick brown fox jumps over the",
];

fn compare(name: &str, activation: Activation, mut theirs: impl FnMut(&std::path::Path, &Tensor) -> Tensor) {
    let m = match model::inspect(name, None) {
        Ok(m) => m,
        Err(e) => return eprintln!("skipped: model `{name}` is not available here: {e}"),
    };
    let mut file = gguf::load(&m.files.weights).unwrap();
    file.config.activation = activation;
    let decoder = Decoder::from_tensors(&file.config, file.tensors, DType::F32, &Device::Cpu, &m.files.weights).unwrap();
    for prompt in PROMPTS {
        let mut ids: Vec<u32> = m.tokenizer.bos.iter().filter(|_| m.tokenizer.add_bos).map(|b| b.id).collect();
        ids.extend_from_slice(m.tokenizer.encode(prompt).unwrap().get_ids());
        let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let hidden = decoder.forward(&x, &[ids.len()], None, Mode::Infer).unwrap();
        let ours = decoder.last_logits(&hidden, &[ids.len()]).unwrap().flatten_all().unwrap();
        let expected = theirs(&m.files.weights, &x).flatten_all().unwrap();
        let diff = (&ours - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        println!("{name} {prompt:?}: max |ours - dequantised candle| = {diff:e}");
        assert!(diff < 2e-3, "{name} {prompt:?}: logits differ by {diff}");
    }
}

#[test]
fn real_models_match_dequantized_candle() {
    // Set before any quantised matmul is built on this thread; nothing else runs here.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    compare("smollm2-135m-instruct", Activation::Silu, |path, x| {
        let (content, mut reader) = gguf::read_metadata(path).unwrap();
        let mut q = quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
        q.forward(x, 0).unwrap()
    });
    compare("gemma3-270m", Activation::Silu, |path, x| {
        let (content, mut reader) = gguf::read_metadata(path).unwrap();
        let mut q = quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
        q.forward(x, 0).unwrap()
    });
}
