//! Helpers shared by the tests that run the `harness` binary.
#![allow(dead_code)] // each test file uses its own share of them

use std::path::Path;
use std::process::{Command, Output};

/// Runs `harness` with its model cache in `cache`.
pub fn harness(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_harness")).args(args).env("HARNESS_CACHE_DIR", cache).output().unwrap()
}

/// Stdout of a run that must succeed.
pub fn succeeded(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Whether every file in `paths` (models, data under ../shared) is here; says which is not.
pub fn have(paths: &[&str]) -> bool {
    match paths.iter().map(Path::new).find(|p| !p.exists()) {
        Some(missing) => {
            eprintln!("skipped: {} is not here", missing.display());
            false
        }
        None => true,
    }
}

pub const STORIES: &str = "../shared/models/stories260K.gguf";

/// The single `error:` line of a run that must fail cleanly: non-zero exit, no panic.
pub fn one_error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "expected one error line: {stderr}");
    errors[0].to_string()
}

/// A few instructions with story-like candidates (stories260K knows the words): one to
/// four responses each, short and long.
pub fn story_groups() -> Vec<grape_harness::score::Group> {
    let g = |prompt: &str, responses: &[&str]| grape_harness::score::Group {
        prompt: prompt.into(),
        responses: responses.iter().map(|r| r.to_string()).collect(),
    };
    vec![
        g("Tell me a story about a cat.", &[
            "Once upon a time, there was a cat named Tom.",
            "The cat sat on the mat and was happy.",
            "Tom liked to play with a red ball. One day the ball rolled away and Tom ran after it.",
            "Meow.",
        ]),
        g("What did Lily find in the park?", &[
            "Lily found a big shiny rock in the park.",
            "She found a little bird that could not fly, so she took it home and gave it water.",
        ]),
        g("Why was the sun sad?", &["The sun was sad because the clouds hid it all day."]),
        g("Say something kind.", &["You are a good friend.", "Thank you for helping me today!", "I love you, mom."]),
    ]
}

