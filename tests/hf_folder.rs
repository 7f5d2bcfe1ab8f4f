//! Hugging Face folders: stories260K written out as config.json + safetensors (single file,
//! and sharded with an index) + tokenizer files loads back to the same model.

use candle_core::{Device, Tensor};
use grape_harness::model::{self, gguf, LoadOptions, Mode};
use std::collections::HashMap;
use std::path::Path;

mod common;

const STORIES: &str = "../shared/models/stories260K.gguf";

/// Writes stories260K as a Hugging Face folder, its tensors split over `shards` files.
fn write_folder(dir: &Path, shards: usize) {
    let file = gguf::load(Path::new(STORIES)).unwrap();
    std::fs::write(dir.join("config.json"), file.config.to_hf_json().to_string()).unwrap();
    let stories = model::inspect("stories260k", None).unwrap();
    stories.tokenizer.inner.save(dir.join("tokenizer.json"), false).unwrap();
    let template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}";
    let config = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();

    let mut names: Vec<&String> = file.tensors.keys().collect();
    names.sort();
    if shards == 1 {
        candle_core::safetensors::save(&file.tensors, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
        let shard_name = format!("model-{:05}-of-{shards:05}.safetensors", shard + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), file.tensors[*n].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&shard_name)).unwrap();
        for n in chunk {
            weight_map.insert((*n).clone(), shard_name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn logits(name: &str) -> Vec<f32> {
    let m = model::load(name, &LoadOptions::default()).unwrap();
    let ids = m.tokenizer.encode("Once upon a time, Lily saw a big dog").unwrap().get_ids().to_vec();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let decoder = m.decoder().unwrap();
    let hidden = decoder.forward(&x, &[ids.len()], None, Mode::Infer).unwrap();
    decoder.last_logits(&hidden, &[ids.len()]).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn single_and_sharded_folders_load_to_the_same_model() {
    if !Path::new(STORIES).exists() {
        return eprintln!("skipped: {STORIES} is not here");
    }
    let reference = logits("stories260k");
    for shards in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), shards);
        let folder = dir.path().to_str().unwrap();
        assert_eq!(logits(folder), reference, "{shards} shard(s)");
        let m = model::inspect(folder, None).unwrap();
        assert_eq!(m.format, model::ModelFormat::HuggingFace);
        assert_eq!(m.template.name(), "model");
        assert_eq!(m.tokenizer.bos.as_ref().unwrap().text, "<s>");
    }
}

/// The load error for a stories260K folder in `shards` files after `damage`; `None`
/// (skipped) when stories260K is not here.
fn load_error_after(shards: usize, damage: impl FnOnce(&Path)) -> Option<String> {
    if !Path::new(STORIES).exists() {
        eprintln!("skipped: {STORIES} is not here");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), shards);
    damage(dir.path());
    Some(model::load(dir.path().to_str().unwrap(), &LoadOptions::default()).err().unwrap().to_string())
}

#[test]
fn missing_shard_is_named() {
    let Some(err) = load_error_after(2, |dir| {
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    }) else {
        return;
    };
    assert!(err.contains("model.safetensors.index.json") && err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors_is_named() {
    let Some(err) = load_error_after(1, |dir| {
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    }) else {
        return;
    };
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

/// `harness model random` writes a folder every command loads: seeded weights (the same
/// seed, the same file), a tokenizer that decodes any id, and generation that runs to its
/// budget; an unknown shape is one clear error.
#[test]
fn a_random_model_of_a_given_shape_loads_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "model_type": "qwen2", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128
    });
    let shape = dir.path().join("tiny.json");
    std::fs::write(&shape, config.to_string()).unwrap();
    let write = |name: &str| {
        let out = dir.path().join(name);
        let args = ["model", "random", "--shape", shape.to_str().unwrap(), "--weights", "f32", "--out", out.to_str().unwrap()];
        common::succeeded(&common::harness(&args, dir.path()));
        out
    };
    let (a, b) = (write("a"), write("b"));
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b));

    let m = model::load(a.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(m.config.vocab_size, 300);
    let prompt = grape_harness::generate::prompt_ids(&m, "t5 t17 t299", "").unwrap();
    let options = grape_harness::generate::GenerateOptions { max_new_tokens: 6, ..Default::default() };
    let out = grape_harness::generate::generate(&m, &[prompt], &options, |_| {}).unwrap();
    assert_eq!(out[0].new_tokens, 6, "{out:?}");

    let unknown = common::harness(&["model", "random", "--shape", "gpt-5", "--out", "x"], dir.path());
    assert!(common::one_error_line(&unknown).contains("expected one of smollm2-135m, qwen2.5-0.5b, llama-3.1-8b"));
}
