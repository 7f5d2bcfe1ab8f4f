//! Evaluation as the Eurus/UltraInteract protocol does it: benchmark files (`benchmark`),
//! generated code run in a sandbox (`sandbox`), final answers extracted and compared by a
//! careful grader (`math_grade`), pass@k and accuracy with bootstrap intervals (`metrics`).
//! Every item's prompt, completion, extracted answer and verdict is kept.

pub mod benchmark;
pub mod math_grade;
pub mod metrics;
pub mod sandbox;

use crate::generate::Finish;
use crate::{Error, Result};
use benchmark::{Benchmark, Reference};
use metrics::Estimate;
use serde::Serialize;
use std::collections::BTreeMap;
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
#[derive(Debug, Clone, Serialize)]
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
    pub grade_seconds: f64,
    pub groups: BTreeMap<String, String>,
}

/// One benchmark's line of `metrics.json`.
#[derive(Debug, Clone, Serialize)]
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
            r.grade_seconds = outcome.seconds;
        }
    }
    for (c, r) in completions.iter().zip(records.iter_mut()) {
        let graded = Instant::now();
        match &bench.items[c.item].reference {
            Reference::Code { .. } => continue,
            Reference::Answer(reference) => {
                let found = math_grade::extract_answer(&c.text);
                r.correct = found.as_ref().is_some_and(|(answer, _)| math_grade::is_equiv(answer, reference));
                r.verdict = match (&found, r.correct) {
                    (None, _) => "unparseable",
                    (Some(_), true) => "correct",
                    (Some(_), false) => "wrong",
                }
                .to_string();
                r.reference = Some(reference.clone());
                r.extraction = found.as_ref().map(|(_, how)| format!("{how:?}"));
                r.extracted = found.map(|(answer, _)| answer);
            }
            Reference::Unanswerable => {
                r.correct = math_grade::says_insufficient(&c.text);
                r.verdict = if r.correct { "correct" } else { "wrong" }.to_string();
                r.reference = Some("(the question lacks information)".into());
                r.extracted = math_grade::extract_answer(&c.text).map(|(answer, _)| answer);
            }
        }
        r.grade_seconds = graded.elapsed().as_secs_f64();
        on_graded();
    }
    tracing::debug!("graded {} completions of {} in {:.1}s", records.len(), bench.name(), start.elapsed().as_secs_f64());
    Ok(records)
}

/// Metrics of one benchmark from its graded records.
pub fn summarize(
    bench: &Benchmark,
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
        benchmark: bench.name().to_string(),
        metric: match bench.spec.grader {
            benchmark::Grader::Code { .. } => "pass@1",
            benchmark::Grader::Math { .. } => "accuracy",
        }
        .to_string(),
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
    }
}

/// Completions made elsewhere (vLLM, another harness): JSON Lines of
/// `{"task_id": <the benchmark's item id>, "completion": <raw generated text>}`, as
/// human-eval's sample files are; several rows for one task are several samples.
pub fn read_completions(path: &std::path::Path, bench: &Benchmark) -> Result<Vec<Completion>> {
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
