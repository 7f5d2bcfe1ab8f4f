//! Properties of our decoder that candle-transformers cannot check for us: the KV cache
//! (prefix sharing, step-by-step decoding), the training path and its gradients.

use candle_core::{DType, Device, IndexOp, Tensor};
use grape_harness::model::weights;
use grape_harness::model::{Decoder, KvCache, ModelConfig, Mode, TrainingBatch};
use serde_json::json;
use std::path::Path;

fn tiny(arch: &str) -> ModelConfig {
    let json = match arch {
        "llama" => json!({
            "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256
        }),
        "gemma3" => json!({
            "model_type": "gemma3_text", "vocab_size": 67, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
            "max_position_embeddings": 256, "sliding_window": 4, "sliding_window_pattern": 2,
            "query_pre_attn_scalar": 16, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0
        }),
        other => panic!("no tiny config for {other}"),
    };
    ModelConfig::from_hf_json(Path::new("tiny.json"), &json.to_string()).unwrap()
}

fn decoder(cfg: &ModelConfig, dtype: DType) -> Decoder {
    let tensors = weights::random(cfg, 3, &Device::Cpu).unwrap();
    Decoder::from_tensors(cfg, tensors, dtype, &Device::Cpu, Path::new("random")).unwrap()
}

fn ids(rows: &[&[u32]]) -> (Tensor, Vec<usize>) {
    let width = rows.iter().map(|r| r.len()).max().unwrap();
    let mut flat = Vec::new();
    for row in rows {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(0, width - row.len()));
    }
    let lengths = rows.iter().map(|r| r.len()).collect();
    (Tensor::from_vec(flat, (rows.len(), width), &Device::Cpu).unwrap(), lengths)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// One prompt computed once and continued by two responses of different lengths gives
/// the same hidden states as running each full sequence from scratch; the long case spans
/// several attention query blocks.
#[test]
fn shared_prefix_cache_equals_full_forward() {
    let long_a: Vec<u32> = (0..200).map(|i| (i * 5 + 1) % 60).collect();
    let long_b: Vec<u32> = (0..150).map(|i| (i * 3 + 2) % 60).collect();
    let cases: [(&[u32], [&[u32]; 2]); 2] = [
        (&[5, 9, 2, 17, 33], [&[8, 1, 40, 3], &[12, 7, 7, 21, 50, 6]]),
        (&long_b[..40], [&long_a, &long_b]),
    ];
    for arch in ["llama", "gemma3"] {
        let cfg = tiny(arch);
        let model = decoder(&cfg, DType::F32);
        for (prompt, responses) in &cases {
            let mut cache = KvCache::new(cfg.num_layers);
            let (p, p_len) = ids(&[prompt]);
            model.forward(&p, &p_len, Some(&mut cache), Mode::Infer).unwrap();
            let mut cache = cache.expand(2).unwrap();
            let (r, r_len) = ids(responses);
            let cached = model.forward(&r, &r_len, Some(&mut cache), Mode::Infer).unwrap();

            for (row, response) in responses.iter().enumerate() {
                let full: Vec<u32> = prompt.iter().chain(response.iter()).copied().collect();
                let (f, f_len) = ids(&[&full]);
                let alone = model.forward(&f, &f_len, None, Mode::Infer).unwrap();
                let expected = alone.i((0, prompt.len()..full.len())).unwrap();
                let got = cached.i((row, ..response.len())).unwrap();
                let diff = max_diff(&got, &expected);
                assert!(diff < 1e-5, "{arch} row {row}: cached prefix differs by {diff}");
            }
        }
    }
}

/// Feeding tokens one at a time through the cache reproduces the full forward pass,
/// including past the sliding window.
#[test]
fn incremental_decoding_equals_full_forward() {
    for arch in ["llama", "gemma3"] {
        let cfg = tiny(arch);
        let model = decoder(&cfg, DType::F32);
        let tokens: Vec<u32> = (0..10).map(|i| (i * 13 + 4) % cfg.vocab_size as u32).collect();
        let (all, all_len) = ids(&[&tokens]);
        let full = model.forward(&all, &all_len, None, Mode::Infer).unwrap();
        let mut cache = KvCache::new(cfg.num_layers);
        for (t, &token) in tokens.iter().enumerate() {
            let (one, one_len) = ids(&[&[token]]);
            let h = model.forward(&one, &one_len, Some(&mut cache), Mode::Infer).unwrap();
            let diff = max_diff(&h.i((0, 0)).unwrap(), &full.i((0, t)).unwrap());
            assert!(diff < 1e-5, "{arch} step {t}: differs by {diff}");
        }
        assert_eq!(cache.next_positions(), vec![tokens.len()]);
    }
}

/// The differentiable path computes the same function as the fused inference path.
#[test]
fn train_mode_matches_infer_mode() {
    for arch in ["llama", "gemma3"] {
        let cfg = tiny(arch);
        let model = decoder(&cfg, DType::F32);
        let (x, len) = ids(&[&[1, 2, 3, 4, 5, 6, 7], &[9, 8, 7]]);
        let a = model.forward(&x, &len, None, Mode::Infer).unwrap();
        let b = model.forward(&x, &len, None, Mode::Train).unwrap();
        let diff = max_diff(&a, &b);
        assert!(diff < 1e-5, "{arch}: train and infer paths differ by {diff}");
    }
}

fn response_loss(model: &Decoder, x: &Tensor, lengths: &[usize]) -> Tensor {
    let hidden = model.forward(x, lengths, None, Mode::Train).unwrap();
    let (_, t) = x.dims2().unwrap();
    let flat: Vec<u32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, &len) in lengths.iter().enumerate() {
        for pos in 0..len - 1 {
            rows.push((b * t + pos) as u32);
            targets.push(flat[b * t + pos + 1]);
        }
    }
    model.target_logprobs(&hidden, &rows, &targets).unwrap().mean_all().unwrap().neg().unwrap()
}

/// A tiny trainable model and a padded two-row batch to take gradients on.
fn trainable(arch: &str, dtype: DType) -> (ModelConfig, Decoder, candle_nn::VarMap, Tensor, Vec<usize>) {
    let cfg = tiny(arch);
    let tensors = weights::random(&cfg, 5, &Device::Cpu).unwrap();
    let (model, vars) = Decoder::trainable(&cfg, tensors, dtype, &Device::Cpu, Path::new("random")).unwrap();
    let (x, len) = ids(&[&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[9, 8, 7, 30, 31]]);
    (cfg, model, vars, x, len)
}

#[test]
fn every_parameter_gets_a_finite_nonzero_gradient() {
    for arch in ["llama", "gemma3"] {
        let (cfg, model, vars, x, len) = trainable(arch, DType::F32);
        let grads = response_loss(&model, &x, &len).backward().unwrap();
        let data = vars.data().lock().unwrap();
        assert_eq!(data.len(), weights::expected(&cfg).len());
        for (name, var) in data.iter() {
            let grad = grads.get(var).unwrap_or_else(|| panic!("{arch}: no gradient for {name}"));
            let values: Vec<f32> = grad.flatten_all().unwrap().to_vec1().unwrap();
            assert!(values.iter().all(|g| g.is_finite()), "{arch}: non-finite gradient in {name}");
            assert!(values.iter().any(|g| *g != 0.0), "{arch}: zero gradient for {name}");
        }
    }
}

/// Central differences in f64 agree with autograd on weights from every kind of tensor.
#[test]
fn gradients_match_finite_differences() {
    for arch in ["llama", "gemma3"] {
        let (cfg, model, vars, x, len) = trainable(arch, DType::F64);
        let loss = |m: &Decoder| response_loss(m, &x, &len).to_scalar::<f64>().unwrap();
        let grads = response_loss(&model, &x, &len).backward().unwrap();
        let probes = [
            ("model.embed_tokens.weight", 3 * cfg.hidden_size + 5),
            ("model.layers.0.self_attn.q_proj.weight", 7),
            ("model.layers.1.self_attn.k_proj.weight", 40),
            ("model.layers.0.mlp.down_proj.weight", 11),
            ("model.layers.1.input_layernorm.weight", 2),
            ("model.norm.weight", 9),
        ];
        let data = vars.data().lock().unwrap();
        for (name, index) in probes {
            let var = &data[name];
            let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let analytic = grads.get(var).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()[index];
            let eps = 1e-5;
            let at = |delta: f64| {
                let mut w = original.clone();
                w[index] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).unwrap()).unwrap();
                loss(&model)
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(original, var.shape(), &Device::Cpu).unwrap()).unwrap();
            let err = (numeric - analytic).abs() / analytic.abs().max(1e-6);
            println!("{arch} {name}[{index}]: autograd {analytic:e}, finite difference {numeric:e}");
            assert!(err < 1e-4, "{arch} {name}[{index}]: autograd {analytic} vs numeric {numeric}");
        }
    }
}

/// The hand-written backward pass (the Llama family on the CPU in f32) against autograd:
/// the same loss and the same gradient for every weight, on a padded batch whose long row
/// spans three attention query blocks, with grouped queries, untied and tied heads, q/k/v
/// biases and sliding windows.
#[test]
fn hand_written_backward_matches_autograd() {
    let variants = [
        ("llama, untied head", json!({"model_type": "llama"})),
        ("qwen2, biases, tied head, second layer sliding", json!({
            "model_type": "qwen2", "tie_word_embeddings": true, "use_sliding_window": true,
            "sliding_window": 50, "max_window_layers": 1
        })),
        ("mistral, every layer sliding", json!({"model_type": "mistral", "sliding_window": 64})),
    ];
    let long: Vec<u32> = (0..300).map(|i| (i * 7 + 3) % 61).collect();
    let short: Vec<u32> = (0..170).map(|i| (i * 11 + 5) % 61).collect();
    let (input_ids, lengths) = ids(&[&long, &short]);
    let width = long.len();
    let (mut rows, mut targets) = (Vec::new(), Vec::new());
    for (b, row) in [&long, &short].into_iter().enumerate() {
        for pos in 10..row.len() - 1 {
            rows.push((b * width + pos) as u32);
            targets.push(row[pos + 1]);
        }
    }
    let weight = -1.0 / rows.len() as f64;
    let batch = TrainingBatch { input_ids, lengths, rows, targets };
    for (what, overrides) in variants {
        let mut json = json!({
            "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 512
        });
        json.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        let cfg = ModelConfig::from_hf_json(Path::new("tiny.json"), &json.to_string()).unwrap();
        let tensors = weights::random(&cfg, 9, &Device::Cpu).unwrap();
        let (model, vars) = Decoder::trainable(&cfg, tensors, DType::F32, &Device::Cpu, Path::new("random")).unwrap();
        let Decoder::Llama(llama) = &model else { panic!("{what}: not the Llama family") };
        assert!(llama.backward_by_hand_applies(), "{what}");
        let (loss, by_hand) = llama.loss_and_grads_by_hand(&batch, weight).unwrap();
        let (reference, autograd) = model.loss_and_grads_by_autograd(&batch, weight).unwrap();
        assert!((loss - reference).abs() < 1e-5, "{what}: loss {loss} vs {reference}");
        for (name, var) in vars.data().lock().unwrap().iter() {
            let ours = by_hand.get(var).unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
            let theirs = autograd.get(var).unwrap();
            let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
            let gap = max_diff(ours, theirs) / scale;
            assert!(gap < 1e-4, "{what}: {name} differs by {gap} of its largest entry");
        }
    }
}
