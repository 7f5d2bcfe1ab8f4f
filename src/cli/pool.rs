//! `harness pool stats`, and the pool arguments every pool-reading command shares.

use anyhow::Context;
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use grape_harness::pool::{self, stats, Columns, Pool};
use grape_harness::score::{pair_hash, Score, ScoreStore};
use grape_harness::select::{self, Params, SelectInput};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PoolArgs {
    /// A JSONL (gzip allowed) or Parquet pool, one candidate per row.
    #[arg(long)]
    pub pool: PathBuf,
    /// Column mapping, KEY=NAME with KEY one of instruction_id, prompt, response, source.
    #[arg(long = "column", value_name = "KEY=NAME")]
    pub columns: Vec<String>,
    /// Stop at the first malformed row instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Only the first N instructions (quick runs and benchmarks).
    #[arg(long, value_name = "N")]
    pub limit_instructions: Option<usize>,
}

impl PoolArgs {
    pub fn read(&self) -> anyhow::Result<Pool> {
        let mut columns = Columns::default();
        for mapping in &self.columns {
            let (key, name) = mapping
                .split_once('=')
                .with_context(|| format!("--column `{mapping}`: expected KEY=NAME"))?;
            let slot = match key {
                "instruction_id" => &mut columns.instruction_id,
                "prompt" => &mut columns.prompt,
                "response" => &mut columns.response,
                "source" => &mut columns.source,
                _ => anyhow::bail!("--column `{mapping}`: KEY must be instruction_id, prompt, response or source"),
            };
            *slot = name.to_string();
        }
        let pool = pool::read(&self.pool, &columns, self.strict)
            .with_context(|| format!("reading the pool {}", self.pool.display()))?;
        Ok(match self.limit_instructions {
            Some(n) => pool.truncated(n),
            None => pool,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Candidates per instruction and sources; with scores, how scores follow length and
    /// whose responses GRAPE picks; with selections, how much they overlap.
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// A score store written by `harness score` (any model).
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Which maximum length's scores to read from the store.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Selection folders (with manifest.jsonl) to compare pairwise by Jaccard overlap.
    #[arg(long = "selection", value_name = "DIR")]
    selections: Vec<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: PoolCommand) -> anyhow::Result<()> {
    let PoolCommand::Stats(args) = cmd;
    let pool = args.pool.read()?;
    let shape = stats::shape(&pool);
    let mut report = serde_json::json!({ "pool": shape });

    let mut overlaps: Vec<(String, std::collections::HashSet<(String, usize)>)> = Vec::new();
    if let Some(path) = &args.scores {
        let store = ScoreStore::open_existing(path).with_context(|| format!("reading scores {}", path.display()))?;
        let scores = stored_scores(&pool, &store, args.max_len);
        let correlation = stats::length_correlation(&scores);
        anyhow::ensure!(
            correlation.scored > 0,
            "{}: no score for this pool at max length {} (score it with `harness score`)",
            path.display(),
            args.max_len
        );
        let input = SelectInput { pool: &pool, scores: Some(&scores), stage: None, seed: 0 };
        let grape = select::build("grape", &Params::new())?.select(&input)?;
        report["length_correlation"] = serde_json::to_value(&correlation)?;
        report["grape_source_shares"] = serde_json::to_value(stats::source_shares(&pool, &grape))?;
        for normalize in ["sum", "mean", "bytes"] {
            let params = Params::from([("normalize".to_string(), normalize.to_string())]);
            let picks = select::build("grape", &params)?.select(&input)?;
            overlaps.push((format!("grape/{normalize}"), picks.pairs(&pool)));
        }
        overlaps.push(("lowest".into(), select::build("lowest", &Params::new())?.select(&input)?.pairs(&pool)));
    }
    for dir in &args.selections {
        let pairs = select::read_manifest(&dir.join("manifest.jsonl"))?;
        overlaps.push((dir.display().to_string(), pairs));
    }
    let mut jaccard = Vec::new();
    for (i, (a, pa)) in overlaps.iter().enumerate() {
        for (b, pb) in &overlaps[i + 1..] {
            jaccard.push(serde_json::json!({"a": a, "b": b, "jaccard": stats::jaccard(pa, pb)}));
        }
    }
    if !jaccard.is_empty() {
        report["jaccard"] = serde_json::Value::Array(jaccard);
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The store's scores laid out like the pool (`None` where a pair was never scored).
fn stored_scores(pool: &Pool, store: &ScoreStore, max_len: usize) -> Vec<Vec<Option<Score>>> {
    pool.instructions
        .iter()
        .map(|i| i.candidates.iter().map(|c| store.get(max_len, &pair_hash(&i.prompt, &c.response)).cloned()).collect())
        .collect()
}

fn print_report(report: &serde_json::Value) {
    let shape = &report["pool"];
    let spread = &shape["candidates_per_instruction"];
    println!(
        "{} instructions, {} candidates; per instruction min {} median {} mean {:.2} max {}; {} with a single candidate",
        shape["instructions"],
        shape["candidates"],
        spread["min"],
        spread["median"],
        spread["mean"].as_f64().unwrap_or(f64::NAN),
        spread["max"],
        shape["single_candidate_instructions"]
    );
    let mut sources = table(&["source", "candidates", "GRAPE picks", "share of picks"]);
    let picks = report["grape_source_shares"].as_array().cloned().unwrap_or_default();
    for (source, count) in shape["sources"].as_object().into_iter().flatten() {
        let pick = picks.iter().find(|p| p["source"] == *source);
        sources.add_row(vec![
            source.clone(),
            count.to_string(),
            pick.map_or("-".into(), |p| p["picks"].to_string()),
            pick.map_or("-".into(), |p| format!("{:.1}%", 100.0 * p["share"].as_f64().unwrap_or(0.0))),
        ]);
    }
    println!("{sources}");
    if let Some(c) = report.get("length_correlation") {
        let f = |key: &str| format!("{:+.3}", c[key].as_f64().unwrap_or(f64::NAN));
        println!(
            "score vs response tokens over {} scored candidates: sum log-prob Pearson {} Spearman {}; \
             mean log-prob Pearson {} Spearman {}",
            c["scored"],
            f("sum_pearson"),
            f("sum_spearman"),
            f("mean_pearson"),
            f("mean_spearman")
        );
    }
    if let Some(pairs) = report.get("jaccard").and_then(|j| j.as_array()) {
        let mut overlap = table(&["selection A", "selection B", "Jaccard"]);
        for p in pairs {
            overlap.add_row(vec![
                p["a"].as_str().unwrap_or_default().to_string(),
                p["b"].as_str().unwrap_or_default().to_string(),
                format!("{:.3}", p["jaccard"].as_f64().unwrap_or(f64::NAN)),
            ]);
        }
        println!("{overlap}");
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header.to_vec());
    table
}
