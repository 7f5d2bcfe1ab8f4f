//! `harness run --dry-run`: the experiment's stage graph, which stages are cached, and how much
//! work the rest is (tokens, FLOPs and time at an assumed rate). Nothing is run; missing
//! pools, models and data are reported, not fatal, so a GPU experiment can be checked anywhere.

use super::graph::{Graph, Node, VariantInputs, Work};
use crate::model::LoadedModel;
use crate::Result;
use std::collections::BTreeMap;
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
    let graph = Graph::build(path, runs_dir)?;
    let experiment = &graph.variants[0].experiment;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "experiment {} ({}): {} run(s), stages under {}",
        graph.name,
        path.display(),
        graph.variants.len(),
        graph.root.display()
    );
    if !experiment.description.is_empty() {
        let _ = writeln!(out, "  {}", experiment.description.trim());
    }
    let sizes: Vec<PoolSize> = graph.variants.iter().map(PoolSize::of).collect();
    let to_run = graph.to_run();
    for (v, variant) in graph.variants.iter().enumerate() {
        if !variant.label.is_empty() {
            let _ = writeln!(out, "run {}", variant.label);
        }
        describe_inputs(variant, &sizes[v], &mut out);
        // Each row as the chain of stages it reads, from its selection's inputs to its eval.
        for row in graph.rows.iter().filter(|r| r.variant == v) {
            let mut chain: Vec<usize> = row.select.map(|s| graph.nodes[s].reads.clone()).unwrap_or_default();
            chain.extend(row.select.iter().chain(&row.train).copied());
            chain.push(row.eval);
            let steps: Vec<String> = chain.iter().map(|&at| step(&graph, &graph.nodes[at], to_run[at])).collect();
            let name = row.selector.as_ref().map_or(row.label.clone(), |s| format!("{} ({s})", row.label));
            let _ = writeln!(out, "    {} {name}: {}", variant.targets[row.target].name, steps.join(" -> "));
        }
    }
    let mut total_flops = 0.0;
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unfinished = 0;
    for (node, &to_run) in graph.nodes.iter().zip(&to_run) {
        *by_kind.entry(node.kind).or_default() += 1;
        if to_run && !matches!(node.work, Work::Report) {
            unfinished += 1;
            total_flops += flops(&graph, node, &sizes[node.variant]);
        }
    }
    let counts: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "graph: {} stages ({}), {unfinished} to compute", graph.nodes.len(), counts.join(", "));
    // What each kind asks of a cluster (`--executor slurm`), with `default` folded in.
    let mut shown = Vec::new();
    for node in graph.nodes.iter().filter(|n| !experiment.resources.is_empty() && n.variant == 0) {
        if shown.contains(&node.kind) {
            continue;
        }
        shown.push(node.kind);
        let shards = if node.shards > 1 { format!(", in {} shards", node.shards) } else { String::new() };
        let _ = writeln!(out, "  slurm {}: sbatch {}{shards}", node.kind, node.resources.sbatch_args().join(" "));
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

/// One stage in a row's chain: `kind/key cached|to run`, with its shards.
fn step(graph: &Graph, node: &Node, to_run: bool) -> String {
    let shards = if node.shards > 1 { format!(" in {} shards", node.shards) } else { String::new() };
    let extra = match &node.work {
        Work::Needed { stage, .. } => format!(" ({})", stage.plan(0.0, 0, 0.0).0),
        _ => String::new(),
    };
    match node.stage(&graph.root) {
        Some(stage) => {
            let state = match (stage.is_done(), to_run) {
                (true, _) => "cached",
                (false, true) => "to run",
                (false, false) => "not needed",
            };
            format!("{}/{}{extra} {state}{shards}", node.kind, &stage.key[..16])
        }
        None => format!("{}{extra} (inputs not here){shards}", node.kind),
    }
}

/// The pool's size as the estimates need it, per target (tokens differ by tokenizer).
struct PoolSize {
    candidates: usize,
    instructions: usize,
    /// Per target: mean tokens of a candidate, FLOPs of one token forward.
    per_target: Vec<(f64, f64)>,
    /// Benchmark items and new tokens at most (one sample set).
    items: usize,
    new_tokens: usize,
}

impl PoolSize {
    fn of(variant: &VariantInputs) -> PoolSize {
        let exp = &variant.experiment;
        let (candidates, instructions) = variant.pool.as_ref().map_or((0, 0), |p| (p.candidate_count(), p.instructions.len()));
        let per_target = variant
            .targets
            .iter()
            .map(|t| match (&t.inspected, &variant.pool) {
                (Ok(m), Some(p)) => {
                    let mean = mean_tokens(m, p);
                    (mean, m.config.body_flops_per_token(mean as usize / 2) + m.config.head_flops())
                }
                (Ok(m), None) => (0.0, m.config.body_flops_per_token(256) + m.config.head_flops()),
                (Err(_), _) => (0.0, 0.0),
            })
            .collect();
        let limit = exp.evaluation.limit.unwrap_or(usize::MAX);
        let (items, new_tokens) = match &variant.benches {
            Ok(b) => b.iter().fold((0, 0), |(n, t), b| {
                let items = limit.min(b.items.len());
                let budget = exp.evaluation.max_new_tokens.unwrap_or(b.spec.generation.max_new_tokens);
                (n + items, t + items * budget)
            }),
            Err(_) => (0, 0),
        };
        PoolSize { candidates, instructions, per_target, items, new_tokens }
    }
}

fn describe_inputs(variant: &VariantInputs, size: &PoolSize, out: &mut String) {
    let exp = &variant.experiment;
    match &variant.pool {
        Some(p) => {
            let _ = writeln!(out, "  pool {}: {} instructions, {} candidates", variant.pool_path.display(), p.instructions.len(), p.candidate_count());
        }
        None => {
            let how = exp.pool.upstream.as_deref().unwrap_or("see the experiment file");
            let _ = writeln!(out, "  pool {}: NOT HERE ({how}); stage keys need it", exp.pool.path);
        }
    }
    if let Err(e) = &variant.benches {
        let _ = writeln!(out, "  benchmarks: {e}");
    }
    let _ = writeln!(
        out,
        "  benchmarks {}: {} items x {} sample(s), at most {} new tokens per sample set",
        exp.evaluation.benchmarks.join(", "),
        size.items,
        exp.evaluation.samples,
        size.new_tokens
    );
    for (t, target) in variant.targets.iter().enumerate() {
        match &target.inspected {
            Ok(m) => {
                let mean = size.per_target[t].0;
                let _ = writeln!(
                    out,
                    "  target {} = {}: {:.3}M parameters{}",
                    target.name,
                    target.model,
                    m.config.parameter_count() as f64 / 1e6,
                    if size.candidates > 0 { format!(", {mean:.0} tokens per candidate") } else { String::new() }
                );
                // One response per instruction as the estimate of a selection's tokens.
                let training = super::training_config(exp);
                let on_gpu = crate::model::Placement::current().device.is_cuda();
                let memory = crate::train::plan::plan(&m.config, &training, size.instructions as f64 * mean, on_gpu);
                let _ = writeln!(out, "    training: {memory}");
                if let Some(launch) = &training.launch {
                    let _ = writeln!(out, "    training starts with: sh -c {launch:?}");
                }
            }
            Err(e) => {
                let spec = &exp.targets[t];
                let upstream = spec.upstream.as_deref().map_or(String::new(), |u| format!(" (from {u})"));
                let _ = writeln!(out, "  target {} = {}: NOT HERE{upstream}: {e}", target.name, spec.model);
            }
        }
    }
}

/// Estimated FLOPs of a stage still to run (0 where the model is not known).
fn flops(graph: &Graph, node: &Node, size: &PoolSize) -> f64 {
    let exp = &graph.variants[node.variant].experiment;
    let Some(t) = node.target() else { return 0.0 };
    let (mean, per_token) = size.per_target[t];
    match &node.work {
        Work::Score { .. } => size.candidates as f64 * mean * per_token,
        Work::Needed { stage, .. } => stage.plan(per_token, size.candidates, mean).1,
        Work::Select { .. } | Work::Report => 0.0,
        Work::Train { .. } => {
            // One response per instruction, times k or factor where the selector has one.
            let select = &graph.nodes[node.reads[0]];
            let per_instruction = match select.work {
                Work::Select { selector, .. } => ["k", "factor"]
                    .iter()
                    .find_map(|k| exp.selectors[selector].params_for(&exp.targets[t].name).get(*k).and_then(|v| v.parse::<f64>().ok()))
                    .unwrap_or(1.0),
                _ => 1.0,
            };
            3.0 * size.instructions as f64 * per_instruction * mean * exp.training.epochs.max(1) as f64 * per_token
        }
        Work::Eval { .. } => size.new_tokens as f64 * exp.evaluation.samples as f64 * per_token,
    }
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// Average prompt + response tokens of the pool's candidates (from up to 2000 of them).
fn mean_tokens(model: &LoadedModel, pool: &crate::pool::Pool) -> f64 {
    let pairs: Vec<(&str, &str)> = pool
        .instructions
        .iter()
        .flat_map(|i| i.candidates.iter().map(move |c| (i.prompt.as_str(), c.response.as_str())))
        .collect();
    let step = pairs.len().div_ceil(2000).max(1);
    let lengths: Vec<usize> =
        pairs.iter().step_by(step).filter_map(|(p, r)| model.encode_pair(p, r).ok()).map(|e| e.ids.len()).collect();
    lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64
}
