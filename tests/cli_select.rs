//! `harness score`, `harness select` and `harness pool stats` end to end on stories260K
//! and a small pool, and their answers to bad input.

use std::path::Path;

mod common;

use common::{harness, have, succeeded, STORIES};


const POOL: &str = r#"{"instruction_id": 1, "prompt": "Tell me about a cat.", "response": "The cat sat on the mat.", "source": "alpha"}
{"instruction_id": 1, "prompt": "Tell me about a cat.", "response": "A big cat ran home to its mom.", "source": "beta"}
{"instruction_id": 2, "prompt": "Who is Lily?", "response": "Lily is a little girl who likes to play.", "source": "alpha"}
{"instruction_id": 2, "prompt": "Who is Lily?", "response": "She is my friend.", "source": "beta"}
{"instruction_id": 3, "prompt": "Say hi.", "response": "Hi!", "source": "beta"}
"#;

#[test]
fn score_select_and_stats() {
    if !have(&[STORIES]) {
        return;
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
    // So is the same model under another scoring template.
    let qa = ["--score-template", "question-answer", "--out", out.to_str().unwrap()];
    let err = common::one_error_line(&harness(&[&args[..], &qa].concat(), &cache));
    assert!(err.contains("scores.parquet") && err.contains("fingerprint"), "{err}");
    let qa_scores = dir.path().join("qa.parquet");
    let qa_args = ["score", "--model", "stories260k", "--pool", pool_s, "--score-template", "question-answer", "--out"];
    let said = succeeded(&harness(&[&qa_args[..], &[qa_scores.to_str().unwrap()]].concat(), &cache));
    assert!(said.contains("scored 5 new candidates"), "{said}");
    let err = common::one_error_line(&harness(&["score", "--model", "stories260k", "--pool", pool_s, "--out", qa_scores.to_str().unwrap()], &cache));
    assert!(err.contains("qa.parquet") && err.contains("fingerprint"), "{err}");
    // A store made at another maximum length is explained, not silently rescored.
    let err = common::one_error_line(&harness(&[&args[..], &["--max-len", "64", "--out", out.to_str().unwrap()]].concat(), &cache));
    assert!(err.contains("--max-len 2048, not 64"), "{err}");
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

#[test]
fn three_shards_merge_to_the_unsharded_scores_and_gaps_are_refused() {
    if !have(&[STORIES]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = dir.path().join("pool.jsonl");
    let rows: String = (0..9)
        .flat_map(|i| {
            ["alpha", "beta"].map(move |s| {
                let row = serde_json::json!({"instruction_id": i, "prompt": format!("Tell me story {i}."), "response": format!("Once upon a time {s} saw {i} cats."), "source": s});
                format!("{row}\n")
            })
        })
        .collect();
    std::fs::write(&pool, rows).unwrap();
    let pool_s = pool.to_str().unwrap();
    let store = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    succeeded(&harness(&["score", "--model", "stories260k", "--pool", pool_s, "--out", &store("whole.parquet")], &cache));
    let mut parts = Vec::new();
    for i in 0..3 {
        let part = store(&format!("part{i}.parquet"));
        let said = succeeded(&harness(&["score", "--model", "stories260k", "--pool", pool_s, "--shard", &format!("{i}/3"), "--out", &part], &cache));
        assert!(said.contains(&format!("shard {i}/3:")), "{said}");
        parts.push(part);
    }
    let merged = store("merged.parquet");
    let said = succeeded(&harness(&[&["merge-scores", "--out", &merged][..], &parts.iter().map(String::as_str).collect::<Vec<_>>()].concat(), &cache));
    assert!(said.contains("merged 18 scores from 3 shards"), "{said}");
    let (whole, merged) = (
        grape_harness::score::ScoreStore::open_existing(Path::new(&store("whole.parquet"))).unwrap(),
        grape_harness::score::ScoreStore::open_existing(Path::new(&merged)).unwrap(),
    );
    assert_eq!(whole.len(), 18);
    assert_eq!(merged.len(), 18);
    for ((max_len, pair), score) in whole.entries() {
        let other = merged.get(*max_len, pair).expect("every pair merged");
        assert!((score.sum_logprob - other.sum_logprob).abs() < 1e-3, "{} vs {}", score.sum_logprob, other.sum_logprob);
        assert_eq!(score.n_tokens, other.n_tokens);
    }

    let refuse = |parts: &[&str]| common::one_error_line(&harness(&[&["merge-scores", "--out", &store("bad.parquet")][..], parts].concat(), &cache));
    let err = refuse(&[&parts[0], &parts[1]]);
    assert!(err.contains("shard 2/3 is missing"), "{err}");
    let err = refuse(&[&parts[0], &parts[1], &parts[1], &parts[2]]);
    assert!(err.contains("shard 1/3 is given twice"), "{err}");
    let err = refuse(&[&store("whole.parquet")]);
    assert!(err.contains("not a finished shard"), "{err}");
    let bad = harness(&["score", "--model", "stories260k", "--pool", pool_s, "--shard", "3/3", "--out", &store("x.parquet")], &cache);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("0 <= i < N"));
}
