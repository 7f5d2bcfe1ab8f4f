//! Helpers shared by the tests that run the `harness` binary.
#![allow(dead_code)] // each test file uses its own share of them

use std::path::Path;
use std::process::{Command, Output};

/// Runs `harness` with its model cache in `cache`.
pub fn harness(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harness")).args(args).env("HARNESS_CACHE_DIR", cache).output().unwrap()
}

/// Stdout of a run that must succeed.
pub fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Whether every file in `paths` (models, data under ../shared) is here; says which is not.
pub fn have(paths: &[&str]) -> bool {
    match paths.iter().map(Path::new).find(|p| !p.exists()) {
        Some(missing) => {
            eprintln!("skipped: {} is not here", missing.display());
            false
        }
        None => true,
    }
}

pub const STORIES: &str = "../shared/models/stories260K.gguf";

/// The single `error:` line of a run that must fail cleanly: non-zero exit, no panic.
pub fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    errors[0].to_string()
}

/// A few instructions with story-like candidates (stories260K knows the words): one to
/// four responses each, short and long.
pub fn story_groups() -> Vec<grape_harness::score::Group> {
    let g = |prompt: &str, responses: &[&str]| grape_harness::score::Group {
        prompt: prompt.into(),
        responses: responses.iter().map(|r| r.to_string()).collect(),
    };
    vec![
        g("Tell me a story about a cat.", &[
            "Once upon a time, there was a cat named Tom.",
            "The cat sat on the mat and was happy.",
            "Tom liked to play with a red ball. One day the ball rolled away and Tom ran after it.",
            "Meow.",
        ]),
        g("What did Lily find in the park?", &[
            "Lily found a big shiny rock in the park.",
            "She found a little bird that could not fly, so she took it home and gave it water.",
        ]),
        g("Why was the sun sad?", &["The sun was sad because the clouds hid it all day."]),
        g("Say something kind.", &["You are a good friend.", "Thank you for helping me today!", "I love you, mom."]),
    ]
}


/// 6 story-like instructions with 3 candidates each, in `dir`.
pub fn tiny_pool(dir: &Path) -> std::path::PathBuf {
    let prompts = ["Tell me about a cat.", "Who is Lily?", "Say hi.", "What did Tom find?", "Where is the ball?", "Why was Sue sad?"];
    let responses = [
        "The cat sat on the mat and was happy.",
        "Lily is a little girl who likes to play in the park.",
        "Once upon a time there was a big tree.",
        "He found a shiny red ball under the bed.",
        "It is in the garden next to the dog.",
        "She lost her toy and cried.",
        "The sun was warm and the birds sang.",
    ];
    let mut text = String::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (j, source) in ["alpha", "beta", "gamma"].iter().enumerate() {
            let response = responses[(i + j * 3) % responses.len()];
            let row = serde_json::json!({"instruction_id": i, "prompt": prompt, "response": response, "source": source});
            text += &format!("{row}\n");
        }
    }
    let path = dir.join("pool.jsonl");
    std::fs::write(&path, text).unwrap();
    path
}

/// The table without timings, which differ between runs.
pub fn comparable_results(path: &Path) -> serde_json::Value {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for row in json["rows"].as_array_mut().unwrap() {
        for key in ["seconds", "tokens_per_second"] {
            if let Some(train) = row["train"].as_object_mut() {
                train.remove(key);
            }
        }
        row.as_object_mut().unwrap().remove("selection_cost");
        row.as_object_mut().unwrap().remove("train_log");
    }
    json
}


/// The keys of the stages of `kind` a dry run names, sorted.
pub fn plan_keys(plan: &str, kind: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for word in plan.split_whitespace() {
        if let Some(key) = word.strip_prefix(&format!("{kind}/")) {
            if key.len() == 16 && !keys.iter().any(|k| k == key) {
                keys.push(key.to_string());
            }
        }
    }
    keys.sort();
    keys
}

/// The stage folders of `kind` under an experiment's runs folder, sorted.
pub fn stage_folders(root: &Path, kind: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(kind))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

/// An experiment `tiny` on stories260K and [`tiny_pool`], scoring up to 128 tokens; `rest` is
/// its selectors, training, evaluation and whatever else (YAML). Written to `dir/tiny.yaml`.
pub fn tiny_experiment(dir: &Path, rest: &str) -> std::path::PathBuf {
    let pool = tiny_pool(dir);
    let yaml = format!(
        "name: tiny\nseed: 3\ntargets:\n  - {{name: stories260K, model: stories260k}}\npool:\n  path: {}\n\
         scoring: {{max_len: 128}}\n{rest}",
        pool.display()
    );
    let path = dir.join("tiny.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}
