//! `harness score`, `harness select` and `harness pool stats` end to end on stories260K
//! and a small pool, and their answers to bad input.

use std::path::Path;
use std::process::{Command, Output};

mod common;

fn harness(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .env("HARNESS_CACHE_DIR", cache)
        .output()
        .unwrap()
}

fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}


const POOL: &str = r#"{"instruction_id": 1, "prompt": "Tell me about a cat.", "response": "The cat sat on the mat.", "source": "alpha"}
{"instruction_id": 1, "prompt": "Tell me about a cat.", "response": "A big cat ran home to its mom.", "source": "beta"}
{"instruction_id": 2, "prompt": "Who is Lily?", "response": "Lily is a little girl who likes to play.", "source": "alpha"}
{"instruction_id": 2, "prompt": "Who is Lily?", "response": "She is my friend.", "source": "beta"}
{"instruction_id": 3, "prompt": "Say hi.", "response": "Hi!", "source": "beta"}
"#;

#[test]
fn score_select_and_stats() {
    let stories = Path::new("../shared/models/stories260K.gguf");
    if !stories.exists() {
        return eprintln!("skipped: {} is not here", stories.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = dir.path().join("pool.jsonl");
    std::fs::write(&pool, POOL).unwrap();
    let scores = dir.path().join("scores.parquet");
    let (pool_s, scores_s) = (pool.to_str().unwrap(), scores.to_str().unwrap());

    let first = succeeded(&harness(&["score", "--model", "stories260k", "--pool", pool_s, "--out", scores_s], &cache));
    assert!(first.contains("scored 5 new candidates"), "{first}");
    let second = succeeded(&harness(&["score", "--model", "stories260k", "--pool", pool_s, "--out", scores_s], &cache));
    assert!(second.contains("scored 0 new candidates") && second.contains("reused 5"), "{second}");

    let out = dir.path().join("grape");
    let args = ["select", "--selector", "grape", "--model", "stories260k", "--pool", pool_s, "--scores", scores_s];
    let said = succeeded(&harness(&[&args[..], &["--out", out.to_str().unwrap()]].concat(), &cache));
    assert!(said.contains("grape: 3 picks from 3 instructions, 1 flagged"), "{said}");
    assert!(said.contains("scored 0 new"), "the store is reused: {said}");
    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3);

    let random = dir.path().join("random");
    let said = succeeded(&harness(
        &["select", "--selector", "random", "--pool", pool_s, "--seed", "3", "--out", random.to_str().unwrap()],
        &cache,
    ));
    assert!(said.contains("random: 3 picks"), "random needs no model: {said}");

    let stats = succeeded(&harness(
        &["pool", "stats", "--pool", pool_s, "--scores", scores_s, "--selection", random.to_str().unwrap(), "--json"],
        &cache,
    ));
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["pool"]["candidates"], 5);
    assert_eq!(stats["pool"]["single_candidate_instructions"], 1);
    assert_eq!(stats["length_correlation"]["scored"], 5);
    let shares: u64 = stats["grape_source_shares"].as_array().unwrap().iter().map(|s| s["picks"].as_u64().unwrap()).sum();
    assert_eq!(shares, 3);
    // grape/sum, grape/mean, grape/bytes, lowest and the random selection: ten pairs.
    assert_eq!(stats["jaccard"].as_array().unwrap().len(), 10);

    // The same store under another chat template is another model: refused, not mixed.
    let err = common::one_error_line(&harness(&[&args[..], &["--template", "chatml", "--out", out.to_str().unwrap()]].concat(), &cache));
    assert!(err.contains("scores.parquet") && err.contains("fingerprint"), "{err}");
}

#[test]
fn bad_selection_input_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let pool = dir.path().join("pool.jsonl");
    std::fs::write(&pool, POOL).unwrap();
    let out = dir.path().join("out");
    let out_s = out.to_str().unwrap();

    let err = common::one_error_line(&harness(&["select", "--selector", "random", "--pool", empty.to_str().unwrap(), "--out", out_s], &cache));
    assert!(err.contains("empty.jsonl") && err.contains("no usable candidate"), "{err}");

    let pool_s = pool.to_str().unwrap();
    let err = common::one_error_line(&harness(
        &["select", "--selector", "strongest", "--param", "source=gamma", "--pool", pool_s, "--out", out_s],
        &cache,
    ));
    assert!(err.contains("gamma") && err.contains("alpha") && err.contains("beta"), "{err}");

    let err = common::one_error_line(&harness(&["select", "--selector", "grape", "--pool", pool_s, "--out", out_s], &cache));
    assert!(err.contains("--model"), "{err}");

    let err = common::one_error_line(&harness(&["select", "--selector", "best", "--pool", pool_s, "--out", out_s], &cache));
    assert!(err.contains("unknown selector `best`") && err.contains("grape"), "{err}");

    let err = common::one_error_line(&harness(&["pool", "stats", "--pool", pool_s, "--column", "response"], &cache));
    assert!(err.contains("KEY=NAME"), "{err}");
}
