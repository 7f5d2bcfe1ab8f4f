//! SFT data: `messages` rows (what `harness select` writes, and what TRL, open-instruct and
//! axolotl read), encoded exactly as the scorer encodes a pair, and cut into micro-batches
//! by a token budget.

use crate::model::{EncodedPair, LoadedModel};
use crate::util::Rng;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Default)]
pub struct SftData {
    pub examples: Vec<EncodedPair>,
    /// Examples longer than the maximum length, cut to it.
    pub truncated: usize,
    /// Examples whose prompt alone fills the maximum length: nothing of the response would
    /// be left to train on, so they are left out (one such example must not end a run).
    pub skipped: usize,
}

impl SftData {
    /// Encodes a pair as the scorer does and adds it, cut to `max_len` tokens, or counts it
    /// as skipped when its prompt alone fills them.
    pub fn push(&mut self, model: &LoadedModel, prompt: &str, response: &str, max_len: usize) -> std::result::Result<(), String> {
        let pair = model.encode_pair(prompt, response).map_err(|e| e.to_string())?;
        let cut = pair.ids.len() > max_len;
        match pair.truncated(max_len) {
            Some(pair) => {
                self.truncated += usize::from(cut);
                self.examples.push(pair);
            }
            None => self.skipped += 1,
        }
        Ok(())
    }
}

/// Reads `path` (JSON Lines, one `{"messages": [user..., assistant]}` per line). A row
/// without a final assistant turn, or with an empty one, is an error naming its line.
pub fn read(path: &Path, model: &LoadedModel, max_len: usize) -> Result<SftData> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut data = SftData::default();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at_line = |what: String| Error::format(path, format!("line {}: {what}", n + 1));
        let (prompt, response) = parse_row(line).map_err(at_line)?;
        data.push(model, &prompt, &response, max_len).map_err(at_line)?;
    }
    if data.examples.is_empty() {
        let why = match data.skipped {
            0 => String::new(),
            n => format!(" ({n} skipped: each prompt alone fills the maximum length of {max_len} tokens)"),
        };
        return Err(Error::format(path, format!("no training examples{why}")));
    }
    if data.truncated > 0 {
        tracing::warn!("{}: {} examples longer than {max_len} tokens were truncated", path.display(), data.truncated);
    }
    if data.skipped > 0 {
        tracing::warn!(
            "{}: {} examples skipped: the prompt alone fills the maximum length of {max_len} tokens",
            path.display(),
            data.skipped
        );
    }
    Ok(data)
}

fn parse_row(line: &str) -> std::result::Result<(String, String), String> {
    let row: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let messages = row
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("field `messages`: expected a list of {role, content}")?;
    let Some((last, turns)) = messages.split_last() else { return Err("field `messages` is empty".into()) };
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        return Err("field `messages`: no assistant turn at the end to train on".into());
    }
    let response = last.get("content").and_then(Value::as_str).ok_or("the assistant turn has no string `content`")?;
    if response.trim().is_empty() {
        return Err("the assistant response is empty".into());
    }
    let prompt = crate::pool::user_turns(turns).map_err(|e| format!("field `messages`: {e}"))?;
    Ok((prompt, response.to_string()))
}

/// One epoch's micro-batches (indices into `examples`): examples sorted by length, ties in
/// a seeded order, are cut into runs whose rows × longest length fit `budget` tokens (at
/// least one row each), and the runs are shuffled, all from `seed` alone.
pub fn micro_batches(examples: &[EncodedPair], budget: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    rng.shuffle(&mut order);
    order.sort_by_key(|&i| examples[i].ids.len());
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted ascending, so this example is the longest of the run so far.
        let width = examples[i].ids.len();
        if !current.is_empty() && (current.len() + 1) * width > budget {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    rng.shuffle(&mut batches);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_need_a_final_non_empty_assistant_turn() {
        let ok = r#"{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#;
        assert_eq!(parse_row(ok).unwrap(), ("Q".to_string(), "A".to_string()));
        let no_assistant = r#"{"messages": [{"role": "user", "content": "Q"}]}"#;
        assert!(parse_row(no_assistant).unwrap_err().contains("no assistant turn"));
        let empty = r#"{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}"#;
        assert!(parse_row(empty).unwrap_err().contains("empty"));
        assert!(parse_row(r#"{"prompt": "Q"}"#).unwrap_err().contains("`messages`"));
    }

    #[test]
    fn micro_batches_fit_the_budget_cover_everything_once_and_follow_the_seed() {
        let example = |len: usize| EncodedPair { ids: vec![1; len], response_mask: vec![true; len], first_response: 1 };
        let examples: Vec<EncodedPair> = [5, 9, 3, 12, 7, 7, 30, 2, 11, 4].into_iter().map(example).collect();
        let batches = micro_batches(&examples, 24, 7);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        for b in &batches {
            let width = b.iter().map(|&i| examples[i].ids.len()).max().unwrap();
            assert!(b.len() == 1 || b.len() * width <= 24, "{b:?}");
        }
        assert_eq!(batches, micro_batches(&examples, 24, 7));
        assert_ne!(batches, micro_batches(&examples, 24, 8));
    }
}
