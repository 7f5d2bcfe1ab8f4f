//! The score store: scores survive a reopen (and a run killed before compaction), a second
//! run scores only what is missing, and a store from another model is refused.

use grape_harness::model::{self, LoadedModel};
use grape_harness::score::{self, pair_hash, Group, Score, ScoreOptions, ScoreStore};
use std::path::Path;

fn score(sum: f64, truncated: bool, token_logprobs: Option<Vec<f32>>) -> Score {
    Score { sum_logprob: sum, n_tokens: 3, n_bytes: 11, truncated, token_logprobs }
}

#[test]
fn rows_round_trip_through_parts_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.parquet");
    let a = score(-1.25, false, None);
    let b = score(-7.5, true, Some(vec![-1.0, -2.5, -4.0]));
    {
        let mut store = ScoreStore::open(&path, "fp-one").unwrap();
        assert!(store.is_empty());
        store.append(2048, vec![(pair_hash("p", "a"), a.clone())]).unwrap();
        store.append(512, vec![(pair_hash("p", "b"), b.clone())]).unwrap();
        // Dropped without compaction, as a killed run would leave it.
    }
    let mut store = ScoreStore::open(&path, "fp-one").unwrap();
    assert_eq!(store.len(), 2, "parts of an interrupted run are read back");
    assert_eq!(store.get(2048, &pair_hash("p", "a")), Some(&a));
    assert_eq!(store.get(512, &pair_hash("p", "b")), Some(&b));
    assert_eq!(store.get(2048, &pair_hash("p", "b")), None, "the maximum length is part of the key");
    store.compact().unwrap();
    assert!(!dir.path().join("scores.parquet.parts").exists());
    let reopened = ScoreStore::open(&path, "fp-one").unwrap();
    assert_eq!(reopened.get(512, &pair_hash("p", "b")), Some(&b));
    assert_eq!(ScoreStore::open_existing(&path).unwrap().fingerprint(), "fp-one");
}

#[test]
fn a_store_from_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.parquet");
    let mut store = ScoreStore::open(&path, "aaaaaaaaaaaaaaaaaaaa").unwrap();
    store.append(2048, vec![(pair_hash("p", "a"), score(-1.0, false, None))]).unwrap();
    store.compact().unwrap();
    let err = ScoreStore::open(&path, "bbbbbbbbbbbbbbbbbbbb").err().expect("refused").to_string();
    assert!(err.contains("scores.parquet") && err.contains("aaaaaaaaaaaa") && err.contains("bbbbbbbbbbbb"), "{err}");
}

#[test]
fn pair_hashes_separate_prompt_and_response() {
    assert_ne!(pair_hash("ab", "c"), pair_hash("a", "bc"));
    assert_eq!(pair_hash("ab", "c"), pair_hash("ab", "c"));
}

fn stories() -> Option<LoadedModel> {
    if !Path::new("../shared/models/stories260K.gguf").exists() {
        eprintln!("skipped: ../shared/models/stories260K.gguf is not here");
        return None;
    }
    Some(model::load("stories260k", &model::LoadOptions::default()).unwrap())
}

#[test]
fn a_second_run_scores_only_what_is_missing() {
    let Some(model) = stories() else { return };
    let groups = vec![
        Group { prompt: "Tell me about a cat.".into(), responses: vec!["The cat sat.".into(), "A cat ran home.".into()] },
        Group { prompt: "Who is Lily?".into(), responses: vec!["Lily is a girl.".into()] },
        Group { prompt: "Say hi.".into(), responses: vec!["Hi!".into(), "Hello there.".into()] },
    ];
    let options = ScoreOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scores.parquet");
    let fingerprint = model.fingerprint().unwrap();

    // A first run that got through the first two instructions only.
    let mut store = ScoreStore::open(&path, &fingerprint).unwrap();
    let (_, computed) = score::score_stored(&model, &groups[..2], &options, &mut store).unwrap();
    assert_eq!(computed, 3);
    drop(store);

    let mut store = ScoreStore::open(&path, &fingerprint).unwrap();
    let (scores, computed) = score::score_stored(&model, &groups, &options, &mut store).unwrap();
    assert_eq!(computed, 2, "only the third instruction's candidates are new");
    store.compact().unwrap();
    // Equal up to batch composition (the runs batched different candidates together).
    let fresh = score::score(&model, &groups, &options).unwrap();
    for (stored, fresh) in scores.iter().flatten().zip(fresh.iter().flatten()) {
        let (stored, fresh) = (stored.as_ref().unwrap(), fresh.as_ref().unwrap());
        assert_eq!((stored.n_tokens, stored.n_bytes, stored.truncated), (fresh.n_tokens, fresh.n_bytes, fresh.truncated));
        assert!((stored.sum_logprob - fresh.sum_logprob).abs() < 1e-4 * stored.n_tokens as f64, "{stored:?} vs {fresh:?}");
    }

    // Per-token log-probs asked for later are computed then, and kept.
    let with_tokens = ScoreOptions { keep_token_logprobs: true, ..options.clone() };
    let mut store = ScoreStore::open(&path, &fingerprint).unwrap();
    let (scores, computed) = score::score_stored(&model, &groups, &with_tokens, &mut store).unwrap();
    assert_eq!(computed, 5);
    assert!(scores.iter().flatten().flatten().all(|s| s.token_logprobs.as_ref().is_some_and(|t| t.len() == s.n_tokens)));
    let (_, computed) = score::score_stored(&model, &groups, &with_tokens, &mut store).unwrap();
    assert_eq!(computed, 0);
}

#[test]
fn fingerprints_follow_the_template() {
    let Some(model) = stories() else { return };
    let plain = model.fingerprint().unwrap();
    let options = model::LoadOptions { template: Some("chatml".into()), ..model::LoadOptions::default() };
    let chatml = model::load("stories260k", &options).unwrap();
    assert_ne!(plain, chatml.fingerprint().unwrap());
    assert_eq!(plain, model::load("stories260k", &model::LoadOptions::default()).unwrap().fingerprint().unwrap());
}
