//! `harness eval --completions`: the benchmarks' own reference solutions must grade as
//! correct, broken ones as wrong, and bad input must be named.

mod common;

use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

const DATA: &str = "../shared/data/eval";

fn rows(file: &str) -> Option<Vec<Value>> {
    let path = Path::new(DATA).join(file);
    if !path.exists() {
        eprintln!("skipped: {} is not here", path.display());
        return None;
    }
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
    Some(match serde_json::from_str::<Vec<Value>>(&text) {
        Ok(array) => array,
        Err(_) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
    })
}

/// Code runs in the sandbox, which needs a kernel that can contain it.
fn can_sandbox() -> bool {
    use grape_harness::eval::sandbox::{Sandbox, SandboxConfig, SandboxError};
    match Sandbox::new(SandboxConfig::default()) {
        Ok(_) => true,
        Err(e @ SandboxError::Uncontained(_)) => {
            eprintln!("skipped: {e}");
            false
        }
        Err(e) => panic!("the sandbox does not start: {e}"),
    }
}

fn write_completions(dir: &Path, rows: impl Iterator<Item = (String, String)>) -> PathBuf {
    let path = dir.join("completions.jsonl");
    let text: String = rows.map(|(id, c)| json!({"task_id": id, "completion": c}).to_string() + "\n").collect();
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `harness eval --completions`; returns the benchmark's metrics and the items.
fn eval(bench: &str, completions: &Path, out: &Path, extra: &[&str]) -> (Value, Vec<Value>) {
    let status = Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(["eval", "--bench", bench, "--completions"])
        .arg(completions)
        .arg("--out")
        .arg(out)
        .args(["--data-dir", DATA])
        .args(extra)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let items = std::fs::read_to_string(out.join("items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (metrics[bench].clone(), items)
}

#[test]
fn humaneval_canonical_solutions_pass_and_broken_ones_fail() {
    let (Some(tasks), true) = (rows("HumanEval.jsonl.gz"), can_sandbox()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let id = |t: &Value| t["task_id"].as_str().unwrap().to_string();
    let canonical = write_completions(
        dir.path(),
        tasks.iter().map(|t| (id(t), t["canonical_solution"].as_str().unwrap().to_string())),
    );
    let (metrics, items) = eval("humaneval", &canonical, &dir.path().join("good"), &[]);
    let failed: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "passed").collect();
    assert!(failed.is_empty(), "{} failed, first: {:?}", failed.len(), failed.first());
    assert_eq!(metrics["score"]["value"], 1.0);
    assert_eq!(metrics["score"]["n"], 164);
    assert_eq!(items.len(), 164);

    // Off by one everywhere: the function returns its first argument.
    let broken = write_completions(
        dir.path(),
        tasks.iter().map(|t| (id(t), "    return locals()[list(locals())[0]]\n".to_string())),
    );
    let (metrics, items) = eval("humaneval", &broken, &dir.path().join("bad"), &["--limit", "20"]);
    assert_eq!(items.len(), 20);
    assert!(metrics["score"]["value"].as_f64().unwrap() < 0.1, "{metrics}");
    assert!(items.iter().any(|i| i["verdict"] == "failed"));
}

#[test]
fn mbpp_reference_code_passes_at_least_99_percent() {
    let (Some(tasks), true) = (rows("eurus-new_mbpp.json.gz"), can_sandbox()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let id = |t: &Value| t["task_id"].to_string().trim_matches('"').to_string();
    // Completions as a model would write them: a fenced block after some prose.
    let good = write_completions(
        dir.path(),
        tasks.iter().map(|t| (id(t), format!("Here you go:\n```python\n{}\n```\n", t["code"].as_str().unwrap()))),
    );
    let (metrics, items) = eval("mbpp", &good, &dir.path().join("good"), &[]);
    let score = metrics["score"]["value"].as_f64().unwrap();
    let failed: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "passed").collect();
    assert!(score >= 0.99, "{score}: {} failed, first: {:?}", failed.len(), failed.first());
    assert_eq!(metrics["score"]["n"], 399);

    let broken = write_completions(dir.path(), tasks.iter().take(30).map(|t| (id(t), "def f():\n    pass\n".into())));
    let (metrics, _) = eval("mbpp", &broken, &dir.path().join("bad"), &[]);
    assert_eq!(metrics["score"]["value"], 0.0);
    assert_eq!(metrics["score"]["n"], 30);
}

#[test]
fn math_and_gsmplus_references_grade_as_correct_and_off_by_one_as_wrong() {
    let (Some(math), Some(gsm)) = (rows("MATH-500.jsonl.gz"), rows("gsmplus-testmini.jsonl.gz")) else { return };
    let dir = tempfile::tempdir().unwrap();
    let solved = write_completions(
        dir.path(),
        math.iter().map(|t| {
            let answer = t["answer"].as_str().unwrap();
            (t["unique_id"].as_str().unwrap().to_string(), format!("We work it out.\nThe final answer is $\\boxed{{{answer}}}$."))
        }),
    );
    let (metrics, items) = eval("math500", &solved, &dir.path().join("math"), &[]);
    let wrong: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "correct").collect();
    assert!(wrong.is_empty(), "{} wrong, first: {:?}", wrong.len(), wrong.first());
    assert_eq!(metrics["score"]["n"], 500);
    assert_eq!(metrics["groups"]["subject"]["Precalculus"]["value"], 1.0);
    assert_eq!(metrics["truncated_rate"], Value::Null);

    // GSM-Plus: the reference for answerable rows, "not enough information" for the rest;
    // then every answer plus one, which must all be wrong except where the row is unanswerable.
    let answer_for = |t: &Value, shift: f64| match t["answer"].as_str().unwrap() {
        "None" => "The question does not give enough information to determine the answer.".to_string(),
        a if shift == 0.0 => format!("So the answer is \\boxed{{{a}}}."),
        a => {
            let number = |x: &str| x.replace(',', "").parse::<f64>().unwrap();
            let value = a.split_once('/').map_or_else(|| number(a), |(p, q)| number(p) / number(q));
            format!("So the answer is \\boxed{{{}}}.", value + shift)
        }
    };
    for (shift, expected) in [(0.0, 1.0), (1.0, 300.0 / 2400.0)] {
        let file = write_completions(dir.path(), gsm.iter().enumerate().map(|(i, t)| (i.to_string(), answer_for(t, shift))));
        let (metrics, _) = eval("gsmplus", &file, &dir.path().join(format!("gsm{shift}")), &[]);
        let score = metrics["score"]["value"].as_f64().unwrap();
        assert!((score - expected).abs() < 1e-9, "shift {shift}: {score}");
        assert_eq!(metrics["groups"]["perturbation"]["critical thinking"]["value"], 1.0);
    }
}

/// `--shard i/N` grades a hash-chosen part of the items; `harness merge-eval` joins the
/// three parts into the metrics of one unsharded run, and refuses a missing shard.
#[test]
fn three_eval_shards_merge_into_the_unsharded_metrics() {
    let Some(math) = rows("MATH-500.jsonl.gz") else { return };
    let dir = tempfile::tempdir().unwrap();
    // Every third answer off, so the score and its interval are not trivial.
    let completions = write_completions(
        dir.path(),
        math.iter().enumerate().map(|(i, t)| {
            let answer = if i % 3 == 0 { "-12345" } else { t["answer"].as_str().unwrap() };
            (t["unique_id"].as_str().unwrap().to_string(), format!("The final answer is $\\boxed{{{answer}}}$."))
        }),
    );
    let (whole, _) = eval("math500", &completions, &dir.path().join("whole"), &[]);
    let mut parts = Vec::new();
    for shard in ["0/3", "1/3", "2/3"] {
        let out = dir.path().join(format!("part{}", &shard[..1]));
        let (part, _) = eval("math500", &completions, &out, &["--shard", shard]);
        assert!(part["score"]["n"].as_u64().unwrap() < 500, "{part}");
        parts.push(out);
    }
    let merge = |parts: &[PathBuf]| {
        Command::new(env!("CARGO_BIN_EXE_harness"))
            .arg("merge-eval")
            .arg("--out")
            .arg(dir.path().join("merged"))
            .args(parts)
            .output()
            .unwrap()
    };
    let missing = merge(&parts[..2]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("shard 2/3 is missing"), "{missing:?}");
    let merged = merge(&parts);
    assert!(merged.status.success(), "{}", String::from_utf8_lossy(&merged.stderr));
    let metrics: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("merged/metrics.json")).unwrap()).unwrap();
    for key in ["score", "groups", "unparseable_rate", "pass_at_k"] {
        assert_eq!(metrics["math500"][key], whole[key], "{key}");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("merged/items.jsonl")).unwrap().lines().count(), 500);
}

#[test]
fn bad_eval_input_is_named() {
    let Some(_) = rows("MATH-500.jsonl.gz") else { return };
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_harness"))
            .arg("eval")
            .args(args)
            .arg("--out")
            .arg(dir.path().join("out"))
            .args(["--data-dir", DATA])
            .output()
            .unwrap();
        assert!(!out.status.success());
        common::one_error_line(&out)
    };
    let completions = dir.path().join("c.jsonl");
    std::fs::write(&completions, "{\"task_id\": \"test/precalculus/807.json\", \"completion\": \"3\"}\n{\"task_id\": \"nope\", \"completion\": \"1\"}\n").unwrap();
    let c = completions.to_str().unwrap();
    let err = run(&["--bench", "math500", "--completions", c]);
    assert!(err.contains("c.jsonl") && err.contains("line 2") && err.contains("`nope`"), "{err}");
    let err = run(&["--bench", "no-such-bench", "--completions", c]);
    assert!(err.contains("unknown benchmark `no-such-bench`") && err.contains("math500"), "{err}");

    // A benchmark file with a wrong checksum, and one with a misspelt field in a template.
    let spec = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/math500.yaml")).unwrap();
    let bad_sum = dir.path().join("bad-sum.yaml");
    std::fs::write(&bad_sum, spec.replace("35dc4108", "00000000")).unwrap();
    let err = run(&["--bench", bad_sum.to_str().unwrap(), "--completions", c]);
    assert!(err.contains("sha256 mismatch") && err.contains("MATH-500"), "{err}");
    let bad_field = dir.path().join("bad-field.yaml");
    std::fs::write(&bad_field, spec.replace("{{ problem }}", "{{ problme }}")).unwrap();
    let err = run(&["--bench", bad_field.to_str().unwrap(), "--completions", c]);
    assert!(err.contains("line 1") && err.contains("field `prompt`") && err.contains("problme"), "{err}");
    let bad_yaml = dir.path().join("bad-yaml.yaml");
    std::fs::write(&bad_yaml, spec.replace("generation:", "generation: [")).unwrap();
    let err = run(&["--bench", bad_yaml.to_str().unwrap(), "--completions", c]);
    assert!(err.contains("bad-yaml.yaml") && err.contains("line"), "{err}");
}
