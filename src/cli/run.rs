//! `harness run EXPERIMENT.yaml [--dry-run]` and `harness report EXPERIMENT.yaml [--paper T]`.

use anyhow::Context;
use clap::Args;
use grape_harness::experiment::{self, plan, RunOptions};
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
    #[command(flatten)]
    report: ReportOptions,
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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.dry_run {
        let plan = plan::plan(&args.experiment, &args.report.runs_dir)
            .context("planning the experiment")?;
        print!("{plan}");
        return Ok(());
    }
    gather(&args.experiment, &args.report, false, args.unsandboxed)
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
