//! `harness run EXPERIMENT.yaml [--dry-run] [--executor slurm]`, `harness report`,
//! `harness stage run EXPERIMENT.yaml KEY` and `harness status EXPERIMENT.yaml`.

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use grape_harness::experiment::{self, execute, plan, slurm, RunOptions};
use grape_harness::shard::Shard;
use grape_harness::report::{self, paper::PaperTable};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The experiment file (YAML).
    experiment: PathBuf,
    /// Print the stages, what is cached, and estimated tokens and time; run nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run generated code even where this kernel cannot contain it (no Landlock, namespaces or
    /// root); recorded in each evaluation's metrics.json.
    #[arg(long)]
    unsandboxed: bool,
    /// local: every stage in this process. slurm: submit the unfinished stages as sbatch jobs
    /// (see `resources:` in the experiment file) and return; `harness status` follows them.
    #[arg(long, value_enum, default_value = "local")]
    executor: Executor,
    #[command(flatten)]
    report: ReportOptions,
}

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Executor {
    Local,
    Slurm,
}

#[derive(Debug, Subcommand)]
pub enum StageCommand {
    /// Run one stage of an experiment (what a Slurm job runs): refused until the stages it
    /// reads have finished; resumes a stage that was cut off.
    Run(StageRunArgs),
}

#[derive(Debug, Args)]
pub struct StageRunArgs {
    experiment: PathBuf,
    /// The stage's key: its folder name under runs/<experiment>/<kind>/ (16 hex digits), or `report`.
    key: String,
    /// Only part i of N of a split stage; a run without --shard then merges the parts.
    #[arg(long, value_name = "i/N")]
    shard: Option<Shard>,
    #[arg(long)]
    unsandboxed: bool,
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    experiment: PathBuf,
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The experiment file (YAML) whose finished stages to gather.
    experiment: PathBuf,
    #[command(flatten)]
    report: ReportOptions,
}

#[derive(Debug, Args)]
struct ReportOptions {
    /// Where runs/<experiment>/ lives.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Put the paper's numbers for the matching rows beside ours: table1 or table2 [default:
    /// the experiment's `paper`].
    #[arg(long)]
    paper: Option<String>,
    /// Show 95% bootstrap intervals in the terminal table.
    #[arg(long)]
    ci: bool,
}

pub fn run(args: RunArgs, global_args: Vec<String>) -> anyhow::Result<()> {
    if args.dry_run {
        let plan = plan::plan(&args.experiment, &args.report.runs_dir)
            .context("planning the experiment")?;
        print!("{plan}");
        return Ok(());
    }
    match args.executor {
        Executor::Local => gather(&args.experiment, &args.report, false, args.unsandboxed),
        Executor::Slurm => submit(&args, global_args),
    }
}

fn submit(args: &RunArgs, global_args: Vec<String>) -> anyhow::Result<()> {
    let runs_dir = std::path::absolute(&args.report.runs_dir).context("the runs folder")?;
    let graph = experiment::checked_graph(&args.experiment, &runs_dir).context("reading the experiment")?;
    let mut global_args = global_args;
    if args.unsandboxed {
        global_args.push("--unsandboxed".into());
    }
    let command = slurm::JobCommand {
        exe: std::env::current_exe().context("locating the harness binary")?,
        global_args,
        runs_dir,
        workdir: std::env::current_dir().context("the working folder")?,
    };
    let submitted = slurm::submit(&graph, &command).context("submitting to Slurm")?;
    if submitted.is_empty() {
        println!("nothing to submit: every stage of {} is finished or queued", graph.name);
    }
    for s in &submitted {
        println!("{:<40} {:<30} job {}", s.label, s.stage, s.jobs.join(" then "));
    }
    println!("submitted {} stage(s); follow them with `harness status {}`", submitted.len(), args.experiment.display());
    Ok(())
}

pub fn run_stage(cmd: StageCommand) -> anyhow::Result<()> {
    let StageCommand::Run(args) = cmd;
    if args.key == "report" {
        let options = ReportOptions { runs_dir: args.runs_dir, paper: None, ci: false };
        return gather(&args.experiment, &options, true, false);
    }
    let graph = experiment::checked_graph(&args.experiment, &args.runs_dir).context("reading the experiment")?;
    let at = graph.find(&args.key)?;
    let options = RunOptions { runs_dir: args.runs_dir.clone(), progress: true, report_only: false, unsandboxed: args.unsandboxed };
    let node = &graph.nodes[at];
    execute::run_stage(&graph, at, args.shard, &options)
        .with_context(|| format!("stage {}/{} ({})", node.kind, execute::short(node), node.label))?;
    let part = args.shard.map_or(String::new(), |s| format!(" shard {s}"));
    println!("stage {}/{}{part} finished ({})", node.kind, execute::short(node), node.label);
    Ok(())
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let graph = experiment::checked_graph(&args.experiment, &args.runs_dir).context("reading the experiment")?;
    let states = slurm::status(&graph);
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(["stage", "for", "state", "log"]);
    for (node, state) in graph.nodes.iter().zip(&states) {
        let log = match state {
            slurm::State::Failed { log: Some(log), .. } => log.display().to_string(),
            _ => String::new(),
        };
        // The whole error is in the log; the table keeps its first 100 characters.
        let mut said = state.to_string();
        if let Some((cut, _)) = said.char_indices().nth(100) {
            said.truncate(cut);
            said.push('…');
        }
        table.add_row([format!("{}/{}", node.kind, execute::short(node)), node.label.clone(), said, log]);
    }
    println!("{table}");
    let done = states.iter().filter(|s| **s == slurm::State::Done).count();
    let failed = states.iter().filter(|s| matches!(s, slurm::State::Failed { .. })).count();
    println!("{done} of {} stages done, {failed} failed", states.len());
    Ok(())
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    gather(&args.experiment, &args.report, true, false)
}

fn gather(path: &std::path::Path, options: &ReportOptions, report_only: bool, unsandboxed: bool) -> anyhow::Result<()> {
    let run_options = RunOptions { runs_dir: options.runs_dir.clone(), progress: true, report_only, unsandboxed };
    let what = if report_only { "gathering the report" } else { "running the experiment" };
    let results = experiment::run(path, &run_options).context(what)?;
    let paper = match options.paper.as_ref().or(results.paper.as_ref()) {
        Some(name) => Some(PaperTable::load(name, &report::paper::baselines_dir())?),
        None => None,
    };
    let table = report::results_table(&results, options.ci, paper.as_ref());
    if paper.is_some() {
        // Says which of the paper's columns this run lacks, if any.
        println!("{}", table.title);
    }
    println!("{}", table.terminal());
    for table in [report::weight_drift_table(&results), report::cost_table(&results)] {
        if !table.rows.is_empty() {
            println!("{}\n{}", table.title, table.terminal());
        }
    }
    let dir = options.runs_dir.join(&results.experiment).join("report");
    let files = report::write(&results, &dir, paper.as_ref()).with_context(|| format!("writing {}", dir.display()))?;
    let names: Vec<String> = files.iter().filter_map(|f| f.file_name()?.to_str().map(str::to_string)).collect();
    println!("wrote {}: {}", dir.display(), names.join(", "));
    Ok(())
}
