//! Benchmarks as files: `eval/<name>.yaml` names its data (file, sha256, upstream address),
//! how an item becomes a prompt, how a completion is graded and which fields group the
//! results. Templates are Jinja (minijinja) over the data row's fields, so adding a
//! benchmark is adding a file.

use super::math_grade;
use crate::{Error, Result};
use minijinja::{Environment, UndefinedBehavior, Value as JinjaValue};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// Relative to the data directory (`HARNESS_DATA_DIR/eval`); a gzipped copy is found too.
    pub file: String,
    /// Of the uncompressed content.
    pub sha256: String,
    /// Where a machine with network access fetches it.
    pub upstream: String,
}

/// Decoding settings the benchmark's protocol fixes; the CLI may override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Decoding {
    pub max_new_tokens: usize,
    #[serde(default)]
    pub temperature: f64,
    #[serde(default = "one")]
    pub top_p: f64,
    #[serde(default)]
    pub stop: Vec<String>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Grader {
    /// Run `program` (a template that sees the row and `code`, the extracted code) in the
    /// sandbox; the item passes when it exits cleanly.
    Code { program: String },
    /// Compare the extracted final answer with `answer` (a template over the row). Rows
    /// whose reference is `unanswerable` pass when the model says the question lacks
    /// information (GSM-Plus "critical thinking").
    Math {
        answer: String,
        #[serde(default)]
        unanswerable: Option<String>,
        /// The completion is a program of thought: see [`program_of_thought`].
        #[serde(default)]
        program_of_thought: bool,
    },
    /// TheoremQA: `answer` (a template giving the answer as JSON, `{{ Answer | tojson }}`)
    /// compared by `answer_type` (integer, float, bool, option, list of integer, list of float).
    Theoremqa {
        answer: String,
        answer_type: String,
        #[serde(default)]
        program_of_thought: bool,
    },
}

impl Grader {
    /// Whether the answer is what the completion's program prints rather than its text.
    pub fn program_of_thought(&self) -> bool {
        matches!(self, Grader::Math { program_of_thought: true, .. } | Grader::Theoremqa { program_of_thought: true, .. })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub data: DataSource,
    /// The item id (a template); completions files refer to items by it.
    pub id: String,
    /// The user turn (a template), rendered through the model's chat template.
    pub prompt: String,
    /// Text the assistant turn is forced to start with (e.g. a code fence); also put back
    /// in front of the completion before code is extracted.
    #[serde(default)]
    pub response_prefix: String,
    pub generation: Decoding,
    /// Written as a one-key map (`grader: {code: {...}}`), not a YAML tag.
    #[serde(with = "serde_yaml::with::singleton_map")]
    pub grader: Grader,
    /// Result breakdowns: name -> template (e.g. `subject: "{{ type }}"`).
    #[serde(default)]
    pub groups: BTreeMap<String, String>,
}

/// One benchmark item, with everything its grading needs.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub prompt: String,
    pub groups: BTreeMap<String, String>,
    pub reference: Reference,
}

#[derive(Debug, Clone)]
pub enum Reference {
    /// The program, with `{code}` still to be filled: rendered per completion.
    Code { row: Value },
    Answer(String),
    Unanswerable,
    /// A TheoremQA answer as JSON, and its type.
    Typed { answer: Value, answer_type: String },
}

#[derive(Debug, Clone)]
pub struct Benchmark {
    pub spec: Spec,
    pub spec_path: PathBuf,
    pub items: Vec<Item>,
    env: Environment<'static>,
}

/// Where benchmark files live: `HARNESS_EVAL_DIR`, else this repository's `eval/`.
pub fn eval_dir() -> PathBuf {
    std::env::var_os("HARNESS_EVAL_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("eval"), PathBuf::from)
}

/// Names of the benchmark files in `dir`, sorted.
pub fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".yaml").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// A benchmark by registered name (`eval_dir/<name>.yaml`) or by path to a YAML file.
pub fn spec_path(name_or_path: &str, eval_dir: &Path) -> Result<PathBuf> {
    let path = if name_or_path.ends_with(".yaml") {
        PathBuf::from(name_or_path)
    } else {
        eval_dir.join(format!("{name_or_path}.yaml"))
    };
    if path.exists() {
        return Ok(path);
    }
    Err(Error::Invalid(format!(
        "unknown benchmark `{name_or_path}` (known in {}: {})",
        eval_dir.display(),
        available(eval_dir).join(", ")
    )))
}

impl Benchmark {
    /// Reads the spec, checks the data's sha256 and renders every item.
    pub fn load(spec_path: &Path, data_dir: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(spec_path).map_err(|e| Error::io(spec_path, e))?;
        let spec: Spec = serde_yaml::from_str(&text).map_err(|e| Error::format(spec_path, e.to_string()))?;
        let env = environment();
        // Template syntax errors surface now, naming the field, not at the first row.
        let mut templates = vec![("id", &spec.id), ("prompt", &spec.prompt)];
        match &spec.grader {
            Grader::Code { program } => templates.push(("grader.code.program", program)),
            Grader::Math { answer, .. } => templates.push(("grader.math.answer", answer)),
            Grader::Theoremqa { answer, answer_type, .. } => {
                templates.push(("grader.theoremqa.answer", answer));
                templates.push(("grader.theoremqa.answer_type", answer_type));
            }
        }
        templates.extend(spec.groups.iter().map(|(k, v)| (k.as_str(), v)));
        for (field, template) in &templates {
            env.template_from_str(template)
                .map_err(|e| Error::format(spec_path, format!("field `{field}`: {e}")))?;
        }

        let data_path = locate(data_dir, &spec.data.file).ok_or_else(|| {
            Error::format(
                spec_path,
                format!(
                    "data file {} is not here (nor gzipped); fetch it from {}",
                    data_dir.join(&spec.data.file).display(),
                    spec.data.upstream
                ),
            )
        })?;
        let rows = read_rows(&data_path, &spec.data.sha256)?;
        let mut benchmark = Benchmark { spec, spec_path: spec_path.to_path_buf(), items: Vec::new(), env };
        let mut seen = std::collections::HashSet::new();
        for (index, (line, row)) in rows.into_iter().enumerate() {
            let item = benchmark
                .item(index, &row)
                .map_err(|what| Error::format(&data_path, format!("{line}: {what} (templates in {})", spec_path.display())))?;
            if !seen.insert(item.id.clone()) {
                return Err(Error::format(&data_path, format!("{line}: duplicate item id `{}`", item.id)));
            }
            benchmark.items.push(item);
        }
        Ok(benchmark)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn render(&self, field: &str, template: &str, row: &Value, extra: &[(&str, &str)]) -> std::result::Result<String, String> {
        let mut context: BTreeMap<String, JinjaValue> = match row {
            Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), JinjaValue::from(minijinja::value::Serde(v)))).collect(),
            other => return Err(format!("expected a JSON object, found {other}")),
        };
        for (k, v) in extra {
            context.insert((*k).to_string(), JinjaValue::from(*v));
        }
        self.env.render_str(template, context).map_err(|e| format!("field `{field}`: {e:#}"))
    }

    fn item(&self, index: usize, row: &Value) -> std::result::Result<Item, String> {
        let index_text = index.to_string();
        let extra = [("index", index_text.as_str())];
        let spec = &self.spec;
        let groups = spec
            .groups
            .iter()
            .map(|(name, template)| Ok((name.clone(), self.render(name, template, row, &extra)?)))
            .collect::<std::result::Result<_, String>>()?;
        let reference = match &spec.grader {
            Grader::Code { program } => {
                // Rendered once with placeholder code so a bad row fails at load time.
                self.render("grader.code.program", program, row, &[("code", "")])?;
                Reference::Code { row: row.clone() }
            }
            Grader::Theoremqa { answer, answer_type, .. } => {
                let json = self.render("grader.theoremqa.answer", answer, row, &extra)?;
                let answer = serde_json::from_str(&json)
                    .map_err(|e| format!("field `grader.theoremqa.answer`: `{json}` is not JSON ({e})"))?;
                let answer_type = self.render("grader.theoremqa.answer_type", answer_type, row, &extra)?;
                if !super::theorem_grade::ANSWER_TYPES.contains(&answer_type.as_str()) {
                    return Err(format!(
                        "field `grader.theoremqa.answer_type`: `{answer_type}` is not one of {}",
                        super::theorem_grade::ANSWER_TYPES.join(", ")
                    ));
                }
                Reference::Typed { answer, answer_type }
            }
            Grader::Math { answer, unanswerable, .. } => {
                let answer = self.render("grader.math.answer", answer, row, &extra)?;
                if unanswerable.as_deref() == Some(answer.trim()) {
                    Reference::Unanswerable
                } else if answer.trim().is_empty() {
                    return Err("field `grader.math.answer`: renders empty".into());
                } else {
                    Reference::Answer(answer)
                }
            }
        };
        Ok(Item {
            id: self.render("id", &spec.id, row, &extra)?,
            prompt: self.render("prompt", &spec.prompt, row, &extra)?,
            groups,
            reference,
        })
    }

    /// The program that tests `code` for a code item.
    pub fn program(&self, item: &Item, code: &str) -> Result<String> {
        let (Grader::Code { program }, Reference::Code { row }) = (&self.spec.grader, &item.reference) else {
            return Err(Error::Invalid(format!("{}: item {} is not a code item", self.name(), item.id)));
        };
        self.render("grader.code.program", program, row, &[("code", code)])
            .map_err(|what| Error::format(&self.spec_path, format!("item {}: {what}", item.id)))
    }
}

/// `file` in `dir`, or its gzipped or gunzipped twin: the checksum is of the content.
fn locate(dir: &Path, file: &str) -> Option<PathBuf> {
    let twin = match file.strip_suffix(".gz") {
        Some(plain) => plain.to_string(),
        None => format!("{file}.gz"),
    };
    let found = [file, twin.as_str()].into_iter().map(|f| dir.join(f)).find(|p| p.exists());
    found
}

/// JSON Lines, or one JSON array; each row with the line (or array index) that names it.
/// `sha256` is of the uncompressed text, so it matches the upstream file however the
/// local copy was compressed.
fn read_rows(path: &Path, sha256: &str) -> Result<Vec<(String, Value)>> {
    let mut text = String::new();
    crate::util::open_text(path)?
        .read_to_string(&mut text)
        .map_err(|e| Error::format(path, format!("unreadable: {e}")))?;
    let actual = crate::util::sha256_bytes(text.as_bytes());
    if actual != sha256.to_ascii_lowercase() {
        return Err(Error::Checksum { path: path.to_path_buf(), expected: format!("{sha256} (of the uncompressed text)"), actual });
    }
    if text.trim_start().starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a JSON array: {e}")))?;
        return Ok(rows.into_iter().enumerate().map(|(i, r)| (format!("element {i}"), r)).collect());
    }
    let mut rows = Vec::new();
    for (n, line) in text.as_bytes().lines().enumerate() {
        let line = line.map_err(|e| Error::format(path, format!("line {}: {e}", n + 1)))?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str(&line).map_err(|e| Error::format(path, format!("line {}: not JSON: {e}", n + 1)))?;
        rows.push((format!("line {}", n + 1), row));
    }
    Ok(rows)
}

/// Strict undefined variables (a misspelt field is an error, not an empty string), no
/// escaping, and the filters benchmark protocols need. Debug info on in every build: it is
/// what names the misspelt variable in the error, and release builds leave it off.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_debug(true);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    let syntax = minijinja::syntax::SyntaxConfig::builder().keep_trailing_newline(true).build();
    env.set_syntax(syntax.expect("the default delimiters are valid"));
    env.add_filter("last_boxed", |s: String| math_grade::last_boxed(&s).unwrap_or_default());
    env.add_filter("after_hashes", |s: String| s.rsplit("####").next().unwrap_or_default().trim().to_string());
    env.add_filter("before", |s: String, sep: String| s.split(sep.as_str()).next().unwrap_or_default().to_string());
    env.add_filter("python_signature", python_signature);
    env
}

/// The signature of the first `def` (of `name`, when given) in Python source:
/// `def f(a, b) -> int:` gives `f(a, b) -> int`, as the Eurus prompts quote it.
fn python_signature(code: String, name: Option<String>) -> String {
    code.lines()
        .filter_map(|line| line.trim_start().strip_prefix("def "))
        .find(|sig| name.as_deref().is_none_or(|n| sig.starts_with(n) && sig[n.len()..].trim_start().starts_with('(')))
        .map(|sig| sig.trim_end().trim_end_matches(':').trim_end().to_string())
        .unwrap_or_default()
}

/// The code in a completion: the first ```python block the model opened itself, else the
/// response prefix plus completion with its opening fence line dropped, up to the next fence.
pub fn extract_code(response_prefix: &str, completion: &str) -> String {
    for opener in ["```python", "```py", "```Python"] {
        if let Some(at) = completion.find(opener) {
            let after = &completion[at + opener.len()..];
            let body = after.split_once('\n').map_or("", |(_, b)| b);
            return body.split("```").next().unwrap_or_default().to_string();
        }
    }
    let text = format!("{response_prefix}{completion}");
    let body = match text.strip_prefix("```") {
        Some(rest) => rest.split_once('\n').map_or("", |(_, b)| b),
        None => &text,
    };
    body.split("```").next().unwrap_or_default().to_string()
}

/// A program of thought, as Eurus runs one (eval/utils/python_interpreter.py): the last
/// `` ```python `` block of the completion (Eurus runs each block alone and keeps the last one's
/// output), its last line wrapped in `print(...)` unless it prints already. `None` when the
/// completion has no closed block: its text is then graded as a chain of thought.
pub fn program_of_thought(completion: &str) -> Option<String> {
    let block = completion.split("```python").skip(1).filter_map(|rest| rest.split_once("```").map(|(code, _)| code)).last()?;
    let mut lines: Vec<&str> = block.trim_end().lines().collect();
    let last = lines.pop()?;
    let last = if last.contains("print(") { last.to_string() } else { format!("print({last})") };
    Some(lines.into_iter().map(|l| format!("{l}\n")).collect::<String>() + &last + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_of_thought_print_their_last_line() {
        let completion = "Let me compute.\n```python\nx = 1\n```\nThen:\n```python\na = 6\nb = 7\na * b\n```\nSo 42.";
        assert_eq!(program_of_thought(completion).unwrap(), "\na = 6\nb = 7\nprint(a * b)\n");
        let printing = "```python\nprint(sum(range(4)))\n```";
        assert_eq!(program_of_thought(printing).unwrap(), "\nprint(sum(range(4)))\n");
        assert_eq!(program_of_thought("The answer is 4."), None);
        assert_eq!(program_of_thought("```python\nx = (1 +"), None, "an unclosed block is not run");
    }

    #[test]
    fn signatures_as_the_eurus_prompts_quote_them() {
        let code = "from typing import List\n\n\ndef has_close(numbers: List[float], t: float) -> bool:\n    \"\"\"doc\"\"\"\n";
        assert_eq!(python_signature(code.into(), Some("has_close".into())), "has_close(numbers: List[float], t: float) -> bool");
        let code = "def helper(x):\n    return x\ndef main(a, b):\n  return a\n";
        assert_eq!(python_signature(code.into(), None), "helper(x)");
        assert_eq!(python_signature(code.into(), Some("main".into())), "main(a, b)");
        assert_eq!(python_signature(code.into(), Some("mai".into())), "");
    }

    #[test]
    fn code_comes_from_the_models_own_fence_or_the_forced_prefix() {
        assert_eq!(extract_code("```python\n", "def f():\n    return 1\n"), "def f():\n    return 1\n");
        assert_eq!(extract_code("```python\n", "def f():\n    return 1\n```\nThis works."), "def f():\n    return 1\n");
        assert_eq!(extract_code("", "Here:\n```python\nx = 1\n```\nDone"), "x = 1\n");
        assert_eq!(extract_code("```python\n", "Sure!\n```python\nx = 2\n```"), "x = 2\n");
        assert_eq!(extract_code("", "    return a + b\n"), "    return a + b\n");
    }
}
