//! Batched generation against one prompt at a time, stop sequences, budgets and seeded
//! sampling, on the smallest real model (stories260K).

use grape_harness::generate::{generate, prompt_ids, Finish, GenerateOptions, Generation};
use grape_harness::model::{self, LoadedModel};
use std::path::Path;

fn stories() -> Option<LoadedModel> {
    let path = Path::new("../shared/models/stories260K.gguf");
    if !path.exists() {
        eprintln!("skipped: {} is not here", path.display());
        return None;
    }
    Some(model::load("stories260k", &model::LoadOptions::default()).unwrap())
}

const PROMPTS: [&str; 6] = [
    "Once upon a time",
    "Lily and Tom went to the park. They saw a big dog and",
    "The sun",
    "One day, a little girl named Sue found a shiny red ball in the garden. She wanted to",
    "Tim was sad because",
    "The cat",
];

fn run(m: &LoadedModel, options: &GenerateOptions) -> Vec<Generation> {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| prompt_ids(m, p, "").unwrap()).collect();
    generate(m, &prompts, options, |_| {}).unwrap()
}

#[test]
fn batched_greedy_equals_one_prompt_at_a_time() {
    let Some(m) = stories() else { return };
    let one = GenerateOptions { max_new_tokens: 48, batch_size: 1, ..Default::default() };
    let alone = run(&m, &one);
    // Batches of 4 mix prompt lengths (right padding) and rows that finish early.
    let batched = run(&m, &GenerateOptions { batch_size: 4, ..one.clone() });
    assert_eq!(alone, batched);
    assert!(alone.iter().all(|g| !g.text.is_empty()), "{alone:?}");
    assert!(alone.iter().any(|g| g.finish == Finish::Length && g.new_tokens == 48), "{alone:?}");
}

#[test]
fn a_stop_sequence_ends_the_text_before_it() {
    let Some(m) = stories() else { return };
    let free = run(&m, &GenerateOptions { max_new_tokens: 40, ..Default::default() });
    // A stop taken from the middle of the first free generation.
    let text = &free[0].text;
    let cut = text.char_indices().map(|(i, _)| i).find(|&i| i >= text.len() / 2).unwrap();
    let stop: String = text[cut..].chars().take(3).collect();
    let stopped = run(&m, &GenerateOptions { max_new_tokens: 40, stop: vec![stop.clone()], ..Default::default() });
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(stopped[0].text, expected);
    assert_eq!(stopped[0].finish, Finish::Stop);
    for (free, stopped) in free.iter().zip(&stopped) {
        assert!(!stopped.text.contains(&stop));
        assert!(free.text.starts_with(&stopped.text));
    }
}

#[test]
fn sampling_is_seeded_per_prompt_whatever_the_batch() {
    let Some(m) = stories() else { return };
    let sample = GenerateOptions { max_new_tokens: 32, temperature: 1.0, top_p: 0.9, seed: 7, ..Default::default() };
    let a = run(&m, &GenerateOptions { batch_size: 1, ..sample.clone() });
    let b = run(&m, &GenerateOptions { batch_size: 6, ..sample.clone() });
    assert_eq!(a, b);
    let other_seed = run(&m, &GenerateOptions { seed: 8, ..sample.clone() });
    assert_ne!(a, other_seed);
    let greedy = run(&m, &GenerateOptions { temperature: 0.0, ..sample });
    assert_ne!(a, greedy);
}
