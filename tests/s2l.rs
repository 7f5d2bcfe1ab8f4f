//! `harness select --selector s2l` end to end on stories260K and a tiny pool: a reference run
//! with snapshots, loss trajectories in Parquet, k-means and balanced sampling; and its
//! answers to bad input.

use std::path::Path;

mod common;

use common::{harness, have, STORIES};

/// 8 instructions with 3 candidates each, story-like so stories260K has something to learn.
fn pool(dir: &Path) -> String {
    let prompts = ["Tell me about a cat.", "Who is Lily?", "Say hi.", "What did Tom find?", "Where is the ball?",
        "Why was Sue sad?", "What is red?", "Name a dog."];
    let responses = ["The cat sat on the mat and was happy.", "Lily is a little girl who likes to play in the park.",
        "Once upon a time there was a big tree.", "He found a shiny red ball under the bed.", "It is in the garden.",
        "She lost her toy and cried.", "An apple is red.", "The dog is called Max."];
    let mut text = String::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for (j, source) in ["alpha", "beta", "gamma"].iter().enumerate() {
            let response = responses[(i + j * 3) % responses.len()];
            text += &serde_json::json!({"instruction_id": i, "prompt": prompt, "response": response, "source": source})
                .to_string();
            text.push('\n');
        }
    }
    let path = dir.join("pool.jsonl");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const REFERENCE: [&str; 12] = [
    "--param", "subset=0.5", "--param", "epochs=2", "--param", "checkpoints=3", "--param", "lr=0.001", "--param",
    "max_len=96", "--param", "micro_batch_tokens=192",
];

#[test]
fn s2l_selects_evenly_from_clusters_of_real_trajectories() {
    if !have(&[STORIES]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = pool(dir.path());
    let out = dir.path().join("s2l");
    let args = [
        &["select", "--selector", "s2l", "--model", "stories260k", "--pool", &pool, "--param", "k=3", "--seed", "5"][..],
        &REFERENCE[..],
        &["--out", out.to_str().unwrap()][..],
    ]
    .concat();
    let first = harness(&args, &cache);
    let said = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(first.status.success(), "{}{said}", String::from_utf8_lossy(&first.stderr));
    assert!(said.contains("s2l: 8 picks from 8 instructions"), "{said}");

    // One folder per (reference, settings, seed, pool).
    let work: Vec<_> = std::fs::read_dir(out.join("trajectories")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(work.len(), 1, "{work:?}");
    let table = work[0].join("trajectories.parquet");
    assert!(table.exists());
    let snapshots = std::fs::read_dir(work[0].join("reference/snapshots")).unwrap().count();
    assert!((3..=4).contains(&snapshots), "{snapshots} snapshots");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let sizes: Vec<u64> = report["cluster_sizes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(sizes.iter().sum::<u64>(), 24, "{report}");
    assert!(report["cost"]["train_tokens"].as_u64().unwrap() > 0 && report["cost"]["score_tokens"].as_u64().unwrap() > 0);
    let manifest = std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = manifest.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 8);
    assert!(rows.iter().all(|r| r["detail"]["cluster"].as_u64().is_some_and(|c| c < 3)), "{manifest}");
    let taken: Vec<u64> = report["picks_per_cluster"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let open: Vec<u64> = taken.iter().zip(&sizes).filter(|(t, s)| t < s).map(|(t, _)| *t).collect();
    assert!(open.iter().max().unwrap() - open.iter().min().unwrap() <= 1, "{taken:?} of {sizes:?}");

    // A rerun reads the trajectories back and draws the same selection.
    let modified = std::fs::metadata(&table).unwrap().modified().unwrap();
    let again = harness(&args, &cache);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::metadata(&table).unwrap().modified().unwrap(), modified);
    assert_eq!(std::fs::read_to_string(out.join("manifest.jsonl")).unwrap(), manifest);
}

/// `--shard i/N` computes one part of the trajectories in a shared work folder; the run
/// without it merges the parts, refusing while one is missing, and selects as one
/// unsharded run does.
#[test]
fn s2l_trajectories_from_three_shards_equal_one_run() {
    if !have(&[STORIES]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = pool(dir.path());
    let run = |name: &str, shard: Option<&str>| {
        let out = dir.path().join(name);
        let work = dir.path().join(format!("{}-work", name.split('-').next().unwrap()));
        let mut args = [
            &["select", "--selector", "s2l", "--model", "stories260k", "--pool", &pool, "--param", "k=3"][..],
            &REFERENCE[..],
            &["--out", out.to_str().unwrap(), "--work-dir", work.to_str().unwrap()][..],
        ]
        .concat();
        args.extend(shard.map(|s| ["--shard", s]).into_iter().flatten());
        let output = harness(&args, &cache);
        (output.status.success(), format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)), out, work)
    };
    let table = |work: &Path| {
        let folder = std::fs::read_dir(work).unwrap().next().unwrap().unwrap().path();
        let file = std::fs::File::open(folder.join("trajectories.parquet")).unwrap();
        use polars::prelude::SerReader;
        polars::prelude::ParquetReader::new(file).finish().unwrap()
    };
    let (ok, said, whole_out, whole_work) = run("whole", None);
    assert!(ok, "{said}");

    for shard in ["0/3", "2/3"] {
        let (ok, said, _, _) = run("sharded-part", Some(shard));
        assert!(ok && said.contains(&format!("trajectories shard {shard}")), "{said}");
    }
    let (ok, said, _, _) = run("sharded", None);
    assert!(!ok && said.contains("shard 1/3 is missing"), "{said}");
    let (ok, said, _, _) = run("sharded-part", Some("1/3"));
    assert!(ok, "{said}");
    let (ok, said, sharded_out, sharded_work) = run("sharded", None);
    assert!(ok, "{said}");

    let (whole, sharded) = (table(&whole_work), table(&sharded_work));
    assert_eq!(whole.shape(), sharded.shape());
    for column in whole.get_column_names().into_iter().filter(|c| c.starts_with("step_")) {
        let (a, b) = (whole.column(column).unwrap().f64().unwrap(), sharded.column(column).unwrap().f64().unwrap());
        for row in 0..a.len() {
            let (a, b) = (a.get(row).unwrap(), b.get(row).unwrap());
            assert!((a - b).abs() < 1e-4, "{column} row {row}: {a} vs {b}");
        }
    }
    let manifest = |out: &Path| std::fs::read_to_string(out.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest(&whole_out), manifest(&sharded_out));
}

#[test]
fn s2l_bad_input_is_one_clear_error() {
    let other = Path::new("../shared/models/llama-2-tiny-random.gguf");
    if !have(&[STORIES, "../shared/models/llama-2-tiny-random.gguf"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let pool = pool(dir.path());
    let work = dir.path().join("work");
    let run = |extra: &[&str], name: &str| {
        let out = dir.path().join(name);
        let args = [
            &["select", "--selector", "s2l", "--model", "stories260k", "--pool", &pool][..],
            &REFERENCE[..],
            extra,
            &["--out", out.to_str().unwrap(), "--work-dir", work.to_str().unwrap()][..],
        ]
        .concat();
        common::one_error_line(&harness(&args, &cache))
    };
    let err = run(&["--param", "k=25"], "k");
    assert!(err.contains("k = 25 clusters but only 24 candidates"), "{err}");
    let err = run(&["--param", "k=2", "--param", "budget=30"], "budget");
    assert!(err.contains("budget 30 exceeds the 24 candidates"), "{err}");
    let err = run(&["--param", "k=2", "--param", "budget=9", "--param", "mode=per-instruction"], "per");
    assert!(err.contains("budget 9 exceeds the 8 instructions"), "{err}");
    let reference = format!("reference={}", other.display());
    let err = run(&["--param", &reference], "family");
    assert!(err.contains("another tokenizer than the target"), "{err}");
}
