//! `harness run --dry-run`: the stages an experiment needs, which of them are cached, and how
//! much work the rest is (tokens, FLOPs and time at an assumed rate). Nothing is run; missing
//! pools, models and data are reported, not fatal, so a GPU experiment can be checked anywhere.

use super::stage::Stage;
use super::Experiment;
use crate::model::{self, LoadedModel};
use crate::pool::Pool;
use crate::select::{self, Needs};
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

/// Effective FLOP rate assumed for time estimates (about what this harness reaches on a
/// 2-core CPU in f32; an H100 in bf16 does some 2000 times more).
pub const ASSUMED_GFLOPS: f64 = 100.0;

pub struct Plan(String);

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The plan of the experiment in `path` against what `runs_dir` already holds.
pub fn plan(path: &Path, runs_dir: &Path) -> Result<Plan> {
    let experiment = Experiment::load(path)?;
    let variants = experiment.expand().map_err(|e| crate::Error::format(path, e))?;
    let root = runs_dir.join(&experiment.name);
    let mut out = String::new();
    let _ = writeln!(out, "experiment {} ({}): {} run(s), stages under {}", experiment.name, path.display(), variants.len(), root.display());
    if !experiment.description.is_empty() {
        let _ = writeln!(out, "  {}", experiment.description.trim());
    }
    let mut total_flops = 0.0;
    for variant in &variants {
        if !variant.label.is_empty() {
            let _ = writeln!(out, "run {}", variant.label);
        }
        total_flops += plan_variant(&variant.experiment, &root, &mut out)?;
    }
    if total_flops > 0.0 {
        let _ = writeln!(
            out,
            "work still to do: about {:.3e} FLOP, {} at {ASSUMED_GFLOPS} GFLOP/s (estimated; known models only)",
            total_flops,
            duration(total_flops / (ASSUMED_GFLOPS * 1e9))
        );
    }
    Ok(Plan(out))
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// Average prompt + response tokens of the pool's candidates (from up to 2000 of them), and
/// how many there are.
fn pool_tokens(model: &LoadedModel, pool: &crate::pool::Pool) -> (f64, usize) {
    let pairs: Vec<(&str, &str)> = pool
        .instructions
        .iter()
        .flat_map(|i| i.candidates.iter().map(move |c| (i.prompt.as_str(), c.response.as_str())))
        .collect();
    let step = pairs.len().div_ceil(2000).max(1);
    let lengths: Vec<usize> =
        pairs.iter().step_by(step).filter_map(|(p, r)| model.encode_pair(p, r).ok()).map(|e| e.ids.len()).collect();
    let mean = lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64;
    (mean, pairs.len())
}

/// Writes one run's plan; returns the FLOPs of its stages still to run (where known).
fn plan_variant(exp: &Experiment, root: &Path, out: &mut String) -> Result<f64> {
    let pool_path = super::pool_path(exp);
    let pool = if pool_path.exists() { Some(super::read_pool(exp, &pool_path)?) } else { None };
    match &pool {
        Some(p) => {
            let _ = writeln!(out, "  pool {}: {} instructions, {} candidates", pool_path.display(), p.instructions.len(), p.candidate_count());
        }
        None => {
            let how = exp.pool.upstream.as_deref().unwrap_or("see the experiment file");
            let _ = writeln!(out, "  pool {}: NOT HERE ({how}); stage keys need it", exp.pool.path);
        }
    }
    let pool_key = pool.as_ref().map(Pool::digest);
    let data_dir = crate::pool::data_dir().join("eval");
    let benches = crate::eval::load_benchmarks(&exp.evaluation.benchmarks, &crate::eval::benchmark::eval_dir(), &data_dir);
    let limit = exp.evaluation.limit.unwrap_or(usize::MAX);
    // (items, new tokens at most) over the benchmarks, each with its own budget unless overridden.
    let (items, new_tokens) = match &benches {
        Ok(b) => b.iter().fold((0, 0), |(n, t), b| {
            let items = limit.min(b.items.len());
            let budget = exp.evaluation.max_new_tokens.unwrap_or(b.spec.generation.max_new_tokens);
            (n + items, t + items * budget)
        }),
        Err(e) => {
            let _ = writeln!(out, "  benchmarks: {e}");
            (0, 0)
        }
    };
    let bench_key = benches.as_ref().ok().map(|b| super::bench_key(b)).transpose()?;
    let _ = writeln!(
        out,
        "  benchmarks {}: {items} items x {} sample(s), at most {new_tokens} new tokens per sample set",
        exp.evaluation.benchmarks.join(", "),
        exp.evaluation.samples
    );
    let mut flops = 0.0;
    for target in &exp.targets {
        let model_ref = super::model_ref(target);
        let model = model::inspect_fingerprinted(&model_ref, target.template.as_deref());
        let (fingerprint, per_token, mean_tokens, candidates) = match (&model, &pool) {
            (Ok(m), Some(p)) => {
                let (mean, n) = pool_tokens(m, p);
                (m.fingerprint().ok(), m.config.body_flops_per_token(mean as usize / 2) + m.config.head_flops(), mean, n)
            }
            (Ok(m), None) => (m.fingerprint().ok(), m.config.body_flops_per_token(256) + m.config.head_flops(), 0.0, 0),
            (Err(_), _) => (None, 0.0, 0.0, 0),
        };
        match &model {
            Ok(m) => {
                let _ = writeln!(
                    out,
                    "  target {} = {model_ref}: {:.3}M parameters{}",
                    target.name,
                    m.config.parameter_count() as f64 / 1e6,
                    if candidates > 0 { format!(", {mean_tokens:.0} tokens per candidate") } else { String::new() }
                );
            }
            Err(e) => {
                let upstream = target.upstream.as_deref().map_or(String::new(), |u| format!(" (from {u})"));
                let _ = writeln!(out, "  target {} = {}: NOT HERE{upstream}: {e}", target.name, target.model);
            }
        }
        let keys = fingerprint.as_deref().zip(pool_key.as_deref());
        let status = |kind: &'static str, inputs: Option<serde_json::Value>| -> (String, bool) {
            match inputs {
                Some(i) => {
                    let stage = Stage::new(root, kind, &i);
                    let done = stage.is_done();
                    (format!("{kind}/{} {}", &stage.key[..16], if done { "cached" } else { "to run" }), done)
                }
                None => (format!("{kind} (inputs not here)"), false),
            }
        };
        let eval_flops = new_tokens as f64 * exp.evaluation.samples as f64 * per_token;
        if exp.evaluation.base {
            let inputs = fingerprint.as_deref().zip(bench_key.as_ref()).map(|(f, b)| super::eval_inputs(exp, f, b));
            let (line, done) = status("eval", inputs);
            let _ = writeln!(out, "    Base: {line}");
            flops += if done { 0.0 } else { eval_flops };
        }
        let mut scored = false;
        for spec in &exp.selectors {
            let selector = select::build(&spec.name, &spec.params_for(&target.name))?;
            let needs = super::needs_for(selector.as_ref(), target);
            let mut steps = Vec::new();
            if needs == Needs::Scores {
                let (line, done) = status("score", keys.map(|(f, p)| super::score_inputs(exp, f, p)));
                if !done && !scored {
                    flops += candidates as f64 * mean_tokens * per_token;
                }
                scored = true;
                steps.push(line);
            }
            let select = keys.map(|(f, p)| super::select_inputs(exp, spec, &target.name, selector.as_ref(), &needs, f, p));
            let select_key = select.as_ref().map(Stage::key_of);
            let (select_line, selected) = status("select", select);
            if let Needs::Trajectories(reference) = &needs {
                let snapshots = reference.checkpoints as f64;
                steps.push(format!(
                    "trajectories ({:.0}% of pairs x {} epochs, {} snapshots)",
                    100.0 * reference.subset,
                    reference.epochs,
                    reference.checkpoints
                ));
                if !selected {
                    let train = reference.subset * candidates as f64 * mean_tokens * reference.epochs as f64 * 3.0;
                    flops += (train + snapshots * candidates as f64 * mean_tokens) * per_token;
                }
            }
            steps.push(select_line);
            let train = fingerprint.as_deref().zip(select_key.as_deref()).map(|(f, s)| super::train_inputs(exp, f, s));
            let train_key = train.as_ref().map(Stage::key_of);
            let (line, done) = status("train", train);
            steps.push(line);
            if !done {
                // One response per instruction, times k or factor where the selector has one.
                let per_instruction = ["k", "factor"]
                    .iter()
                    .find_map(|k| spec.params_for(&target.name).get(*k).and_then(|v| v.parse::<f64>().ok()))
                    .unwrap_or(1.0);
                let examples = pool.as_ref().map_or(0, |p| p.instructions.len()) as f64 * per_instruction;
                let epochs = exp.training.epochs.max(1) as f64;
                flops += 3.0 * examples * mean_tokens * epochs * per_token;
            }
            let eval = train_key.zip(bench_key.as_ref()).map(|(t, b)| super::eval_inputs(exp, &t, b));
            let (line, done) = status("eval", eval);
            steps.push(line);
            flops += if done { 0.0 } else { eval_flops };
            let _ = writeln!(out, "    {} ({}): {}", spec.label_for(&target.name), spec.name, steps.join(" -> "));
        }
    }
    Ok(flops)
}
