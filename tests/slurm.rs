//! The Slurm executor against a real (private, single-node) Slurm 22.05: the tiny experiment
//! with scoring in 3 shards, S2L and evaluation in 2 shards gives the local executor's table;
//! a stage that fails shows in `harness status` with its log, the jobs after it never start,
//! and submitting again runs only what has not finished.
//!
//! Needs root (slurmd, and munged as the `munge` user); `scripts/slurm-cluster.sh` installs
//! Debian's packages where they are missing. Where that cannot be done the test says why.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::{comparable_results, have, plan_keys, stage_folders, succeeded, tiny_experiment, STORIES};

/// A private cluster, stopped (its daemons only) when dropped.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    fn start(dir: &Path) -> Result<Cluster, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-cluster.sh");
        let out = Command::new("bash").arg(&script).arg("start").arg(dir).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Cluster { dir: dir.to_path_buf(), conf: dir.join("slurm.conf") })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm-cluster.sh");
        let _ = Command::new("bash").arg(&script).arg("stop").arg(&self.dir).status();
    }
}

fn experiment(dir: &Path) -> PathBuf {
    let rest = r#"selectors:
  - {name: grape, label: GRAPE}
  - {name: random}
  - {name: s2l, params: {k: 2, subset: 0.5, epochs: 2, checkpoints: 2, lr: 0.001, max_len: 96, micro_batch_tokens: 192}}
training: {lr: 0.001, epochs: 1, micro_batch_tokens: 96, max_len: 128}
evaluation:
  benchmarks: [humaneval, gsmplus]
  limit: 2
  max_new_tokens: 8
resources:
  default: {cpus: 1, mem: 2G, time: "0:10:00"}
  score: {shards: 3}
  eval: {shards: 2}
"#;
    tiny_experiment(dir, rest)
}

fn harness(args: &[&str], cache: &Path, conf: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harness"))
        .args(args)
        .env("HARNESS_CACHE_DIR", cache)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap()
}

/// Waits until Slurm has no job left running or waiting.
fn drain(conf: &Path) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let out = Command::new("squeue").args(["-h", "-t", "PENDING,RUNNING,CONFIGURING,COMPLETING"]).env("SLURM_CONF", conf).output().unwrap();
        let queued = String::from_utf8_lossy(&out.stdout);
        // Jobs cancelled for a failed dependency stay PENDING only until Slurm notices.
        if queued.lines().all(|l| l.contains("DependencyNeverSatisfied")) {
            return;
        }
        assert!(Instant::now() < deadline, "jobs still queued:\n{queued}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn slurm_runs_the_graph_to_the_local_table_and_resubmits_only_what_failed() {
    if !have(&[STORIES, "../shared/data/eval/HumanEval.jsonl.gz"]) {
        return;
    }
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.ok().as_deref() != Some("0") {
        eprintln!("skipped: a private Slurm cluster needs root (slurmd, munged as munge)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = match Cluster::start(&dir.path().join("slurm")) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: no private Slurm cluster here: {why}");
            return;
        }
    };
    let conf = &cluster.conf;
    let cache = dir.path().join("cache");
    let exp = experiment(dir.path());
    let exp = exp.to_str().unwrap();
    let (local, cluster_runs) = (dir.path().join("local"), dir.path().join("cluster"));
    let (local_s, cluster_s) = (local.to_str().unwrap(), cluster_runs.to_str().unwrap());

    // The local executor: the table to match; split stages run part by part here too.
    succeeded(&harness(&["run", exp, "--runs-dir", local_s], &cache, conf));
    let expected = comparable_results(&local.join("tiny/report/results.json"));

    // A stage that will fail: a corrupt part in the way of scoring shard 0.
    let plan = succeeded(&harness(&["run", exp, "--runs-dir", cluster_s, "--dry-run"], &cache, conf));
    assert!(plan.contains("in 3 shards") && plan.contains("in 2 shards"), "{plan}");
    let score = cluster_runs.join("tiny/score").join(&plan_keys(&plan, "score")[0]);
    std::fs::create_dir_all(score.join("shards")).unwrap();
    std::fs::write(score.join("shards/scores.shard-0-of-3.parquet"), "not parquet").unwrap();

    let submitted = succeeded(&harness(&["run", exp, "--runs-dir", cluster_s, "--executor", "slurm"], &cache, conf));
    let first_jobs = submitted.lines().filter(|l| l.contains(" job ")).count();
    // Base eval, score, trajectories, 3 x (select, train, eval), report.
    assert_eq!(first_jobs, 13, "{submitted}");
    drain(conf);

    let status = succeeded(&harness(&["status", exp, "--runs-dir", cluster_s], &cache, conf));
    let score_line = status.lines().find(|l| l.contains("score/")).unwrap();
    assert!(score_line.contains("failed") && score_line.contains("slurm-"), "{status}");
    let log = score.join(
        std::fs::read_dir(&score).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).find(|n| n.ends_with("_0.log")).unwrap(),
    );
    assert!(std::fs::read_to_string(&log).unwrap().contains("error:"), "{}", log.display());
    // GRAPE's selection, training and evaluation never started: no logs, nothing done.
    let grape_lines: Vec<&str> = status.lines().filter(|l| l.contains("GRAPE]")).collect();
    assert_eq!(grape_lines.len(), 3, "{status}");
    assert!(grape_lines.iter().all(|l| l.contains("failed") && l.contains("a stage it reads failed")), "{status}");
    for key in plan_keys(&plan, "select") {
        let folder = cluster_runs.join("tiny/select").join(&key);
        let ran = std::fs::read_dir(&folder).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".log") && !folder.join("DONE").exists());
        assert!(!ran, "{} started after its input failed", folder.display());
    }
    // Everything not reading the scores finished.
    assert!(status.contains("s2l] select") && status.lines().filter(|l| l.contains("┆ done")).count() == 8, "{status}");

    // Mend the input; the same command resubmits only the unfinished stages.
    std::fs::remove_file(score.join("shards/scores.shard-0-of-3.parquet")).unwrap();
    let again = succeeded(&harness(&["run", exp, "--runs-dir", cluster_s, "--executor", "slurm"], &cache, conf));
    let resubmitted: Vec<&str> = again.lines().filter(|l| l.contains(" job ")).collect();
    assert_eq!(resubmitted.len(), 5, "score, GRAPE's select, train, eval and the report:\n{again}");
    assert!(resubmitted[0].contains("score/") && resubmitted[0].contains(" then "), "shard 0 again, then the merge: {again}");
    drain(conf);

    let status = succeeded(&harness(&["status", exp, "--runs-dir", cluster_s], &cache, conf));
    assert!(status.contains("13 of 13 stages done, 0 failed"), "{status}");
    let report = cluster_runs.join("tiny/report/results.json");
    assert!(report.exists(), "the report job wrote no table");
    assert_eq!(comparable_results(&report), expected);

    // Every stage folder the jobs made is one the dry run named.
    let plan = succeeded(&harness(&["run", exp, "--runs-dir", cluster_s, "--dry-run"], &cache, conf));
    for kind in ["score", "trajectories", "select", "train", "eval"] {
        assert_eq!(stage_folders(&cluster_runs.join("tiny"), kind), plan_keys(&plan, kind), "{kind}");
    }
    let _: Value = serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
}
