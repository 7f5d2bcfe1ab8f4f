//! Candidate pools: for each instruction, responses written by several models.
//!
//! JSON Lines (optionally gzip-compressed) or Parquet, one candidate per row; a column
//! mapping names the fields. Rows are checked one by one so that a malformed row is
//! reported with its file, line (row, for Parquet) and field; by default it is skipped and
//! counted, with `strict` it is an error.

mod parquet;
pub mod stats;

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// Which JSON field holds what. `prompt` may be a string or a chat `messages` list, whose
/// user turns are joined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    pub instruction_id: String,
    pub prompt: String,
    pub response: String,
    pub source: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            instruction_id: "instruction_id".into(),
            prompt: "prompt".into(),
            response: "response".into(),
            source: "source".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub response: String,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instruction {
    pub id: String,
    pub prompt: String,
    pub candidates: Vec<Candidate>,
}

/// A row that was not used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RowProblem {
    pub path: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for RowProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.message)
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    /// In order of first appearance in the file.
    pub instructions: Vec<Instruction>,
    pub skipped: Vec<RowProblem>,
}

impl Pool {
    pub fn candidate_count(&self) -> usize {
        self.instructions.iter().map(|i| i.candidates.len()).sum()
    }

    /// Distinct source models, sorted.
    pub fn sources(&self) -> Vec<String> {
        let mut sources: Vec<String> = self
            .instructions
            .iter()
            .flat_map(|i| i.candidates.iter().map(|c| c.source.clone()))
            .collect();
        sources.sort();
        sources.dedup();
        sources
    }

    /// What the scorer needs: each prompt with its candidate responses, in pool order.
    pub fn groups(&self) -> Vec<crate::score::Group> {
        self.instructions
            .iter()
            .map(|i| crate::score::Group {
                prompt: i.prompt.clone(),
                responses: i.candidates.iter().map(|c| c.response.clone()).collect(),
            })
            .collect()
    }

    /// A hash of the content as scoring and selection see it: ids, prompts, responses and
    /// sources, in order. Stage keys and shard records name pools by it.
    pub fn digest(&self) -> String {
        let mut text = String::new();
        for i in &self.instructions {
            text.push_str(&i.id);
            for c in &i.candidates {
                text.push_str(&crate::score::pair_hash(&i.prompt, &c.response));
                text.push_str(&c.source);
            }
            text.push('\n');
        }
        crate::util::sha256_bytes(text.as_bytes())
    }

    /// The first `n` instructions, for quick runs.
    pub fn truncated(mut self, n: usize) -> Self {
        self.instructions.truncate(n);
        self
    }
}

/// Where datasets live: `HARNESS_DATA_DIR`, else `../shared/data` (this project's layout).
pub fn data_dir() -> PathBuf {
    std::env::var_os("HARNESS_DATA_DIR").map_or_else(|| PathBuf::from("../shared/data"), PathBuf::from)
}

pub fn read(path: &Path, columns: &Columns, strict: bool) -> Result<Pool> {
    let name = path.to_string_lossy();
    let mut builder = PoolBuilder { path, columns, strict, pool: Pool { instructions: Vec::new(), skipped: Vec::new() }, index: HashMap::new() };
    if name.ends_with(".parquet") {
        parquet::for_each_row(path, columns, |row_no, row| builder.add(row_no, row.map_err(|e| e.to_string())))?;
    } else {
        for (n, line) in crate::util::open_text(path)?.lines().enumerate() {
            let line = line.map_err(|e| Error::format(path, format!("line {}: unreadable ({e})", n + 1)))?;
            if line.trim().is_empty() {
                continue;
            }
            let row = serde_json::from_str(&line).map_err(|e| format!("not a JSON object: {e}"));
            builder.add(n + 1, row)?;
        }
    }
    let pool = builder.pool;
    if pool.instructions.is_empty() {
        return Err(Error::format(
            path,
            format!("the pool holds no usable candidate ({} rows skipped)", pool.skipped.len()),
        ));
    }
    if !pool.skipped.is_empty() {
        tracing::warn!("{}: skipped {} malformed rows, first: {}", path.display(), pool.skipped.len(), pool.skipped[0]);
    }
    Ok(pool)
}

/// Groups rows into instructions as they arrive, skipping or refusing bad ones.
struct PoolBuilder<'a> {
    path: &'a Path,
    columns: &'a Columns,
    strict: bool,
    pool: Pool,
    index: HashMap<String, usize>,
}

impl PoolBuilder<'_> {
    fn add(&mut self, line: usize, row: std::result::Result<Value, String>) -> Result<()> {
        let parsed = row.and_then(|row| parse_row(&row, self.columns));
        let problem = match parsed {
            Ok((id, prompt, candidate)) => {
                let instructions = &mut self.pool.instructions;
                let slot = *self.index.entry(id.clone()).or_insert_with(|| {
                    instructions.push(Instruction { id, prompt: prompt.clone(), candidates: Vec::new() });
                    instructions.len() - 1
                });
                if instructions[slot].prompt == prompt {
                    instructions[slot].candidates.push(candidate);
                    return Ok(());
                }
                format!(
                    "field `{}`: instruction `{}` has a different prompt than on its first row",
                    self.columns.prompt, instructions[slot].id
                )
            }
            Err(problem) => problem,
        };
        if self.strict {
            return Err(Error::format(self.path, format!("line {line}: {problem}")));
        }
        self.pool.skipped.push(RowProblem { path: self.path.to_path_buf(), line, message: problem });
        Ok(())
    }
}

fn parse_row(row: &Value, columns: &Columns) -> std::result::Result<(String, String, Candidate), String> {
    let field = |name: &str| row.get(name).ok_or_else(|| format!("field `{name}` is missing"));
    let text = |name: &str| -> std::result::Result<String, String> {
        match field(name)? {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            Value::String(_) => Err(format!("field `{name}` is empty")),
            other => Err(format!("field `{name}`: expected a string, got {}", kind(other))),
        }
    };
    let id = match field(&columns.instruction_id)? {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(format!(
                "field `{}`: expected a string or number, got {}",
                columns.instruction_id,
                kind(other)
            ))
        }
    };
    let prompt = match field(&columns.prompt)? {
        Value::Array(messages) => user_turns(messages).map_err(|e| format!("field `{}`: {e}", columns.prompt))?,
        _ => text(&columns.prompt)?,
    };
    Ok((
        id,
        prompt,
        Candidate {
            response: text(&columns.response)?,
            source: text(&columns.source)?,
        },
    ))
}

/// The user turns of a `messages` list, joined by blank lines.
pub(crate) fn user_turns(messages: &[Value]) -> std::result::Result<String, String> {
    let mut turns = Vec::new();
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).ok_or("a message without a string `role`")?;
        let content = m.get("content").and_then(Value::as_str).ok_or("a message without a string `content`")?;
        if role != "user" {
            // Dropping a system turn would change what is scored; refuse rather than guess.
            return Err(format!("role `{role}` in a prompt is not supported (only user turns)"));
        }
        turns.push(content);
    }
    if turns.is_empty() {
        return Err("no user message".into());
    }
    Ok(turns.join("\n\n"))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    }

    const GOOD_A: &str = r#"{"instruction_id": 1, "prompt": "Hi?", "response": "Hello.", "source": "m1"}"#;
    const GOOD_B: &str = r#"{"instruction_id": 1, "prompt": "Hi?", "response": "Hey!", "source": "m2"}"#;

    #[test]
    fn groups_by_instruction_and_reports_bad_rows_with_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "pool.jsonl", &[
            GOOD_A,
            r#"{"instruction_id": 1, "prompt": "Hi?", "response": "", "source": "m3"}"#,
            "not json",
            GOOD_B,
            r#"{"instruction_id": 2, "prompt": "Bye?", "response": 7, "source": "m1"}"#,
            r#"{"instruction_id": 3, "prompt": "Ok?", "response": "Ok.", "source": "m1"}"#,
        ]);
        let pool = read(&path, &Columns::default(), false).unwrap();
        assert_eq!(pool.instructions.len(), 2);
        assert_eq!(pool.instructions[0].candidates.len(), 2);
        assert_eq!(pool.sources(), vec!["m1", "m2"]);
        let lines: Vec<usize> = pool.skipped.iter().map(|p| p.line).collect();
        assert_eq!(lines, vec![2, 3, 5]);
        assert!(pool.skipped[0].message.contains("field `response` is empty"));
        assert!(pool.skipped[2].message.contains("field `response`: expected a string, got a number"));

        let err = read(&path, &Columns::default(), true).unwrap_err().to_string();
        assert!(err.contains("pool.jsonl") && err.contains("line 2") && err.contains("`response`"), "{err}");
    }

    #[test]
    fn column_mapping_and_messages_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "mapped.jsonl", &[
            r#"{"qid": "a", "messages": [{"role": "user", "content": "Q1"}], "answer": "A", "model": "x"}"#,
            r#"{"qid": "b", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}], "answer": "B", "model": "x"}"#,
        ]);
        let columns = Columns {
            instruction_id: "qid".into(),
            prompt: "messages".into(),
            response: "answer".into(),
            source: "model".into(),
        };
        let pool = read(&path, &columns, false).unwrap();
        assert_eq!(pool.instructions[0].prompt, "Q1");
        assert_eq!(pool.skipped.len(), 1);
        assert!(pool.skipped[0].message.contains("role `system`"), "{}", pool.skipped[0]);
    }

    #[test]
    fn empty_pool_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "empty.jsonl", &["", "   "]);
        let err = read(&path, &Columns::default(), false).unwrap_err().to_string();
        assert!(err.contains("empty.jsonl") && err.contains("no usable candidate"), "{err}");
    }

    #[test]
    fn reads_the_gzipped_alpacaeval_pool() {
        let path = Path::new("../shared/data/pools/alpacaeval-12models.jsonl.gz");
        if !path.exists() {
            return eprintln!("skipped: {} is not here", path.display());
        }
        let pool = read(path, &Columns::default(), true).unwrap();
        assert_eq!(pool.instructions.len(), 805);
        assert_eq!(pool.candidate_count(), 9638);
        assert_eq!(pool.sources().len(), 12);
    }
}
