//! `harness run` end to end on stories260K and a tiny pool: every selector, training and the
//! four benchmarks; the cache (a rerun computes nothing); a run killed during training resumes
//! to the same table; the paper's experiment files pass a dry run; config errors are named.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{comparable_results, harness, have, plan_keys, stage_folders, succeeded, tiny_experiment, STORIES};

fn have_stories() -> bool {
    have(&[STORIES, "../shared/data/eval/HumanEval.jsonl.gz"])
}

/// A tiny experiment; more `epochs` make a training run long enough to be caught mid-way.
fn write_experiment(dir: &Path, epochs: usize) -> PathBuf {
    let rest = format!(
        r#"selectors:
  - {{name: grape, label: GRAPE}}
  - {{name: lowest}}
  - {{name: random}}
  - {{name: strongest, params: {{source: alpha}}}}
  - {{name: upscale, params: {{factor: 2}}}}
  - {{name: s2l, params: {{k: 2, subset: 0.5, epochs: 2, checkpoints: 2, lr: 0.001, max_len: 96, micro_batch_tokens: 192}}}}
training: {{lr: 0.001, epochs: {epochs}, micro_batch_tokens: 96, max_len: 128, save_every: 1}}
evaluation:
  benchmarks: [humaneval, mbpp, math500, gsmplus]
  limit: 2
  max_new_tokens: 8
"#
    );
    tiny_experiment(dir, &rest)
}

fn events(runs: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(runs.join("tiny/stages.jsonl")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn results(runs: &Path) -> Value {
    comparable_results(&runs.join("tiny/report/results.json"))
}

#[test]
fn tiny_experiment_runs_end_to_end_and_is_served_from_the_cache() {
    if !have_stories() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let experiment = write_experiment(dir.path(), 1);
    let runs = dir.path().join("runs");
    let args = ["run", experiment.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()];
    let started = Instant::now();
    let table = succeeded(&harness(&args, &cache));
    assert!(started.elapsed() < Duration::from_secs(120), "{:?}", started.elapsed());
    for label in ["Base", "GRAPE", "lowest", "random", "strongest", "upscale", "s2l", "Abs. Δ", "humaneval", "gsmplus"] {
        assert!(table.contains(label), "{label} missing from\n{table}");
    }
    for file in ["results.md", "results.csv", "results.json", "losses-stories260K.svg"] {
        assert!(runs.join("tiny/report").join(file).exists(), "{file}");
    }
    let first = results(&runs);
    let rows = first["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7);
    assert!(rows.iter().all(|r| r["metrics"].as_object().unwrap().len() == 4), "{first}");
    assert_eq!(rows[5]["examples"], 12, "upscale takes 2 per instruction");
    let computed = events(&runs).len();
    assert!(events(&runs).iter().all(|e| e["action"] == "computed"));

    // A second run computes nothing and prints the same table.
    let again = succeeded(&harness(&args, &cache));
    let log = events(&runs);
    assert!(log[computed..].iter().all(|e| e["action"] == "reused"), "{log:?}");
    assert_eq!(results(&runs), first);
    assert_eq!(again.lines().filter(|l| l.contains('┆')).count(), table.lines().filter(|l| l.contains('┆')).count());

    // `harness report` gathers the same table without computing anything.
    let report = succeeded(&harness(&["report", experiment.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()], &cache));
    assert!(report.contains("GRAPE") && report.contains("s2l"), "{report}");
    assert_eq!(results(&runs), first);

    // The dry run sees every stage cached.
    let plan = succeeded(&harness(&["run", experiment.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap(), "--dry-run"], &cache));
    assert!(plan.contains("cached") && !plan.contains("to run") && plan.contains(", 0 to compute"), "{plan}");
    // Its stages are exactly the folders the run made.
    for kind in ["score", "trajectories", "select", "train", "eval"] {
        let folders = stage_folders(&runs.join("tiny"), kind);
        assert!(!folders.is_empty(), "{kind}");
        assert_eq!(folders, plan_keys(&plan, kind), "{kind}");
    }
}

#[test]
fn a_run_killed_during_training_resumes_to_the_same_table() {
    if !have_stories() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let experiment = write_experiment(dir.path(), 10);
    let (killed, whole) = (dir.path().join("killed"), dir.path().join("whole"));
    let args = |runs: &Path| vec!["run".to_string(), experiment.display().to_string(), "--runs-dir".into(), runs.display().to_string()];

    // Kill -9 once the first training run has logged a few steps.
    let mut child = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args(&killed))
        .env("HARNESS_CACHE_DIR", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let training = loop {
        let logs: Vec<PathBuf> = std::fs::read_dir(killed.join("tiny/train"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| std::fs::read_to_string(p.join("train_log.jsonl")).is_ok_and(|t| t.lines().count() >= 3))
            .collect();
        if let Some(dir) = logs.into_iter().next() {
            break dir;
        }
        assert!(Instant::now() < deadline, "training never started");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!training.join("DONE").exists(), "killed after training finished: make training longer");
    let finished_before: Vec<(PathBuf, std::time::SystemTime)> = ["score", "select", "eval"]
        .iter()
        .flat_map(|kind| std::fs::read_dir(killed.join("tiny").join(kind)).into_iter().flatten().flatten())
        .map(|e| e.path().join("DONE"))
        .filter(|p| p.exists())
        .map(|p| {
            let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, modified)
        })
        .collect();
    assert!(!finished_before.is_empty());

    succeeded(&harness(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>(), &cache));
    for (done, modified) in &finished_before {
        assert_eq!(&std::fs::metadata(done).unwrap().modified().unwrap(), modified, "{} was redone", done.display());
    }
    let log = std::fs::read_to_string(training.join("train_log.jsonl")).unwrap();
    let steps: Vec<u64> = log.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    let done: Value = serde_json::from_str(&std::fs::read_to_string(training.join("DONE")).unwrap()).unwrap();
    assert_eq!(steps, (1..=done["steps"].as_u64().unwrap()).collect::<Vec<_>>(), "the resumed run logs every step once");

    succeeded(&harness(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>(), &cache));
    let (resumed, uninterrupted) = (results(&killed), results(&whole));
    for (a, b) in resumed["rows"].as_array().unwrap().iter().zip(uninterrupted["rows"].as_array().unwrap()) {
        assert_eq!(a["metrics"], b["metrics"], "{}", a["label"]);
        assert_eq!(a["examples"], b["examples"]);
        let loss = |r: &Value| r["train"]["final_loss"].as_f64();
        if let (Some(x), Some(y)) = (loss(a), loss(b)) {
            assert!((x - y).abs() < 1e-4, "{}: final loss {x} vs {y}", a["label"]);
        }
    }
}

#[test]
fn paper_experiments_pass_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    // One file per table of the paper, each with the rows its baseline CSV has.
    for (file, targets, rows) in [
        ("ultrainteract", &["Mistral-7B", "Llama3.1-8B", "Qwen2.5-7B"][..], &["Original-UI (strongest)", "GRAPE (grape)"][..]),
        ("tulu-olmo", &["Mistral-7B", "Llama3.1-8B", "Qwen2.5-7B"], &["Highest* (lowest)", "S2L (s2l)", "GRAPE (grape)"]),
        ("openhermes", &["llama3.1-8b", "mistral-7b-v0.3", "qwen2.5-7b"], &["Subset (strongest)", "GRAPE (grape)"]),
        ("magpie", &["Mistral-7B-v0.3"], &["GRAPE (10 Qwen2.5-72B-Instruct samples per instruction) (grape)", "Gemma-it-9B (strongest)"]),
        ("self-generation", &["Mistral", "Llemma"], &["FT-Mistral (from MM-AnsAug) (strongest)", "FT-Llemma (from Llama3.1-70B) (strongest)"]),
        ("ablation-ui", &["Mistral-7B"], &["Full UI (strongest)", "Closest-1 (grape)", "Random-1 (random)"]),
        ("self-distill", &["Mistral-7B", "Llama3.1-8B", "Llama3.2-3B"], &["Self-Distilled (strongest)", "GRAPE (grape)"]),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/{file}.yaml"));
        let plan = succeeded(&harness(&["run", path.to_str().unwrap(), "--dry-run", "--runs-dir", "/nonexistent"], dir.path()));
        for target in targets {
            assert!(plan.contains(&format!("target {target} ")), "{file}: {target} missing from\n{plan}");
        }
        for row in rows {
            assert!(plan.contains(row), "{file}: {row} missing from\n{plan}");
        }
        if file == "ultrainteract" {
            let nine = "benchmarks humaneval, leetcode, mbpp, math, math-pot, gsmplus, gsmplus-pot, theoremqa, theoremqa-pot:";
            assert!(plan.contains(nine), "Table 1's nine columns: {plan}");
        }
    }
    // The default model cache: SmolLM2 is pulled once for every test that needs it.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["run", quickstart.to_str().unwrap(), "--dry-run", "--runs-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    // Without a registry the SmolLM2 pull fails; the plan still lists every stage.
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && plan.contains("S2L (s2l)") && plan.contains("3x Data (upscale)"), "{plan}");
}

#[test]
fn config_errors_name_file_line_and_key() {
    if !have_stories() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let experiment = write_experiment(dir.path(), 1);
    let good = std::fs::read_to_string(&experiment).unwrap();
    let cases = [
        (good.replace("seed: 3", "seed: 3\nseeds: [1, 2]"), vec!["line 3", "unknown field `seeds`"]),
        (good.replace("{name: lowest}", "{name: lowest, parms: {k: 2}}"), vec!["line", "unknown field `parms`"]),
        (good.replace("{name: lowest}", "{name: best-of}"), vec!["line 10", "unknown selector `best-of`"]),
        (good.replace("{name: upscale, params: {factor: 2}}", "{name: upscale, params: {factr: 2}}"), vec!["line 13", "unknown parameter `factr`"]),
        (good.replace("math500, gsmplus", "math500, gsm-plus"), vec!["line 17", "unknown benchmark `gsm-plus`"]),
        (good.replace("seed: 3", "seed: three"), vec!["line 2", "seed"]),
        (good.replace("pool.jsonl", "no-such-pool.jsonl"), vec!["line 6", "pool.path", "no-such-pool.jsonl"]),
        (good.replace("model: stories260k", "model: no-such-model"), vec!["line 4", "targets.model", "no-such-model"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let err = common::one_error_line(&harness(&["run", path.to_str().unwrap(), "--runs-dir", dir.path().join("runs").to_str().unwrap()], dir.path()));
        for needle in needles {
            assert!(err.contains(needle), "case {i}: `{needle}` missing from: {err}");
        }
        assert!(err.contains(&format!("bad{i}.yaml")), "case {i}: the file is not named: {err}");
    }
}
