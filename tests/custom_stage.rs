//! A selector that needs a stage of its own, added here without touching the runner: it
//! registers itself, brings its [`InputStage`], and the experiment graph, the dry run and the
//! local executor run that stage before selecting, in its own keyed folder.

use grape_harness::experiment::{self, plan, RunOptions};
use grape_harness::select::{self, InputStage, Needs, Params, Pick, SelectInput, Selection, SelectionCost, Selector, StageJob, StageTarget};
use std::collections::BTreeMap;
use std::sync::Arc;

mod common;

use common::{have, tiny_pool, STORIES};

/// Words per candidate, computed once per pool into `words.json`.
struct WordCounts;

impl InputStage for WordCounts {
    fn kind(&self) -> &'static str {
        "word-counts"
    }

    fn key_inputs(&self, target: &StageTarget) -> serde_json::Value {
        serde_json::json!({"target": target.fingerprint, "version": 1})
    }

    fn run(&self, job: &StageJob) -> grape_harness::Result<SelectionCost> {
        let counts: BTreeMap<String, Vec<usize>> = job
            .pool
            .instructions
            .iter()
            .map(|i| (i.id.clone(), i.candidates.iter().map(|c| c.response.split_whitespace().count()).collect()))
            .collect();
        std::fs::create_dir_all(job.dir).unwrap();
        std::fs::write(job.dir.join("words.json"), serde_json::to_string(&counts).unwrap()).unwrap();
        Ok(SelectionCost::default())
    }

    fn plan(&self, _: f64, _: usize, _: f64) -> (String, f64) {
        ("words per candidate".into(), 0.0)
    }
}

/// The wordiest response of each instruction, by the counts its stage wrote.
struct Wordiest;

impl Selector for Wordiest {
    fn name(&self) -> &'static str {
        "wordiest"
    }

    fn needs(&self) -> Needs {
        Needs::Stage(Arc::new(WordCounts))
    }

    fn select(&self, input: &SelectInput) -> grape_harness::Result<Selection> {
        let dir = input.stage.expect("the runner hands over the stage's folder");
        let counts: BTreeMap<String, Vec<usize>> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("words.json")).unwrap()).unwrap();
        let picks = input
            .pool
            .instructions
            .iter()
            .enumerate()
            .map(|(i, ins)| {
                let words = &counts[&ins.id];
                let best = (0..words.len()).max_by_key(|&j| (words[j], std::cmp::Reverse(j))).unwrap();
                Pick { instruction: i, candidate: best, score: Some(words[best] as f64), detail: None, why: "most words".into() }
            })
            .collect();
        Ok(Selection { selector: "wordiest".into(), picks, flagged: Vec::new(), report: None })
    }
}

fn build(_: &Params) -> grape_harness::Result<Box<dyn Selector>> {
    Ok(Box::new(Wordiest))
}

#[test]
fn a_selector_with_a_stage_of_its_own_runs_through_the_graph() {
    if !have(&[STORIES, "../shared/data/eval/gsmplus-testmini.jsonl.gz"]) {
        return;
    }
    select::register("wordiest", "the response with the most words", build);
    let dir = tempfile::tempdir().unwrap();
    let pool = tiny_pool(dir.path());
    let yaml = format!(
        "name: words\nseed: 1\ntargets: [{{name: stories260K, model: stories260k}}]\npool: {{path: {}}}\n\
         selectors: [{{name: wordiest}}]\ntraining: {{lr: 0.001, micro_batch_tokens: 96, max_len: 128}}\n\
         evaluation: {{benchmarks: [gsmplus], limit: 1, max_new_tokens: 4, base: false}}\n",
        pool.display()
    );
    let path = dir.path().join("words.yaml");
    std::fs::write(&path, yaml).unwrap();
    let runs = dir.path().join("runs");

    let planned = plan::plan(&path, &runs).unwrap().to_string();
    assert!(planned.contains("word-counts/") && planned.contains("(words per candidate) to run"), "{planned}");

    let options = RunOptions { runs_dir: runs.clone(), progress: false, report_only: false, unsandboxed: false };
    let results = experiment::run(&path, &options).unwrap();
    assert_eq!(results.rows.len(), 1);
    assert_eq!(results.rows[0].examples, Some(6));
    assert!(results.rows[0].metrics.contains_key("gsmplus"));

    let stages: Vec<_> = std::fs::read_dir(runs.join("words/word-counts")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(stages.len(), 1);
    assert!(stages[0].join("words.json").exists() && stages[0].join("DONE").exists());
    let manifest = std::fs::read_dir(runs.join("words/select")).unwrap().flatten().next().unwrap().path().join("manifest.jsonl");
    let reasons: Vec<String> = std::fs::read_to_string(manifest)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["why"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons, vec!["most words"; 6], "the selector read its stage's counts");
    let replanned = plan::plan(&path, &runs).unwrap().to_string();
    assert!(replanned.contains(", 0 to compute"), "{replanned}");
}
