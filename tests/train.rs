//! The SFT trainer on stories260K: it learns, it trains on response tokens only, its
//! accumulation is token-weighted, a resumed run ends where an uninterrupted one does, and
//! the exported folder reloads to the same logits.

use candle_core::{DType, Tensor, D};
use grape_harness::model::{self, LoadedModel, Mode};
use grape_harness::train::{self, data::SftData, optim::Schedule, TrainConfig, Trainable};
use std::path::Path;

const STORIES: &str = "../shared/models/stories260K.gguf";

fn stories() -> Option<(LoadedModel, candle_nn::VarMap)> {
    if !Path::new(STORIES).exists() {
        eprintln!("skipped: {STORIES} is not here");
        return None;
    }
    Some(model::load_trainable("stories260k", &model::LoadOptions::default()).unwrap())
}

const EXAMPLES: [(&str, &str); 4] = [
    ("What did the cat do?", "The cat sat on the red mat and slept."),
    ("Who is Tom?", "Tom is a big dog who likes to run."),
    ("Where is the ball?", "The ball is in the park under a tree."),
    ("What did Lily eat?", "Lily ate a yummy cake with her mom."),
];

fn write_sft(dir: &Path, rows: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("sft.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|(p, r)| {
            serde_json::json!({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn sft(m: &LoadedModel, dir: &Path) -> SftData {
    train::data::read(&write_sft(dir, &EXAMPLES), m, 256).unwrap()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        max_steps: Some(steps),
        micro_batch_tokens: 256,
        schedule: Schedule::Constant,
        warmup_ratio: 0.0,
        ..TrainConfig::default()
    }
}

fn target<'a>(m: &'a LoadedModel, vars: &'a candle_nn::VarMap) -> Trainable<'a> {
    Trainable { model: m, vars, base_fingerprint: m.fingerprint().unwrap() }
}

#[test]
fn a_tiny_model_overfits_four_examples() {
    let Some((m, vars)) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = sft(&m, dir.path());
    let report = train::train(&target(&m, &vars), &data, &config(60), dir.path(), false, false).unwrap();
    let (first, last) = (report.first_loss.unwrap(), report.final_loss.unwrap());
    assert!(last < 0.2 * first, "loss {first} -> {last}");
    assert!(report.weight_l2_distance > 0.0);
    let log = std::fs::read_to_string(dir.path().join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 61, "a header and one row per step");
    assert!(std::fs::read_to_string(dir.path().join("loss.svg")).unwrap().contains("<polyline"));
}

/// The same loss computed the long way: full logits at every position, labels everywhere,
/// prompt labels set to arbitrary tokens and weighted zero. Loss and gradients agree, so
/// prompt tokens contribute exactly nothing whatever their labels.
#[test]
fn prompt_tokens_contribute_nothing_to_loss_or_gradient() {
    let Some((m, vars)) = stories() else { return };
    let pair = m.encode_pair(EXAMPLES[0].0, EXAMPLES[0].1).unwrap();
    let named = train::sorted_vars(&vars);
    let (loss, grads, n, _) = train::loss_and_grads(&m, &named, &[vec![&pair]]).unwrap();
    assert_eq!(n, pair.response_mask.iter().skip(1).filter(|&&r| r).count());

    let decoder = m.decoder().unwrap();
    let len = pair.ids.len();
    let x = Tensor::new(pair.ids.as_slice(), &m.device).unwrap().unsqueeze(0).unwrap();
    let hidden = decoder.forward(&x, &[len], None, Mode::Train).unwrap();
    let logits = decoder.project(&hidden.squeeze(0).unwrap()).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    // Position t predicts token t + 1; prompt labels are garbage (token 7), weight 0.
    let labels: Vec<u32> = (0..len - 1).map(|t| if pair.response_mask[t + 1] { pair.ids[t + 1] } else { 7 }).collect();
    let weights: Vec<f32> = (0..len - 1).map(|t| if pair.response_mask[t + 1] { 1.0 } else { 0.0 }).collect();
    let picked = logp
        .narrow(0, 0, len - 1)
        .unwrap()
        .gather(&Tensor::new(labels.as_slice(), &m.device).unwrap().unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let manual = ((picked * Tensor::new(weights.as_slice(), &m.device).unwrap()).unwrap().sum_all().unwrap()
        * (-1.0 / n as f64))
        .unwrap();
    let manual_value = manual.to_scalar::<f32>().unwrap() as f64;
    assert!((manual_value - loss).abs() < 1e-5, "{manual_value} vs {loss}");
    let manual_grads = manual.backward().unwrap();
    for (name, var) in &named {
        let ours = &grads[name];
        let theirs = manual_grads.get(var.as_tensor()).unwrap();
        let gap = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap < 1e-5, "{name}: gradient gap {gap}");
    }
}

#[test]
fn accumulation_weights_every_response_token_equally() {
    let Some((m, vars)) = stories() else { return };
    let short = m.encode_pair(EXAMPLES[1].0, "Tom runs.").unwrap();
    let long = m.encode_pair(EXAMPLES[2].0, EXAMPLES[2].1).unwrap();
    assert_ne!(short.targets().count(), long.targets().count());
    let named = train::sorted_vars(&vars);
    let (one, g_one, n_one, _) = train::loss_and_grads(&m, &named, &[vec![&short, &long]]).unwrap();
    let (two, g_two, n_two, _) = train::loss_and_grads(&m, &named, &[vec![&short], vec![&long]]).unwrap();
    assert_eq!(n_one, n_two);
    assert!((one - two).abs() < 1e-5, "{one} vs {two}");
    for (name, _) in &named {
        let gap = (&g_one[name] - &g_two[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap < 1e-5, "{name}: {gap}");
    }
}

fn weights_of(vars: &candle_nn::VarMap) -> Vec<(String, Tensor)> {
    train::sorted_vars(vars).into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect()
}

#[test]
fn a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one() {
    let Some((m, vars)) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = sft(&m, dir.path());
    let cfg = TrainConfig { save_every: Some(3), keep_checkpoints: 5, micro_batch_tokens: 64, grad_accum: 2, ..config(6) };
    let whole = dir.path().join("whole");
    train::train(&target(&m, &vars), &data, &cfg, &whole, false, false).unwrap();
    let expected = weights_of(&vars);

    // A second run from the base weights, "killed" after step 3: only its step-3 checkpoint
    // and the log up to there survive.
    let (m2, vars2) = stories().unwrap();
    let resumed = dir.path().join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    copy_dir(&whole.join("checkpoints/step-00000003"), &resumed.join("checkpoints/step-00000003"));
    let log = std::fs::read_to_string(whole.join("train_log.jsonl")).unwrap();
    let partial: Vec<&str> = log.lines().take(3).collect();
    std::fs::write(resumed.join("train_log.jsonl"), partial.join("\n") + "\n{\"step\": 4, \"lo").unwrap();
    let report = train::train(&target(&m2, &vars2), &data, &cfg, &resumed, true, false).unwrap();
    assert_eq!(report.resumed_from, Some(3));
    for ((name, want), (_, got)) in expected.iter().zip(weights_of(&vars2)) {
        let gap = (want - &got).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(gap < 1e-6, "{name}: {gap}");
    }
    let resumed_log = std::fs::read_to_string(resumed.join("train_log.jsonl")).unwrap();
    assert_eq!(resumed_log.lines().count(), 6);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn the_exported_folder_reloads_to_the_same_logits() {
    let Some((m, vars)) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let data = sft(&m, dir.path());
    train::train(&target(&m, &vars), &data, &config(3), dir.path(), false, false).unwrap();
    let exported = model::load(dir.path().join("model").to_str().unwrap(), &model::LoadOptions::default()).unwrap();
    let pair = m.encode_pair("Who is Lily?", "Lily is a girl.").unwrap();
    assert_eq!(pair, exported.encode_pair("Who is Lily?", "Lily is a girl.").unwrap(), "same tokens and template");
    let x = Tensor::new(pair.ids.as_slice(), &m.device).unwrap().unsqueeze(0).unwrap();
    let logits = |m: &LoadedModel| {
        let d = m.decoder().unwrap();
        d.project(&d.forward(&x, &[pair.ids.len()], None, Mode::Infer).unwrap().squeeze(0).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (trained, reloaded) = (logits(&m), logits(&exported));
    let gap = (&trained - &reloaded).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = trained.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    // The weights are bit-identical; the trained decoder's weights are variables, so its MLP
    // takes the training kernel, whose exp differs from candle's in the last bits.
    assert!(gap <= 1e-6 * scale.max(1.0), "logit gap {gap} at logits up to {scale}");
}

#[test]
fn bad_training_input_is_named() {
    let Some((m, vars)) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let check = |line: &str, expected: &str| {
        std::fs::write(&path, format!("{}\n{line}\n", write_row("Hi?", "Hello."))).unwrap();
        let err = train::data::read(&path, &m, 256).err().expect("refused").to_string();
        assert!(err.contains("bad.jsonl") && err.contains("line 2") && err.contains(expected), "{err}");
    };
    check(r#"{"messages": [{"role": "user", "content": "Q"}]}"#, "no assistant turn");
    check(r#"{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}"#, "empty");

    // Longer than the maximum: truncated and counted.
    let long = "The cat ran and ran. ".repeat(40);
    std::fs::write(&path, write_row("Tell me a long story.", &long)).unwrap();
    let data = train::data::read(&path, &m, 64).unwrap();
    assert_eq!((data.truncated, data.examples[0].ids.len()), (1, 64));

    // A checkpoint from another model is refused on resume.
    let cfg = TrainConfig { save_every: Some(1), ..config(1) };
    train::train(&target(&m, &vars), &data, &cfg, dir.path(), false, false).unwrap();
    let other = Trainable { model: &m, vars: &vars, base_fingerprint: "another-model-fingerprint".into() };
    let err = train::train(&other, &data, &cfg, dir.path(), true, false).err().expect("refused").to_string();
    assert!(err.contains("checkpoint") && err.contains("another-mod"), "{err}");
}

fn write_row(prompt: &str, response: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}).to_string()
}

#[test]
fn an_example_whose_prompt_fills_the_maximum_length_is_skipped_and_counted() {
    let Some((m, vars)) = stories() else { return };
    let dir = tempfile::tempdir().unwrap();
    let long_prompt = "Once upon a time there was a cat. ".repeat(20);
    let rows = [(EXAMPLES[0].0, EXAMPLES[0].1), (long_prompt.as_str(), "The cat slept."), (EXAMPLES[1].0, EXAMPLES[1].1)];
    let data = train::data::read(&write_sft(dir.path(), &rows), &m, 64).unwrap();
    assert_eq!((data.examples.len(), data.skipped), (2, 1));
    let report = train::train(&target(&m, &vars), &data, &config(2), &dir.path().join("run"), false, false).unwrap();
    assert_eq!((report.skipped_examples, report.steps), (1, 2));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("run/report.json")).unwrap()).unwrap();
    assert_eq!(written["skipped_examples"], 1);
    // Only when nothing is left is it an error, which says why.
    let err = train::data::read(&write_sft(dir.path(), &rows[1..2]), &m, 64).err().unwrap().to_string();
    assert!(err.contains("no training examples (1 skipped"), "{err}");
}
