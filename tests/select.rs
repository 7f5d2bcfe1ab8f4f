//! Selectors on a synthetic pool: argmax/argmin under each normalisation, seeded
//! reproducibility, counts, and clear errors.

use grape_harness::pool::{Candidate, Instruction, Pool};
use grape_harness::score::Score;
use grape_harness::select::{self, Params, SelectInput, Selection};

fn score(sum: f64, n_tokens: usize, n_bytes: usize) -> Option<Score> {
    Some(Score { sum_logprob: sum, n_tokens, n_bytes, truncated: false, token_logprobs: None })
}

/// Instruction 0 ranks its candidates differently under sum, mean and per-byte scores;
/// instruction 1 has a single candidate; the rest have 2..=6 candidates from sources m0...
fn pool_and_scores() -> (Pool, Vec<Vec<Option<Score>>>) {
    let mut instructions = vec![
        Instruction {
            id: "differs".into(),
            prompt: "P0".into(),
            candidates: (0..3).map(|j| Candidate { response: format!("r{j}"), source: format!("m{j}") }).collect(),
        },
        Instruction { id: "single".into(), prompt: "P1".into(), candidates: vec![Candidate { response: "only".into(), source: "m1".into() }] },
    ];
    let mut scores = vec![
        // sum: best c1, worst c2; mean: best c2, worst c1; bytes: best c0, worst c1.
        vec![score(-10.0, 10, 50), score(-6.0, 3, 12), score(-12.0, 24, 30)],
        vec![score(-3.0, 3, 9)],
    ];
    for i in 2..40 {
        let n = 2 + i % 5;
        instructions.push(Instruction {
            id: format!("i{i}"),
            prompt: format!("P{i}"),
            candidates: (0..n).map(|j| Candidate { response: format!("r{i}-{j}"), source: format!("m{j}") }).collect(),
        });
        scores.push((0..n).map(|j| score(-(((i * 7 + j * 13) % 17) as f64) - 1.0, 5 + j, 20 + j)).collect());
    }
    (Pool { instructions, skipped: Vec::new() }, scores)
}

fn run(name: &str, params: &[(&str, &str)], seed: u64) -> Selection {
    let (pool, scores) = pool_and_scores();
    let params: Params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let selector = select::build(name, &params).unwrap();
    selector.select(&SelectInput { pool: &pool, scores: Some(&scores), stage: None, seed }).unwrap()
}

fn picks_of(selection: &Selection, instruction: usize) -> Vec<usize> {
    selection.picks.iter().filter(|p| p.instruction == instruction).map(|p| p.candidate).collect()
}

#[test]
fn grape_takes_the_argmax_and_lowest_the_argmin_under_each_normalisation() {
    let (pool, scores) = pool_and_scores();
    for (normalize, best, worst) in [("sum", 1, 2), ("mean", 2, 1), ("bytes", 0, 1)] {
        let grape = run("grape", &[("normalize", normalize)], 0);
        let lowest = run("lowest", &[("normalize", normalize)], 0);
        assert_eq!(picks_of(&grape, 0), vec![best], "grape, {normalize}");
        assert_eq!(picks_of(&lowest, 0), vec![worst], "lowest, {normalize}");
        // Against brute force on every instruction.
        for (i, inst_scores) in scores.iter().enumerate() {
            let value = |j: usize| {
                let s = inst_scores[j].as_ref().unwrap();
                match normalize {
                    "sum" => s.sum_logprob,
                    "mean" => s.sum_logprob / s.n_tokens as f64,
                    _ => s.sum_logprob / s.n_bytes as f64,
                }
            };
            let n = pool.instructions[i].candidates.len();
            let max = (0..n).map(value).fold(f64::MIN, f64::max);
            let min = (0..n).map(value).fold(f64::MAX, f64::min);
            assert_eq!(value(picks_of(&grape, i)[0]), max, "grape {normalize} instruction {i}");
            assert_eq!(value(picks_of(&lowest, i)[0]), min, "lowest {normalize} instruction {i}");
        }
        assert_eq!(grape.picks.len(), pool.instructions.len());
    }
}

#[test]
fn grape_and_lowest_default_to_the_mean_log_probability() {
    // The final version of the paper keeps the highest length-normalised probability.
    let (_, scores) = pool_and_scores();
    let (grape, lowest) = (run("grape", &[], 0), run("lowest", &[], 0));
    for (i, inst_scores) in scores.iter().enumerate() {
        let mean: Vec<f64> = inst_scores.iter().map(|s| s.as_ref().map_or(f64::NAN, |s| s.sum_logprob / s.n_tokens as f64)).collect();
        // Ties go to the earlier candidate.
        let best = (0..mean.len()).fold(0, |b, j| if mean[j] > mean[b] { j } else { b });
        let worst = (0..mean.len()).fold(0, |w, j| if mean[j] < mean[w] { j } else { w });
        assert_eq!(picks_of(&grape, i), vec![best], "instruction {i}: {mean:?}");
        assert_eq!(picks_of(&lowest, i), vec![worst], "instruction {i}: {mean:?}");
    }
    // Instruction 0 is where the mean and the sum disagree: the sum's pick is candidate 1.
    assert_eq!(picks_of(&grape, 0), vec![2]);
    assert_eq!(picks_of(&run("grape", &[("normalize", "sum")], 0), 0), vec![1]);
}

#[test]
fn only_restricts_the_candidates_to_named_sources() {
    let (pool, scores) = pool_and_scores();
    for name in ["grape", "lowest", "random"] {
        let picked = run(name, &[("only", "m0,m1")], 3);
        for p in &picked.picks {
            let source = &pool.instructions[p.instruction].candidates[p.candidate].source;
            assert!(source == "m0" || source == "m1", "{name} picked {source}");
        }
        assert_eq!(picked.picks.len(), pool.instructions.len(), "{name}: every instruction has m0 or m1");
    }
    // Within m0 and m1, grape still takes the best mean: instruction 0's candidate 0 (-1.0 a
    // token, against candidate 1's -2.0), where over all three it takes candidate 2.
    assert_eq!(picks_of(&run("grape", &[("only", "m0,m1")], 0), 0), vec![0]);
    let params: Params = [("only".to_string(), "nobody".to_string())].into();
    let err = select::build("grape", &params).unwrap().select(&SelectInput { pool: &pool, scores: Some(&scores), stage: None, seed: 0 });
    assert!(err.unwrap_err().to_string().contains("only=nobody: no such source"));
}

#[test]
fn k_picks_are_best_first_and_counts_hold() {
    let (pool, _) = pool_and_scores();
    let grape = run("grape", &[("k", "2")], 0);
    let expected: usize = pool.instructions.iter().map(|i| i.candidates.len().min(2)).sum();
    assert_eq!(grape.picks.len(), expected);
    for i in 0..pool.instructions.len() {
        let picked: Vec<f64> = grape.picks.iter().filter(|p| p.instruction == i).map(|p| p.score.unwrap()).collect();
        assert!(picked.windows(2).all(|w| w[0] >= w[1]), "instruction {i}: {picked:?}");
    }
    assert!(grape.flagged.iter().any(|f| f.contains("`single`") && f.contains("single candidate")), "{:?}", grape.flagged);
}

#[test]
fn random_and_upscale_are_seeded_without_replacement() {
    let (pool, _) = pool_and_scores();
    for (name, params, per) in [("random", vec![], 1), ("upscale", vec![], 3), ("upscale", vec![("factor", "2")], 2)] {
        let a = run(name, &params, 7);
        let b = run(name, &params, 7);
        let c = run(name, &params, 8);
        assert_eq!(a, b, "{name}: same seed, same selection");
        assert_ne!(a.picks, c.picks, "{name}: different seeds should differ");
        for (i, instruction) in pool.instructions.iter().enumerate() {
            let mut picked = picks_of(&a, i);
            assert_eq!(picked.len(), instruction.candidates.len().min(per), "{name} instruction {i}");
            picked.sort();
            picked.dedup();
            assert_eq!(picked.len(), instruction.candidates.len().min(per), "{name}: a candidate picked twice");
        }
    }
    let upscale = run("upscale", &[], 7);
    assert!(upscale.flagged.iter().any(|f| f.contains("`single`") && f.contains("fewer than 3")));
}

#[test]
fn strongest_keeps_one_source_and_drops_or_fills() {
    let (pool, _) = pool_and_scores();
    let dropped = run("strongest", &[("source", "m2")], 0);
    let filled = run("strongest", &[("source", "m2"), ("fill", "random")], 0);
    let with_m2 = pool.instructions.iter().filter(|i| i.candidates.iter().any(|c| c.source == "m2")).count();
    assert_eq!(dropped.picks.len(), with_m2);
    assert_eq!(filled.picks.len(), pool.instructions.len());
    for p in &dropped.picks {
        assert_eq!(pool.instructions[p.instruction].candidates[p.candidate].source, "m2");
    }
    assert_eq!(dropped.flagged.len(), pool.instructions.len() - with_m2);
}

#[test]
fn bad_names_and_parameters_are_clear() {
    let (pool, scores) = pool_and_scores();
    let err = |name: &str, params: &[(&str, &str)]| -> String {
        let params: Params = params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match select::build(name, &params) {
            Err(e) => e.to_string(),
            Ok(s) => s.select(&SelectInput { pool: &pool, scores: Some(&scores), stage: None, seed: 0 }).unwrap_err().to_string(),
        }
    };
    let e = err("best", &[]);
    assert!(e.contains("unknown selector `best`") && e.contains("grape") && e.contains("upscale"), "{e}");
    let e = err("grape", &[("temperature", "1")]);
    assert!(e.contains("unknown parameter `temperature`") && e.contains("normalize"), "{e}");
    let e = err("grape", &[("normalize", "median")]);
    assert!(e.contains("normalize=median") && e.contains("sum, mean or bytes"), "{e}");
    let e = err("random", &[("k", "0")]);
    assert!(e.contains("at least 1"), "{e}");
    let e = err("strongest", &[("source", "gpt-9")]);
    assert!(e.contains("`gpt-9` is not in the pool") && e.contains("m0, m1"), "{e}");
    let e = err("strongest", &[]);
    assert!(e.contains("`source` is required"), "{e}");
    let selector = select::build("grape", &Params::new()).unwrap();
    let e = selector.select(&SelectInput { pool: &pool, scores: None, stage: None, seed: 0 }).unwrap_err().to_string();
    assert!(e.contains("needs scores"), "{e}");
}

#[test]
fn manifest_and_sft_files_are_written_in_messages_format() {
    let (pool, _) = pool_and_scores();
    let selection = run("grape", &[], 0);
    let dir = tempfile::tempdir().unwrap();
    select::write(&selection, &pool, dir.path()).unwrap();
    let manifest = std::fs::read_to_string(dir.path().join("manifest.jsonl")).unwrap();
    let sft = std::fs::read_to_string(dir.path().join("sft.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), selection.picks.len());
    assert_eq!(sft.lines().count(), selection.picks.len());
    let first: serde_json::Value = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
    assert_eq!(first["instruction_id"], "differs");
    // The best mean log-probability of instruction 0 is candidate 2's.
    assert_eq!(first["source"], "m2");
    assert_eq!(first["selector"], "grape");
    let row: serde_json::Value = serde_json::from_str(sft.lines().next().unwrap()).unwrap();
    assert_eq!(row["messages"][0]["role"], "user");
    assert_eq!(row["messages"][1]["content"], "r2");
}

#[test]
fn counts_like_a_source_longest_and_all() {
    let (pool, _) = pool_and_scores();
    // Per instruction as many as source m0 wrote (one each here; none in "single", so one).
    let like = run("grape", &[("like", "m0"), ("k", "2")], 0);
    for (i, ins) in pool.instructions.iter().enumerate() {
        assert_eq!(picks_of(&like, i).len(), ins.candidates.len().min(2), "{}", ins.id);
    }
    let upscale = run("upscale", &[("factor", "3"), ("like", "m0")], 1);
    assert_eq!(picks_of(&upscale, 2).len(), 3);
    let strongest = run("strongest", &[("source", "m1"), ("k", "all")], 0);
    assert_eq!(picks_of(&strongest, 0), vec![1]);
    let longest = run("longest", &[("k", "2")], 0);
    // "differs" has r0, r1, r2 of equal length: ties go to the earlier candidates.
    assert_eq!(picks_of(&longest, 0), vec![0, 1]);
    assert_eq!(run("all", &[], 0).picks.len(), pool.candidate_count());
    let params: Params = [("like".to_string(), "nobody".to_string())].into();
    let err = select::build("random", &params)
        .unwrap()
        .select(&SelectInput { pool: &pool, scores: None, stage: None, seed: 0 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("like=nobody") && err.contains("m0"), "{err}");
}
