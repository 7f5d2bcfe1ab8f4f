//! Evaluation as the Eurus/UltraInteract protocol does it: benchmark files (`benchmark`),
//! generated code run in a sandbox (`sandbox`), final answers extracted and compared by a
//! careful grader (`math_grade`), pass@k and accuracy with bootstrap intervals (`metrics`).
//! Every item's prompt, completion, extracted answer and verdict is kept.

pub mod benchmark;
pub mod math_grade;
pub mod metrics;
pub mod sandbox;
pub mod theorem_grade;

use crate::generate::Finish;
use crate::{Error, Result};
use benchmark::{Benchmark, Reference};
use metrics::Estimate;
use serde::{Deserialize, Serialize};
use crate::shard::Shard;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One generated (or supplied) answer to one item.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Index into `Benchmark::items`.
    pub item: usize,
    pub sample: usize,
    pub text: String,
    /// Unknown for completions made elsewhere.
    pub finish: Option<Finish>,
    pub new_tokens: Option<usize>,
}

/// One line of `items.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemRecord {
    pub benchmark: String,
    pub task_id: String,
    pub sample: usize,
    pub prompt: String,
    pub completion: String,
    /// The code run, or the final answer found (None: nothing parseable).
    pub extracted: Option<String>,
    /// How the answer was found (math only).
    pub extraction: Option<String>,
    pub reference: Option<String>,
    /// passed / failed / timeout / error (code); correct / wrong / unparseable (math).
    pub verdict: String,
    pub correct: bool,
    pub finish: Option<Finish>,
    pub new_tokens: Option<usize>,
    pub stderr_tail: Option<String>,
    /// Why a program failed where the verdict alone does not say (an early exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What a program of thought printed (its end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_output: Option<String>,
    pub grade_seconds: f64,
    pub groups: BTreeMap<String, String>,
}

/// One benchmark's line of `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchmarkMetrics {
    pub benchmark: String,
    /// `pass@1` for code, `accuracy` for math.
    pub metric: String,
    /// Over items; each item scores the fraction of its samples that were correct.
    pub score: Estimate,
    pub samples_per_item: usize,
    /// Unbiased pass@k for each k up to the number of samples (1, 10, 100).
    pub pass_at_k: BTreeMap<String, f64>,
    /// Generations that hit `max_new_tokens` (None for completions made elsewhere).
    pub truncated_rate: Option<f64>,
    /// Math: no final answer found; code: no code found.
    pub unparseable_rate: f64,
    pub groups: BTreeMap<String, BTreeMap<String, Estimate>>,
    pub generation_seconds: Option<f64>,
    pub grading_seconds: f64,
    /// How generated code was contained (code benchmarks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<sandbox::Protections>,
}

/// Grades every completion; code runs in `sandbox`, which code benchmarks require.
pub fn grade(
    bench: &Benchmark,
    completions: &[Completion],
    sandbox: Option<&sandbox::Sandbox>,
    on_graded: impl Fn() + Sync,
) -> Result<Vec<ItemRecord>> {
    let start = Instant::now();
    let record = |c: &Completion| {
        let item = &bench.items[c.item];
        ItemRecord {
            benchmark: bench.name().to_string(),
            task_id: item.id.clone(),
            sample: c.sample,
            prompt: item.prompt.clone(),
            completion: c.text.clone(),
            extracted: None,
            extraction: None,
            reference: None,
            verdict: String::new(),
            correct: false,
            finish: c.finish,
            new_tokens: c.new_tokens,
            stderr_tail: None,
            reason: None,
            program_output: None,
            grade_seconds: 0.0,
            groups: item.groups.clone(),
        }
    };
    let mut records: Vec<ItemRecord> = completions.iter().map(record).collect();
    let code_items: Vec<usize> = (0..completions.len())
        .filter(|&i| matches!(bench.items[completions[i].item].reference, Reference::Code { .. }))
        .collect();
    if !code_items.is_empty() {
        let sandbox = sandbox.ok_or_else(|| Error::Invalid(format!("{} runs code: it needs a sandbox", bench.name())))?;
        let mut programs = Vec::with_capacity(code_items.len());
        for &i in &code_items {
            let code = benchmark::extract_code(&bench.spec.response_prefix, &completions[i].text);
            programs.push(bench.program(&bench.items[completions[i].item], &code)?);
            records[i].extracted = Some(code);
        }
        let outcomes = sandbox.run_all(&programs, &on_graded);
        for (&i, outcome) in code_items.iter().zip(outcomes) {
            let r = &mut records[i];
            r.correct = outcome.verdict == sandbox::Verdict::Passed;
            r.verdict = outcome.verdict.as_str().to_string();
            r.stderr_tail = Some(outcome.stderr_tail);
            r.reason = outcome.reason.map(str::to_string);
            r.grade_seconds = outcome.seconds;
        }
    }
    // A program of thought is run for its printed answer (the completion's text is graded
    // instead when it holds no program).
    let mut runs: Vec<Option<sandbox::Outcome>> = vec![None; completions.len()];
    if bench.spec.grader.program_of_thought() {
        let (which, programs): (Vec<usize>, Vec<String>) = completions
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, benchmark::program_of_thought(&c.text)?)))
            .unzip();
        if !programs.is_empty() {
            let sandbox =
                sandbox.ok_or_else(|| Error::Invalid(format!("{} runs programs of thought: it needs a sandbox", bench.name())))?;
            for (i, outcome) in which.into_iter().zip(sandbox.run_all_printing(&programs, || {})) {
                runs[i] = Some(outcome);
            }
        }
    }
    for ((c, r), run) in completions.iter().zip(records.iter_mut()).zip(&runs) {
        let graded = Instant::now();
        // What the answer is read from: what the program printed (nothing when it failed, as
        // Eurus takes it), else the completion.
        let text = match run {
            Some(outcome) => {
                r.stderr_tail = Some(outcome.stderr_tail.clone());
                r.program_output = outcome.stdout.clone();
                if outcome.exit_code == Some(0) { outcome.stdout.as_deref().unwrap_or_default() } else { "" }
            }
            None => c.text.as_str(),
        };
        match &bench.items[c.item].reference {
            Reference::Code { .. } => continue,
            Reference::Answer(reference) => {
                let found = match run {
                    Some(_) => printed_answer(text),
                    None => math_grade::extract_answer(text),
                };
                r.correct = found.as_ref().is_some_and(|(answer, _)| math_grade::is_equiv(answer, reference));
                r.verdict = answer_verdict(found.is_some(), r.correct);
                r.reference = Some(reference.clone());
                r.extraction = found.as_ref().map(|(_, how)| format!("{how:?}"));
                r.extracted = found.map(|(answer, _)| answer);
            }
            Reference::Unanswerable => {
                r.correct = math_grade::says_insufficient(text);
                r.verdict = if r.correct { "correct" } else { "wrong" }.to_string();
                r.reference = Some("(the question lacks information)".into());
                r.extracted = math_grade::extract_answer(text).map(|(answer, _)| answer);
            }
            Reference::Typed { answer, answer_type } => {
                // Eurus reads a program's answer from its last printed line.
                let found = match run {
                    Some(_) => text.trim().lines().last().map(|l| (l.trim().to_string(), format!("{:?}", math_grade::Extraction::Output))),
                    None => math_grade::extract_answer(text).map(|(a, how)| (a, format!("{how:?}"))),
                };
                r.correct = found.as_ref().is_some_and(|(a, _)| theorem_grade::is_correct(a, answer, answer_type));
                r.verdict = answer_verdict(found.is_some(), r.correct);
                r.reference = Some(answer.to_string());
                r.extraction = found.as_ref().map(|(_, how)| how.clone());
                r.extracted = found.map(|(a, _)| a);
            }
        }
        r.grade_seconds = graded.elapsed().as_secs_f64() + run.as_ref().map_or(0.0, |o| o.seconds);
        on_graded();
    }
    tracing::debug!("graded {} completions of {} in {:.1}s", records.len(), bench.name(), start.elapsed().as_secs_f64());
    Ok(records)
}

/// The answer a program printed: a boxed or stated answer if it printed one, else its last
/// line whole (Eurus grades the output as text, so `\frac{9}{7}` is not cut to its last number).
fn printed_answer(output: &str) -> Option<(String, math_grade::Extraction)> {
    use math_grade::Extraction;
    match math_grade::extract_answer(output) {
        Some(found @ (_, Extraction::Boxed | Extraction::AnswerIs)) => Some(found),
        _ => output.trim().lines().last().map(|line| (line.trim().to_string(), Extraction::Output)),
    }
}

fn answer_verdict(found: bool, correct: bool) -> String {
    match (found, correct) {
        (false, _) => "unparseable",
        (true, true) => "correct",
        (true, false) => "wrong",
    }
    .to_string()
}

/// What a benchmark reports: `pass@1` for code, `accuracy` for answers.
pub fn metric_of(bench: &Benchmark) -> &'static str {
    match bench.spec.grader {
        benchmark::Grader::Code { .. } => "pass@1",
        benchmark::Grader::Math { .. } | benchmark::Grader::Theoremqa { .. } => "accuracy",
    }
}

/// Metrics of one benchmark (`metric`: see [`metric_of`]) from its graded records.
pub fn summarize(
    benchmark: &str,
    metric: &str,
    records: &[ItemRecord],
    seed: u64,
    generation_seconds: Option<f64>,
    grading_seconds: f64,
) -> BenchmarkMetrics {
    // Per item: (samples, correct) in item order.
    let mut per_item: BTreeMap<&str, (usize, usize, &BTreeMap<String, String>)> = BTreeMap::new();
    for r in records {
        let entry = per_item.entry(&r.task_id).or_insert((0, 0, &r.groups));
        entry.0 += 1;
        entry.1 += r.correct as usize;
    }
    let samples = per_item.values().map(|e| e.0).min().unwrap_or(0);
    let item_scores: Vec<f64> = per_item.values().map(|&(n, c, _)| c as f64 / n as f64).collect();
    let pass_at_k = [1, 10, 100]
        .into_iter()
        .filter(|&k| k <= samples)
        .map(|k| {
            let mean = per_item.values().map(|&(n, c, _)| metrics::pass_at_k(n, c, k)).sum::<f64>() / per_item.len() as f64;
            (format!("pass@{k}"), mean)
        })
        .collect();
    let mut grouped: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for &(n, c, groups) in per_item.values() {
        for (name, value) in groups {
            grouped.entry(name.clone()).or_default().entry(value.clone()).or_default().push(c as f64 / n as f64);
        }
    }
    let rate = |hit: &dyn Fn(&ItemRecord) -> bool| records.iter().filter(|r| hit(r)).count() as f64 / records.len().max(1) as f64;
    let known_finish = records.iter().all(|r| r.finish.is_some());
    BenchmarkMetrics {
        benchmark: benchmark.to_string(),
        metric: metric.to_string(),
        score: metrics::estimate(&item_scores, seed),
        samples_per_item: samples,
        pass_at_k,
        truncated_rate: known_finish.then(|| rate(&|r| r.finish == Some(Finish::Length))),
        unparseable_rate: rate(&|r| r.extracted.as_deref().is_none_or(|e| e.trim().is_empty())),
        groups: grouped
            .into_iter()
            .map(|(name, values)| (name, values.into_iter().map(|(v, s)| (v, metrics::estimate(&s, seed))).collect()))
            .collect(),
        generation_seconds,
        grading_seconds,
        sandbox: None,
    }
}

/// Completions made elsewhere (vLLM, another harness): JSON Lines of
/// `{"task_id": <the benchmark's item id>, "completion": <raw generated text>}`, as
/// human-eval's sample files are; several rows for one task are several samples.
pub fn read_completions(path: &Path, bench: &Benchmark) -> Result<Vec<Completion>> {
    use std::io::BufRead;
    let index: std::collections::HashMap<&str, usize> =
        bench.items.iter().enumerate().map(|(i, item)| (item.id.as_str(), i)).collect();
    let mut samples = vec![0usize; bench.items.len()];
    let mut completions = Vec::new();
    for (n, line) in crate::util::open_text(path)?.lines().enumerate() {
        let at = |what: String| Error::format(path, format!("line {}: {what}", n + 1));
        let line = line.map_err(|e| at(format!("unreadable ({e})")))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line).map_err(|e| at(format!("not JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match row.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                // Numeric ids (GSM8K rows are numbered) are accepted as written.
                Some(serde_json::Value::Number(x)) if name == "task_id" => Ok(x.to_string()),
                Some(other) => Err(at(format!("field `{name}`: expected a string, found {other}"))),
                None => Err(at(format!("field `{name}`: missing"))),
            }
        };
        let task_id = field("task_id")?;
        let item = *index
            .get(task_id.as_str())
            .ok_or_else(|| at(format!("field `task_id`: `{task_id}` is not an item of {}", bench.name())))?;
        completions.push(Completion { item, sample: samples[item], text: field("completion")?, finish: None, new_tokens: None });
        samples[item] += 1;
    }
    if completions.is_empty() {
        return Err(Error::format(path, "no completions"));
    }
    Ok(completions)
}

/// Generates `samples` completions for each of `items` with the benchmark's decoding
/// settings as given in `options`.
pub fn generate_completions(
    model: &crate::model::LoadedModel,
    bench: &Benchmark,
    items: &[usize],
    samples: usize,
    options: &crate::generate::GenerateOptions,
    on_tokens: impl FnMut(usize),
) -> Result<Vec<Completion>> {
    let mut prompts = Vec::with_capacity(items.len() * samples);
    let mut which = Vec::with_capacity(items.len() * samples);
    for sample in 0..samples {
        for &item in items {
            prompts.push(crate::generate::prompt_ids(model, &bench.items[item].prompt, &bench.spec.response_prefix)?);
            which.push((item, sample));
        }
    }
    let generations = crate::generate::generate(model, &prompts, options, on_tokens)?;
    Ok(which
        .into_iter()
        .zip(generations)
        .map(|((item, sample), g)| Completion {
            item,
            sample,
            text: g.text,
            finish: Some(g.finish),
            new_tokens: Some(g.new_tokens),
        })
        .collect())
}

/// Where completions come from.
pub enum Answers<'a> {
    /// Generated here with the benchmark's decoding settings (overridable in [`EvalOptions`]).
    Model(&'a crate::model::LoadedModel),
    /// A completions file made elsewhere (one benchmark only).
    File(&'a Path),
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Only the first N items of each benchmark.
    pub limit: Option<usize>,
    /// Completions per item (pass@k for k up to this).
    pub samples: usize,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub batch_size: usize,
    /// Seeds sampling and the bootstrap intervals.
    pub seed: u64,
    /// Only the items of this shard (by a hash of their id); [`merge`] joins the parts.
    pub shard: Option<Shard>,
    pub progress: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            samples: 1,
            temperature: None,
            top_p: None,
            max_new_tokens: None,
            batch_size: 16,
            seed: 0,
            shard: None,
            progress: false,
        }
    }
}

/// Benchmarks by name (files in `eval_dir`) or path, their data read from `data_dir`.
pub fn load_benchmarks(names: &[String], eval_dir: &Path, data_dir: &Path) -> Result<Vec<Benchmark>> {
    names.iter().map(|name| Benchmark::load(&benchmark::spec_path(name, eval_dir)?, data_dir)).collect()
}

/// A sandbox when some benchmark runs code.
pub fn sandbox_for(benches: &[Benchmark], config: sandbox::SandboxConfig) -> Result<Option<sandbox::Sandbox>> {
    let runs_code = |b: &Benchmark| matches!(b.spec.grader, benchmark::Grader::Code { .. }) || b.spec.grader.program_of_thought();
    if !benches.iter().any(runs_code) {
        return Ok(None);
    }
    sandbox::Sandbox::new(config).map(Some).map_err(|e| Error::Invalid(format!("code sandbox: {e}")))
}

/// Evaluates every benchmark, writing `out/items.jsonl` (every item's record) and
/// `out/metrics.json` (per benchmark, by name); returns the metrics in benchmark order.
pub fn evaluate(
    answers: Answers,
    benches: &[Benchmark],
    sandbox: Option<&sandbox::Sandbox>,
    options: &EvalOptions,
    out: &Path,
) -> Result<Vec<BenchmarkMetrics>> {
    if options.samples == 0 {
        return Err(Error::Invalid("samples must be at least 1".into()));
    }
    if matches!(answers, Answers::File(_)) && benches.len() != 1 {
        return Err(Error::Invalid(format!("a completions file grades one benchmark, not {}", benches.len())));
    }
    let mut records_of = Vec::with_capacity(benches.len());
    let mut all = Vec::with_capacity(benches.len());
    for bench in benches {
        let limit = options.limit.unwrap_or(usize::MAX).min(bench.items.len());
        let in_shard = |item: usize| options.shard.is_none_or(|s| s.owns(&bench.items[item].id));
        let started = Instant::now();
        let (completions, generation_seconds) = match answers {
            Answers::Model(model) => {
                let decoding = &bench.spec.generation;
                let generate = crate::generate::GenerateOptions {
                    max_new_tokens: options.max_new_tokens.unwrap_or(decoding.max_new_tokens),
                    temperature: options.temperature.unwrap_or(decoding.temperature),
                    top_p: options.top_p.unwrap_or(decoding.top_p),
                    seed: options.seed,
                    stop: decoding.stop.clone(),
                    batch_size: options.batch_size,
                };
                let items: Vec<usize> = (0..limit).filter(|&i| in_shard(i)).collect();
                let bar = bar(options.progress, &format!("{} generating", bench.name()), "{human_pos} tokens  {per_sec}  {elapsed}");
                let completions = generate_completions(model, bench, &items, options.samples, &generate, |n| bar.inc(n as u64))?;
                bar.finish_and_clear();
                (completions, Some(started.elapsed().as_secs_f64()))
            }
            Answers::File(path) => {
                let mut completions = read_completions(path, bench)?;
                completions.retain(|c| c.item < limit && in_shard(c.item));
                (completions, None)
            }
        };
        let graded_at = Instant::now();
        let bar = bar(options.progress, &format!("{} grading", bench.name()), "{bar:30} {pos}/{len}  {per_sec}  ETA {eta}");
        bar.set_length(completions.len() as u64);
        let records = grade(bench, &completions, sandbox, || bar.inc(1))?;
        bar.finish_and_clear();
        let grading_seconds = graded_at.elapsed().as_secs_f64();
        let mut metrics = summarize(bench.name(), metric_of(bench), &records, options.seed, generation_seconds, grading_seconds);
        if matches!(bench.spec.grader, benchmark::Grader::Code { .. }) || bench.spec.grader.program_of_thought() {
            metrics.sandbox = sandbox.map(sandbox::Sandbox::protections);
        }
        tracing::info!("{}: {} {:.1}% over {} items", bench.name(), metrics.metric, 100.0 * metrics.score.value, metrics.score.n);
        records_of.push(records);
        all.push(metrics);
    }
    write_results(out, &records_of, &all)?;
    if let Some(shard) = options.shard {
        let record = ShardRecord { shard, run: run_digest(&answers, benches, options)?, seed: options.seed };
        let path = out.join(SHARD_RECORD);
        std::fs::write(&path, serde_json::to_string_pretty(&record).expect("plain data serialises"))
            .map_err(|e| Error::io(&path, e))?;
    }
    Ok(all)
}

/// `items.jsonl` (every record, benchmark by benchmark) and `metrics.json` (by name).
fn write_results(out: &Path, records_of: &[Vec<ItemRecord>], metrics: &[BenchmarkMetrics]) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let items_path = out.join("items.jsonl");
    let file = std::fs::File::create(&items_path).map_err(|e| Error::io(&items_path, e))?;
    let mut items_file = std::io::BufWriter::new(file);
    for r in records_of.iter().flatten() {
        serde_json::to_writer(&mut items_file, r).expect("plain data serialises");
        items_file.write_all(b"\n").map_err(|e| Error::io(&items_path, e))?;
    }
    items_file.flush().map_err(|e| Error::io(&items_path, e))?;
    let by_name: serde_json::Map<String, serde_json::Value> =
        metrics.iter().map(|m| (m.benchmark.clone(), serde_json::to_value(m).expect("plain data serialises"))).collect();
    let metrics_path = out.join("metrics.json");
    let json = serde_json::to_string_pretty(&by_name).expect("plain data serialises") + "\n";
    std::fs::write(&metrics_path, json).map_err(|e| Error::io(&metrics_path, e))
}

const SHARD_RECORD: &str = "shard.json";

/// Which shard an output folder holds and of which evaluation run.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardRecord {
    shard: Shard,
    /// [`run_digest`]: the answers, the benchmarks and every setting but the shard.
    run: String,
    /// Seeds the merged bootstrap intervals as it did the parts'.
    seed: u64,
}

fn run_digest(answers: &Answers, benches: &[Benchmark], options: &EvalOptions) -> Result<String> {
    let answers = match answers {
        Answers::Model(model) => format!("model {}", model.fingerprint()?),
        Answers::File(path) => format!("completions {}", crate::util::sha256_file(path)?),
    };
    let specs: Vec<String> = benches.iter().map(|b| format!("{:?}", b.spec)).collect();
    let settings = EvalOptions { shard: None, progress: false, ..options.clone() };
    Ok(crate::util::sha256_bytes(format!("{answers}\0{specs:?}\0{settings:?}").as_bytes())[..16].to_string())
}

/// Joins the output folders of `--shard i/N` evaluations (all N, once each, of one run)
/// into `out`: every item record, and metrics recomputed over all items, as one unsharded
/// run would have computed them. Generation and grading seconds are summed.
pub fn merge(parts: &[PathBuf], out: &Path) -> Result<Vec<BenchmarkMetrics>> {
    let mut covers = Vec::with_capacity(parts.len());
    let mut seed = 0;
    for part in parts {
        let path = part.join(SHARD_RECORD);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Invalid(format!("{}: not a finished evaluation shard ({} is missing: {e})", part.display(), path.display()))
        })?;
        let record: ShardRecord =
            serde_json::from_str(&text).map_err(|e| Error::format(&path, format!("not a shard record: {e}")))?;
        seed = record.seed;
        covers.push((part.clone(), record.shard, record.run));
    }
    crate::shard::check_cover(&covers)?;
    // Benchmarks in the order the parts list them (metrics.json keeps it), each with its
    // metric, the records of every part and the parts' seconds summed.
    let mut benchmarks: Vec<(BenchmarkMetrics, Vec<ItemRecord>)> = Vec::new();
    for part in parts {
        let metrics_path = part.join("metrics.json");
        let text = std::fs::read_to_string(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
        let metrics: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| Error::format(&metrics_path, format!("not eval metrics: {e}")))?;
        for value in metrics.into_values() {
            let m: BenchmarkMetrics = serde_json::from_value(value)
                .map_err(|e| Error::format(&metrics_path, format!("not eval metrics: {e}")))?;
            match benchmarks.iter_mut().find(|(b, _)| b.benchmark == m.benchmark) {
                Some((sum, _)) => {
                    sum.generation_seconds = sum.generation_seconds.zip(m.generation_seconds).map(|(a, b)| a + b);
                    sum.grading_seconds += m.grading_seconds;
                    // Shards may have run on machines that contained code differently.
                    sum.sandbox = match (sum.sandbox.take(), m.sandbox) {
                        (Some(a), Some(b)) => Some(a.weakest(&b)),
                        (a, b) => a.or(b),
                    };
                }
                None => benchmarks.push((m, Vec::new())),
            }
        }
        let items_path = part.join("items.jsonl");
        let text = std::fs::read_to_string(&items_path).map_err(|e| Error::io(&items_path, e))?;
        for (n, line) in text.lines().enumerate() {
            let at = |what: String| Error::format(&items_path, format!("line {}: {what}", n + 1));
            let record: ItemRecord = serde_json::from_str(line).map_err(|e| at(format!("not an item record: {e}")))?;
            let (_, records) = benchmarks
                .iter_mut()
                .find(|(b, _)| b.benchmark == record.benchmark)
                .ok_or_else(|| at(format!("benchmark `{}` is not in metrics.json", record.benchmark)))?;
            records.push(record);
        }
    }
    let merged: Vec<BenchmarkMetrics> = benchmarks
        .iter()
        .map(|(m, records)| BenchmarkMetrics {
            sandbox: m.sandbox.clone(),
            ..summarize(&m.benchmark, &m.metric, records, seed, m.generation_seconds, m.grading_seconds)
        })
        .collect();
    let records_of: Vec<Vec<ItemRecord>> = benchmarks.into_iter().map(|(_, records)| records).collect();
    write_results(out, &records_of, &merged)?;
    Ok(merged)
}

fn bar(visible: bool, prefix: &str, template: &str) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template(&format!("{{prefix}} {template}")).expect("static template"));
    bar.set_prefix(prefix.to_string());
    bar
}
