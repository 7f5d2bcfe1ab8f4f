//! The Slurm executor: every unfinished stage of the graph becomes an `sbatch` job running
//! `harness stage run`, a split stage a job array of its parts followed by its merge, each
//! job `afterok` on the jobs of the stages it reads. Job ids are kept in the stage folders
//! (`slurm-jobs.json`), so `harness status` can tell pending, running and failed apart, and
//! submitting again adds jobs only for stages neither finished nor queued.

use super::execute::short;
use super::graph::{Graph, Node};
use super::stage::Stage;
use crate::shard::Shard;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const JOBS: &str = "slurm-jobs.json";

/// How jobs call this harness.
#[derive(Debug, Clone)]
pub struct JobCommand {
    /// The `harness` binary (on a path every node sees).
    pub exe: PathBuf,
    /// Options every job passes (`--device cuda`, `--unsandboxed`).
    pub global_args: Vec<String>,
    /// The runs folder, absolute: shared by every node.
    pub runs_dir: PathBuf,
    /// The folder jobs start in (relative data paths resolve from it).
    pub workdir: PathBuf,
}

/// The jobs of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Jobs {
    /// The array of its parts, and which parts it runs.
    array: Option<(String, Vec<usize>)>,
    /// The stage itself (for a split stage: its merge).
    job: String,
}

/// A stage submitted by [`submit`].
pub struct Submitted {
    pub label: String,
    pub stage: String,
    pub jobs: Vec<String>,
}

/// Submits every stage that is neither finished nor queued; returns what it submitted.
pub fn submit(graph: &Graph, command: &JobCommand) -> Result<Vec<Submitted>> {
    let experiment = std::path::absolute(&graph.path).map_err(|e| Error::io(&graph.path, e))?;
    let mut job_of: HashMap<usize, String> = HashMap::new();
    let mut submitted = Vec::new();
    let to_run = graph.to_run();
    for (at, node) in graph.nodes.iter().enumerate() {
        let stage = node.stage(&graph.root);
        if stage.as_ref().is_some_and(Stage::is_done) || !to_run[at] {
            continue;
        }
        // The report is written anew whenever anything else ran.
        if stage.is_none() && submitted.is_empty() && state_of(graph, node) == State::Done {
            continue;
        }
        let dir = folder(graph, node);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Some(jobs) = read_jobs(&dir) {
            if is_queued(&jobs.job)? {
                job_of.insert(at, jobs.job);
                continue;
            }
            // A job left waiting on a failed stage would never run, and parts still running
            // would race their replacements: both go before the stage is submitted again.
            let mut cancel = Command::new("scancel");
            cancel.arg(&jobs.job).args(jobs.array.iter().map(|(id, _)| id));
            let _ = cancel.status();
        }
        let after: Vec<String> = node.reads.iter().filter_map(|r| job_of.get(r).cloned()).collect();
        let base = |name: &str| {
            let mut args = vec![
                "--parsable".to_string(),
                format!("--job-name=harness-{name}-{}", &short(node)[..8.min(short(node).len())]),
                format!("--chdir={}", command.workdir.display()),
                "--kill-on-invalid-dep=yes".to_string(),
            ];
            args.extend(node.resources.sbatch_args());
            args
        };
        // What the job runs: `harness stage run` for this stage (`harness report` for the report).
        let what: Vec<String> = match &stage {
            Some(_) => vec!["stage".into(), "run".into(), experiment.display().to_string(), short(node).to_string()],
            None => vec!["report".into(), experiment.display().to_string()],
        };
        let run: Vec<String> = std::iter::once(command.exe.display().to_string())
            .chain(command.global_args.iter().cloned())
            .chain(what)
            .chain(["--runs-dir".to_string(), command.runs_dir.display().to_string()])
            .collect();
        let mut jobs = Jobs { array: None, job: String::new() };
        let mut ids = Vec::new();
        let mut merge_after = after.clone();
        if node.shards > 1 {
            let todo: Vec<usize> = (0..node.shards)
                .filter(|&index| {
                    stage.as_ref().is_none_or(|s| s.shard_summary::<serde_json::Value>(Shard { index, count: node.shards }).is_none())
                })
                .collect();
            if !todo.is_empty() {
                let mut args = base(&format!("{}-shard", node.kind));
                args.push(format!("--array={}", todo.iter().map(usize::to_string).collect::<Vec<_>>().join(",")));
                args.push(format!("--output={}", dir.join("slurm-%A_%a.log").display()));
                args.extend(dependency(&after));
                let wrap = format!("{} --shard \"$SLURM_ARRAY_TASK_ID/{}\"", quote_all(&run), node.shards);
                let id = sbatch(&args, &wrap)?;
                merge_after = vec![id.clone()];
                merge_after.extend(after.iter().cloned());
                jobs.array = Some((id.clone(), todo));
                ids.push(id);
            }
        }
        let mut args = base(if node.shards > 1 { "merge" } else { node.kind });
        args.push(format!("--output={}", dir.join("slurm-%j.log").display()));
        args.extend(dependency(&merge_after));
        let id = sbatch(&args, &quote_all(&run))?;
        jobs.job = id.clone();
        ids.push(id.clone());
        write_jobs(&dir, &jobs)?;
        job_of.insert(at, id);
        submitted.push(Submitted { label: node.label.clone(), stage: format!("{}/{}", node.kind, short(node)), jobs: ids });
    }
    Ok(submitted)
}

/// Where a stage's jobs keep their ids and logs: its folder (the report's: `report/`).
fn folder(graph: &Graph, node: &Node) -> PathBuf {
    node.stage(&graph.root).map_or_else(|| graph.root.join("report"), |s| s.dir)
}

fn dependency(after: &[String]) -> Option<String> {
    (!after.is_empty()).then(|| format!("--dependency=afterok:{}", after.join(":")))
}

fn quote_all(words: &[String]) -> String {
    words.iter().map(|w| crate::util::shell_quote(w)).collect::<Vec<_>>().join(" ")
}

/// Submits one job; its id.
fn sbatch(args: &[String], wrap: &str) -> Result<String> {
    let out = Command::new("sbatch")
        .args(args)
        .arg(format!("--wrap={wrap}"))
        .output()
        .map_err(|e| Error::Invalid(format!("cannot run sbatch (is Slurm's client installed and SLURM_CONF set?): {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout.trim().split(';').next().unwrap_or_default().to_string();
    if !out.status.success() || id.is_empty() {
        return Err(Error::Invalid(format!(
            "sbatch {} refused the job: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(id)
}

fn read_jobs(dir: &Path) -> Option<Jobs> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(JOBS)).ok()?).ok()
}

fn write_jobs(dir: &Path, jobs: &Jobs) -> Result<()> {
    let path = dir.join(JOBS);
    std::fs::write(&path, serde_json::to_string_pretty(jobs).expect("plain data serialises")).map_err(|e| Error::io(&path, e))
}

/// Slurm's view of one job, or of one task of an array.
struct JobRecord {
    state: String,
    reason: String,
    /// The array task (`2`), or the tasks not yet started (`0-3`); empty for a plain job.
    task: String,
}

impl JobRecord {
    fn alive(&self) -> bool {
        ALIVE.contains(&self.state.as_str()) && self.reason != "DependencyNeverSatisfied"
    }

    /// Cancelled, or left waiting, because a job it depends on failed: it never started.
    fn never_ran(&self) -> bool {
        matches!(self.reason.as_str(), "Dependency" | "DependencyNeverSatisfied") && !self.alive()
    }
}

/// Every record Slurm holds of a job: none when it no longer knows it; an error when it
/// cannot be asked (so a slow controller never makes a live job look gone).
fn job_records(id: &str) -> std::result::Result<Vec<JobRecord>, String> {
    let out = Command::new("scontrol")
        .args(["show", "job", "-o", id])
        .output()
        .map_err(|e| format!("cannot run scontrol: {e}"))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return if said.contains("Invalid job id") { Ok(Vec::new()) } else { Err(format!("scontrol show job {id}: {said}")) };
    }
    let field = |line: &str, name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).unwrap_or_default().to_string()
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| JobRecord { state: field(l, "JobState="), reason: field(l, "Reason="), task: field(l, "ArrayTaskId=") })
        .collect())
}

/// Slurm's reason, when it gives one, as ` (reason)`.
fn reason(job: &JobRecord) -> String {
    if job.reason.is_empty() || job.reason == "None" {
        String::new()
    } else {
        format!(" ({})", job.reason)
    }
}

const ALIVE: [&str; 6] = ["PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED"];

/// Whether a job is still waiting or running (and not waiting on a failed dependency).
fn is_queued(id: &str) -> Result<bool> {
    Ok(job_records(id).map_err(Error::Invalid)?.iter().any(JobRecord::alive))
}

/// What `harness status` says of one stage.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Done,
    /// Running; how far a split stage has got.
    Running(String),
    /// Waiting, and why (Slurm's reason).
    Pending(String),
    /// Ended without finishing: what is known of why, and the log to read.
    Failed { why: String, log: Option<PathBuf> },
    /// No job was ever submitted for it, and it has not finished.
    NotSubmitted,
    /// Unfinished, but every stage reading it has finished.
    NotNeeded,
    /// Slurm could not be asked.
    Unknown(String),
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Done => f.write_str("done"),
            State::Running(progress) if progress.is_empty() => f.write_str("running"),
            State::Running(progress) => write!(f, "running ({progress})"),
            State::Pending(reason) => write!(f, "pending ({reason})"),
            State::Failed { why, .. } => write!(f, "failed: {why}"),
            State::NotSubmitted => f.write_str("not submitted"),
            State::NotNeeded => f.write_str("not needed (what reads it is done)"),
            State::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// The state of every stage of the graph, from its folder and from Slurm.
pub fn status(graph: &Graph) -> Vec<State> {
    let to_run = graph.to_run();
    graph
        .nodes
        .iter()
        .zip(to_run)
        .map(|(node, needed)| match state_of(graph, node) {
            State::NotSubmitted if !needed => State::NotNeeded,
            state => state,
        })
        .collect()
}

fn state_of(graph: &Graph, node: &Node) -> State {
    let stage = node.stage(&graph.root);
    if stage.as_ref().is_some_and(Stage::is_done) {
        return State::Done;
    }
    let dir = folder(graph, node);
    let Some(jobs) = read_jobs(&dir) else { return State::NotSubmitted };
    let records = |id: &str| job_records(id).map_err(State::Unknown);
    let merge = match records(&jobs.job) {
        Ok(r) => r,
        Err(unknown) => return unknown,
    };
    if stage.is_none() {
        // The report has no key: it is done when its last job finished, or wrote its table.
        let finished = match merge.first() {
            Some(job) => job.state == "COMPLETED",
            None => dir.join("results.json").exists(),
        };
        if finished {
            return State::Done;
        }
    }
    let error = |shard: Option<Shard>| stage.as_ref().and_then(|s| s.failure(shard));
    if let Some((array, _)) = &jobs.array {
        let tasks = match records(array) {
            Ok(t) => t,
            Err(unknown) => return unknown,
        };
        // A failed part of the array explains a merge that will never run.
        if let Some(task) = tasks.iter().find(|t| !t.alive() && t.state != "COMPLETED") {
            if task.never_ran() {
                return State::Failed { why: format!("job {array} {}: a stage it reads failed", task.state), log: None };
            }
            let shard = task.task.parse().ok().map(|index| Shard { index, count: node.shards });
            let why = error(shard).unwrap_or_else(|| format!("shard {}/{} ended {}{}", task.task, node.shards, task.state, reason(task)));
            return State::Failed { why, log: Some(dir.join(format!("slurm-{array}_{}.log", task.task))) };
        }
        let finished = (0..node.shards)
            .filter(|&index| stage.as_ref().is_some_and(|s| s.shard_summary::<serde_json::Value>(Shard { index, count: node.shards }).is_some()))
            .count();
        let progress = format!("{finished} of {} shards done", node.shards);
        if tasks.iter().any(|t| t.state == "RUNNING") {
            return State::Running(progress);
        }
        if let Some(waiting) = tasks.iter().find(|t| t.alive()) {
            return State::Pending(format!("{}; {progress}", waiting.reason));
        }
    }
    let log = dir.join(format!("slurm-{}.log", jobs.job));
    match merge.first() {
        None => State::Failed {
            why: error(None).unwrap_or_else(|| format!("job {} ended and Slurm no longer knows it", jobs.job)),
            log: Some(log),
        },
        Some(job) if job.alive() => match job.state.as_str() {
            "PENDING" | "REQUEUED" | "SUSPENDED" => State::Pending(job.reason.clone()),
            _ => State::Running(String::new()),
        },
        Some(job) if job.never_ran() => {
            State::Failed { why: format!("job {} {}: a stage it reads failed", jobs.job, job.state), log: None }
        }
        Some(job) => State::Failed {
            why: error(None).unwrap_or_else(|| format!("job {} ended {}{}", jobs.job, job.state, reason(job))),
            log: Some(log),
        },
    }
}
