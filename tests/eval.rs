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

/// Hand-written solutions of four LeetCode problems, as a model would answer (a fenced class).
const LEETCODE: [(&str, &str, &str); 4] = [
    (
        "weekly-contest-381-minimum-number-of-pushes-to-type-word-i",
        "class Solution:\n    def minimumPushes(self, word: str) -> int:\n        return sum(i // 8 + 1 for i in range(len(word)))\n",
        "class Solution:\n    def minimumPushes(self, word: str) -> int:\n        return len(word)\n",
    ),
    (
        "biweekly-contest-122-divide-an-array-into-subarrays-with-minimum-cost-i",
        "class Solution:\n    def minimumCost(self, nums: List[int]) -> int:\n        return nums[0] + sum(sorted(nums[1:])[:2])\n",
        "class Solution:\n    def minimumCost(self, nums: List[int]) -> int:\n        return sum(sorted(nums)[:3])\n",
    ),
    (
        "weekly-contest-380-count-elements-with-maximum-frequency",
        "class Solution:\n    def maxFrequencyElements(self, nums: List[int]) -> int:\n        c = Counter(nums)\n        m = max(c.values())\n        return sum(v for v in c.values() if v == m)\n",
        "class Solution:\n    def maxFrequencyElements(self, nums: List[int]) -> int:\n        return max(Counter(nums).values())\n",
    ),
    (
        "weekly-contest-379-maximum-area-of-longest-diagonal-rectangle",
        "class Solution:\n    def areaOfMaxDiagonal(self, dimensions: List[List[int]]) -> int:\n        return max((l * l + w * w, l * w) for l, w in dimensions)[1]\n",
        "class Solution:\n    def areaOfMaxDiagonal(self, dimensions: List[List[int]]) -> int:\n        return max(l * w for l, w in dimensions)\n",
    ),
];

#[test]
fn leetcode_runs_hand_written_solutions_in_the_sandbox() {
    let (Some(_), true) = (rows("leetcode-contest-20240121-Jul.jsonl.gz"), can_sandbox()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let fenced = |code: &str| format!("{code}```\nThis passes the examples.");
    let good = write_completions(dir.path(), LEETCODE.iter().map(|(id, good, _)| (id.to_string(), fenced(good))));
    let (metrics, items) = eval("leetcode", &good, &dir.path().join("good"), &[]);
    assert!(items.iter().all(|i| i["verdict"] == "passed"), "{items:?}");
    assert_eq!(metrics["score"]["value"], 1.0);
    assert_eq!(metrics["groups"]["difficulty"]["Easy"]["n"], 4);
    let wrong = write_completions(dir.path(), LEETCODE.iter().map(|(id, _, wrong)| (id.to_string(), fenced(wrong))));
    let (metrics, items) = eval("leetcode", &wrong, &dir.path().join("wrong"), &[]);
    assert!(items.iter().all(|i| i["verdict"] == "failed" && i["reason"] == "a test failed"), "{items:?}");
    assert_eq!(metrics["score"]["value"], 0.0);
}

/// A TheoremQA answer written as a model would state it, per type.
fn stated(answer: &Value) -> String {
    match answer {
        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(xs) => format!("[{}]", xs.iter().map(stated).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// A wrong answer of the same type.
fn off(answer: &Value) -> String {
    match answer {
        Value::Bool(b) => if *b { "False" } else { "True" }.to_string(),
        Value::String(s) if s == "(a)" => "(b)".to_string(),
        Value::String(_) => "(a)".to_string(),
        Value::Array(xs) => format!("[{}]", xs.iter().map(off).collect::<Vec<_>>().join(", ")),
        // At least 1 and 4% away from the answer, whatever its sign.
        Value::Number(x) => format!("{}", x.as_f64().unwrap() + 1.0 + x.as_f64().unwrap().abs()),
        other => panic!("{other}"),
    }
}

#[test]
fn theoremqa_references_grade_correct_in_cot_and_pot_and_wrong_ones_wrong() {
    let (Some(rows), true) = (rows("theoremqa-test.json.gz"), can_sandbox()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let id = |r: &Value| r["id"].as_str().unwrap().to_string();
    let cot = write_completions(
        dir.path(),
        rows.iter().map(|r| (id(r), format!("Applying the theorem step by step.\nThe answer is $\\boxed{{{}}}$.", stated(&r["Answer"])))),
    );
    let (metrics, items) = eval("theoremqa", &cot, &dir.path().join("cot"), &[]);
    let wrong: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "correct").collect();
    assert!(metrics["score"]["value"].as_f64().unwrap() >= 0.99, "{} wrong, first: {:?}", wrong.len(), wrong.first());
    assert_eq!(metrics["score"]["n"], 800);
    let bad = write_completions(dir.path(), rows.iter().map(|r| (id(r), format!("So \\boxed{{{}}}.", off(&r["Answer"])))));
    let (metrics, _) = eval("theoremqa", &bad, &dir.path().join("bad"), &[]);
    assert_eq!(metrics["score"]["value"], 0.0);

    // Programs of thought: the program prints the answer (lists and options as Python would).
    let program = |answer: String| format!("Let me compute it.\n```python\nanswer = {answer:?}\nanswer\n```\n");
    let pot = write_completions(dir.path(), rows.iter().take(120).map(|r| (id(r), program(stated(&r["Answer"])))));
    let (metrics, items) = eval("theoremqa-pot", &pot, &dir.path().join("pot"), &[]);
    let wrong: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "correct").collect();
    assert!(wrong.is_empty(), "{} wrong, first: {:?}", wrong.len(), wrong.first());
    assert_eq!(metrics["sandbox"]["seccomp"], Value::Bool(true), "{metrics}");
    let pot_bad = write_completions(dir.path(), rows.iter().take(120).map(|r| (id(r), program(off(&r["Answer"])))));
    let (metrics, _) = eval("theoremqa-pot", &pot_bad, &dir.path().join("pot-bad"), &[]);
    assert_eq!(metrics["score"]["value"], 0.0);
}

#[test]
fn math_and_gsmplus_programs_of_thought_grade_what_they_print() {
    let (Some(math), Some(gsm), true) = (rows("MATH-test5000.jsonl.gz"), rows("gsmplus-testmini.jsonl.gz"), can_sandbox()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let answer_of = |solution: &str| {
        let at = solution.rfind("\\boxed{").unwrap() + "\\boxed{".len();
        let (mut depth, mut end) = (1, at);
        for (i, c) in solution[at..].char_indices() {
            depth += match c { '{' => 1, '}' => -1, _ => 0 };
            if depth == 0 {
                end = at + i;
                break;
            }
        }
        solution[at..end].to_string()
    };
    // The first 60 MATH problems: a program printing the reference (as a raw string) passes.
    let printing = |text: String| format!("```python\nprint(r\"\"\"{text}\"\"\")\n```");
    let math_good = write_completions(
        dir.path(),
        math.iter().take(60).map(|t| (t["idx"].to_string(), printing(answer_of(t["solution"].as_str().unwrap())))),
    );
    let (metrics, items) = eval("math-pot", &math_good, &dir.path().join("math"), &["--limit", "60"]);
    let wrong: Vec<&Value> = items.iter().filter(|i| i["verdict"] != "correct").collect();
    assert!(wrong.is_empty(), "{} wrong, first: {:?}", wrong.len(), wrong.first());
    assert_eq!(metrics["score"]["n"], 60);
    // GSM-Plus: computing the answer; one that crashes, and one off by one, do not pass.
    let numeric: Vec<&Value> = gsm.iter().take(40).filter(|r| r["answer"] != "None").collect();
    let program = |r: &Value, delta: &str| format!("```python\nx = {} {delta}\nx\n```", r["answer"].as_str().unwrap());
    let index = |r: &Value| gsm.iter().position(|x| std::ptr::eq(x, r)).unwrap().to_string();
    let good = write_completions(dir.path(), numeric.iter().map(|r| (index(r), program(r, ""))));
    let (metrics, _) = eval("gsmplus-pot", &good, &dir.path().join("gsm"), &["--limit", "40"]);
    assert_eq!(metrics["score"]["value"], 1.0, "{metrics}");
    let off_by_one = write_completions(dir.path(), numeric.iter().map(|r| (index(r), program(r, "+ 1"))));
    let (metrics, _) = eval("gsmplus-pot", &off_by_one, &dir.path().join("gsm-off"), &["--limit", "40"]);
    assert_eq!(metrics["score"]["value"], 0.0, "{metrics}");
    let crash = write_completions(dir.path(), numeric.iter().map(|r| (index(r), format!("{}\n1/0\n```", program(r, "").trim_end_matches("```")))));
    let (metrics, items) = eval("gsmplus-pot", &crash, &dir.path().join("gsm-crash"), &["--limit", "40"]);
    assert_eq!(metrics["score"]["value"], 0.0, "{metrics}");
    assert!(items[0]["stderr_tail"].as_str().unwrap().contains("ZeroDivisionError"), "{}", items[0]);
}
