//! Bad model input gives one clear line naming the file and the problem, a non-zero exit,
//! and never a panic.

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

const STORIES: &str = "../shared/models/stories260K.gguf";

/// Runs `harness model info PATH` and returns stderr, asserting failure without a panic.
fn info_fails(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["model", "info"])
        .arg(path)
        .output()
        .unwrap();
    common::one_error_line(&out)
}

fn stories_available() -> bool {
    let ok = Path::new(STORIES).exists();
    if !ok {
        eprintln!("skipped: {STORIES} is not here (it ships in the project's shared/ folder)");
    }
    ok
}

/// Rewrites stories260K with `edit` applied to its metadata and tensors.
fn rewritten_stories(dir: &Path, edit: impl FnOnce(&mut Vec<(String, gguf_file::Value)>, &mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut file = std::fs::File::open(STORIES).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, gguf_file::Value)> = content.metadata.clone().into_iter().collect();
    let mut tensors: Vec<(String, Tensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let q = content.tensor(&mut file, name, &Device::Cpu).unwrap();
            (name.clone(), q.dequantize(&Device::Cpu).unwrap())
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let quantized: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let path = dir.join("edited.gguf");
    let mut out = std::fs::File::create(&path).unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = quantized.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md, &ts).unwrap();
    path
}

#[test]
fn missing_file() {
    let line = info_fails(Path::new("/nonexistent/model.gguf"));
    assert!(line.contains("/nonexistent/model.gguf"), "{line}");
    assert!(line.contains("no such file"), "{line}");
}

#[test]
fn truncated_gguf() {
    if !stories_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(STORIES).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["bench", "forward", "--shapes", "1x4", "--iterations", "1", "--model"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("truncated.gguf") && stderr.contains("truncated or corrupt"), "{stderr}");
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.gguf");
    std::fs::write(&path, b"this is not a model").unwrap();
    let line = info_fails(&path);
    assert!(line.contains("garbage.gguf") && line.contains("not a GGUF file"), "{line}");
}

#[test]
fn unknown_architecture_in_gguf() {
    if !stories_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten_stories(dir.path(), |md, _| {
        for (k, v) in md.iter_mut() {
            if k == "general.architecture" {
                *v = gguf_file::Value::String("mamba".into());
            }
        }
    });
    let line = info_fails(&path);
    assert!(line.contains("edited.gguf") && line.contains("unknown architecture `mamba`"), "{line}");
    assert!(line.contains("llama"), "should list what is supported: {line}");
}

#[test]
fn unknown_architecture_in_hf_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert", "hidden_size": 8}"#).unwrap();
    let line = info_fails(dir.path());
    assert!(line.contains("config.json") && line.contains("unknown architecture `bert`"), "{line}");
}

#[test]
fn wrong_field_type_in_hf_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "llama", "hidden_size": "sixty-four", "num_attention_heads": 4}"#,
    )
    .unwrap();
    let line = info_fails(dir.path());
    assert!(line.contains("config.json") && line.contains("field `hidden_size`"), "{line}");
}

#[test]
fn vocabulary_larger_than_embedding() {
    if !stories_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = rewritten_stories(dir.path(), |_, tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == "token_embd.weight" || name == "output.weight" {
                // quantize reads the whole storage, so give the slice storage of its own.
                let rows: Vec<f32> = t.narrow(0, 0, 256).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                *t = Tensor::from_vec(rows, (256, t.dim(1).unwrap()), &Device::Cpu).unwrap();
            }
        }
    });
    let line = info_fails(&path);
    assert!(line.contains("edited.gguf"), "{line}");
    assert!(line.contains("tokenizer has 512 tokens but the embedding has only 256 rows"), "{line}");
}

#[test]
fn unknown_builtin_name() {
    let line = info_fails(Path::new("llama-9000"));
    assert!(line.contains("llama-9000") && line.contains("smollm2-135m-instruct"), "{line}");
}
