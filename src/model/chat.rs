//! Chat templates rendered the way Hugging Face's `apply_chat_template` renders them, so a
//! prompt/response pair is scored and trained on exactly the text the model was tuned on.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// Built by hand because minijinja's `serde` feature is not enabled.
    fn to_value(&self) -> Value {
        Value::from_pairs([("role", &self.role), ("content", &self.content)])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// Jinja text shipped with the model (`tokenizer.chat_template` or `tokenizer_config.json`).
    Model(String),
    Builtin(BuiltinTemplate),
}

/// Formats for models that ship no template of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplate {
    ChatMl,
    Tulu,
    /// For base models: the prompt, a blank line, then the response closed by EOS.
    Plain,
    /// `Question: {instruction}\nAnswer: {response}`: the prompt GRAPE scores under
    /// (§3.2 of the final version); the response starts after `Answer:`.
    QuestionAnswer,
}

impl BuiltinTemplate {
    pub const ALL: [BuiltinTemplate; 4] = [
        BuiltinTemplate::ChatMl,
        BuiltinTemplate::Tulu,
        BuiltinTemplate::Plain,
        BuiltinTemplate::QuestionAnswer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltinTemplate::ChatMl => "chatml",
            BuiltinTemplate::Tulu => "tulu",
            BuiltinTemplate::Plain => "plain",
            BuiltinTemplate::QuestionAnswer => "question-answer",
        }
    }

    fn source(self) -> &'static str {
        match self {
            BuiltinTemplate::ChatMl => CHATML,
            BuiltinTemplate::Tulu => TULU,
            BuiltinTemplate::Plain => PLAIN,
            BuiltinTemplate::QuestionAnswer => QUESTION_ANSWER,
        }
    }
}

impl fmt::Display for BuiltinTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BuiltinTemplate {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|t| t.name()).collect();
                Error::Invalid(format!(
                    "unknown chat template `{s}` (expected one of: {})",
                    names.join(", ")
                ))
            })
    }
}

const CHATML: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TULU: &str = "{% for message in messages %}\
{% if message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] }}{{ eos_token }}{{ '\\n' }}\
{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}";

const PLAIN: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}\
{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}\
{% endfor %}";

const QUESTION_ANSWER: &str = "{{ bos_token }}{% for message in messages %}\
{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] }}{{ eos_token }}\
{% else %}{{ 'Question: ' + message['content'] + '\\nAnswer:' }}{% endif %}\
{% endfor %}";

/// The name the model's own template is registered (and reported in errors) under.
const MODEL_TEMPLATE: &str = "model";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedPair {
    pub text: String,
    /// Byte offset in `text` where the response (and the end-of-turn marker after it) starts.
    pub response_start: usize,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    name: &'static str,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The Jinja text, exported with a fine-tuned model.
    source: String,
    /// sha256 of the template text and its special tokens: part of a model's fingerprint.
    digest: String,
}

impl ChatTemplate {
    /// Compiles the template once; rendering many pairs then only evaluates it.
    pub fn new(
        source: TemplateSource,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let (name, text) = match source {
            TemplateSource::Model(text) => (MODEL_TEMPLATE, text),
            TemplateSource::Builtin(b) => (b.name(), b.source().to_string()),
        };
        let mut env = Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks; templates rely on it.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(format!("{name}: {e}")))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        // Templates call Python string methods such as `.strip()` and `.startswith()`.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let digest = crate::util::sha256_bytes(
            format!("{name}\0{text}\0{bos_token:?}\0{eos_token:?}").as_bytes(),
        );
        env.add_template_owned(name, text.clone())
            .map_err(|e| Error::Template(format!("{name}: cannot compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            name,
            bos_token,
            eos_token,
            source: text,
            digest,
        })
    }

    pub fn builtin(
        name: BuiltinTemplate,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        Self::new(TemplateSource::Builtin(name), bos_token, eos_token)
    }

    pub fn name(&self) -> &str {
        self.name
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut context = BTreeMap::from([
            ("messages", messages.iter().map(Message::to_value).collect()),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        // Absent tokens stay undefined (rendering as ""), as with Hugging Face's special-token map.
        if let Some(bos) = &self.bos_token {
            context.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            context.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(self.name)
            .map_err(|e| Error::Template(format!("{}: {e}", self.name)))?;
        template
            .render(context)
            .map_err(|e| Error::Template(format!("{}: {e}", self.name)))
    }

    /// The text a prompt/response pair is scored and trained on, and the byte offset where the
    /// response starts. The response keeps the end-of-turn marker the template emits after it
    /// (or EOS when it emits none), so the model is also trained to stop.
    pub fn render_pair(&self, prompt: &str, response: &str) -> Result<RenderedPair> {
        let prompt_only = self.render(&[Message::new("user", prompt)], true)?;
        let full = self.render(
            &[
                Message::new("user", prompt),
                Message::new("assistant", response),
            ],
            false,
        )?;
        let Some(region) = full.strip_prefix(prompt_only.as_str()) else {
            return Err(Error::Template(format!(
                "{}: the template does not extend the prompt, so the response cannot be located: \
                 {}",
                self.name,
                divergence(&prompt_only, &full)
            )));
        };
        let region = region.trim_end();
        // Templates may trim the content, so it is looked for trimmed; content the template
        // rewrote beyond that cannot be found, and what it emitted is kept as is.
        let content = response.trim();
        let emitted_marker = region
            .find(content)
            .is_none_or(|at| at + content.len() < region.len());
        let eos = self.eos_token.as_deref();
        let ends_with_eos = eos.is_some_and(|eos| region.ends_with(eos));
        let response_start = prompt_only.len();
        let mut text = prompt_only;
        text.push_str(region);
        if !emitted_marker && !ends_with_eos {
            text.push_str(eos.unwrap_or_default());
        }
        Ok(RenderedPair {
            text,
            response_start,
        })
    }
}

/// Where the prompt rendering and the full conversation part ways, for an error message a
/// template author can act on.
fn divergence(prompt: &str, full: &str) -> String {
    let at = prompt
        .char_indices()
        .zip(full.chars())
        .find(|((_, p), f)| p != f)
        .map_or(prompt.len().min(full.len()), |((i, _), _)| i);
    // `at` is a char boundary of both: they agree on everything before it.
    let next = |s: &str| s[at..].chars().take(24).collect::<String>();
    format!(
        "at byte {at} the prompt with add_generation_prompt continues with {:?} but the \
         conversation with the response continues with {:?}",
        next(prompt),
        next(full)
    )
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// Marks which tokens of one joint tokenization belong to the response: a token counts as
/// response iff its start byte offset is at or after `response_start`, so a token straddling
/// the boundary counts as prompt and is never trained on.
pub fn response_mask(offsets: &[(usize, usize)], response_start: usize) -> Vec<bool> {
    offsets
        .iter()
        .map(|&(start, _)| start >= response_start)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `chat_template` of HuggingFaceTB/SmolLM2-135M-Instruct (also its GGUF's
    /// `tokenizer.chat_template`).
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// The shape of Gemma-3's template: BOS, system text folded into the first user turn,
    /// `model` as the assistant role, trimmed content and `<end_of_turn>` markers.
    const GEMMA3: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

    fn model(text: &str, bos: Option<&str>, eos: Option<&str>) -> ChatTemplate {
        ChatTemplate::new(
            TemplateSource::Model(text.to_string()),
            bos.map(str::to_string),
            eos.map(str::to_string),
        )
        .unwrap()
    }

    fn response(pair: &RenderedPair) -> &str {
        &pair.text[pair.response_start..]
    }

    #[test]
    fn smollm2_pair_matches_hugging_face() {
        let chat = model(SMOLLM2, Some("<|im_start|>"), Some("<|im_end|>"));
        assert_eq!(chat.name(), "model");
        let pair = chat
            .render_pair("What is the capital of France?", "Paris.")
            .unwrap();
        assert_eq!(
            pair.text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
             <|im_start|>assistant\nParis.<|im_end|>"
        );
        assert!(pair.text[..pair.response_start].ends_with("<|im_start|>assistant\n"));
        assert_eq!(response(&pair), "Paris.<|im_end|>");

        // A conversation that brings its own system prompt replaces the default one.
        let rendered = chat
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", "Hi"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            rendered,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_constant_is_the_template_in_its_gguf() {
        let Some(path) = std::env::var_os("HARNESS_TEST_SMOLLM2_GGUF") else {
            eprintln!("skipped: HARNESS_TEST_SMOLLM2_GGUF is not set");
            return;
        };
        let Ok(mut file) = std::fs::File::open(&path) else {
            eprintln!("skipped: cannot open {}", path.to_string_lossy());
            return;
        };
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let template = content.metadata["tokenizer.chat_template"]
            .to_string()
            .unwrap();
        assert_eq!(template, SMOLLM2);
    }

    #[test]
    fn gemma3_region_ends_with_end_of_turn() {
        let chat = model(GEMMA3, Some("<bos>"), Some("<eos>"));
        let pair = chat.render_pair("  Why?  ", "Because.\n").unwrap();
        assert_eq!(
            pair.text,
            "<bos><start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\nBecause.<end_of_turn>"
        );
        assert_eq!(response(&pair), "Because.<end_of_turn>");

        let err = chat
            .render(
                &[Message::new("user", "a"), Message::new("user", "b")],
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("chat template: model: ")
                && err.contains("Conversation roles must alternate"),
            "{err}"
        );
    }

    #[test]
    fn builtins_render_their_formats() {
        let chatml = ChatTemplate::builtin(BuiltinTemplate::ChatMl, None, None).unwrap();
        assert_eq!(chatml.name(), "chatml");
        let pair = chatml.render_pair("Q", "A").unwrap();
        assert_eq!(
            pair.text,
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>"
        );
        assert_eq!(response(&pair), "A<|im_end|>");

        let tulu = ChatTemplate::builtin(BuiltinTemplate::Tulu, None, Some("</s>".into())).unwrap();
        let pair = tulu.render_pair("Q", "A").unwrap();
        assert_eq!(pair.text, "<|user|>\nQ\n<|assistant|>\nA</s>");
        assert_eq!(response(&pair), "A</s>");

        let plain = ChatTemplate::builtin(
            BuiltinTemplate::Plain,
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        let pair = plain
            .render_pair("Once upon a time", "there was a cat.")
            .unwrap();
        assert_eq!(pair.text, "<s>Once upon a time\n\nthere was a cat.</s>");
        assert_eq!(response(&pair), "there was a cat.</s>");

        // The paper's scoring prompt: the response (with EOS) starts right after `Answer:`.
        let qa = ChatTemplate::builtin(BuiltinTemplate::QuestionAnswer, Some("<s>".into()), Some("</s>".into())).unwrap();
        let pair = qa.render_pair("What is 2+2?", "4").unwrap();
        assert_eq!(pair.text, "<s>Question: What is 2+2?\nAnswer: 4</s>");
        assert_eq!(response(&pair), " 4</s>");
        assert_eq!(qa.render(&[Message::new("user", "Q")], true).unwrap(), "<s>Question: Q\nAnswer:");

        // Without special tokens nothing is invented for them.
        let bare = ChatTemplate::builtin(BuiltinTemplate::Plain, None, None).unwrap();
        assert_eq!(bare.render_pair("Q", "A").unwrap().text, "Q\n\nA");
    }

    #[test]
    fn eos_is_appended_when_the_template_ends_turns_with_nothing() {
        // Also exercises Python string methods through pycompat.
        let template = "{% for m in messages %}{{ m.role }}: {{ m.content.strip() }}\n{% endfor %}\
                        {% if add_generation_prompt %}assistant: {% endif %}";
        let chat = model(template, None, Some("</s>"));
        let pair = chat.render_pair("Q", " A ").unwrap();
        assert_eq!(pair.text, "user: Q\nassistant: A</s>");
        assert_eq!(response(&pair), "A</s>");

        // A response that already ends with EOS does not get a second one.
        let pair = chat.render_pair("Q", "A</s>").unwrap();
        assert_eq!(response(&pair), "A</s>");
    }

    #[test]
    fn template_errors_carry_the_message() {
        let err = ChatTemplate::new(TemplateSource::Model("{% if %}".into()), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("chat template: model: cannot compile: syntax error"),
            "{err}"
        );

        let chat = model("{{ raise_exception('no system role here') }}", None, None);
        let err = chat.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("no system role here"), "{err}");

        // A generation prompt the assistant turn does not continue cannot be split.
        let chat = model(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
             {% if add_generation_prompt %}<bot>{% endif %}",
            None,
            None,
        );
        let err = chat.render_pair("Q", "A").unwrap_err().to_string();
        assert!(err.contains("does not extend the prompt"), "{err}");
        assert!(
            err.contains(
                r#"at byte 8 the prompt with add_generation_prompt continues with "bot>""#
            ) && err.contains(r#"the response continues with "assistant>A""#),
            "{err}"
        );
    }

    #[test]
    fn builtin_names_parse() {
        for builtin in BuiltinTemplate::ALL {
            assert_eq!(builtin.name().parse::<BuiltinTemplate>().unwrap(), builtin);
        }
        let err = "vicuna".parse::<BuiltinTemplate>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown chat template `vicuna` (expected one of: chatml, tulu, plain, question-answer)"
        );
    }

    #[test]
    fn mask_covers_exactly_the_response_tokens_of_a_real_tokenizer() {
        let path = std::path::Path::new("/work/shared/models/stories260K.gguf");
        let mut file = std::fs::File::open(path).unwrap();
        let metadata = candle_core::quantized::gguf_file::Content::read(&mut file)
            .unwrap()
            .metadata;
        let tok = crate::model::tokenizer::Tokenizer::from_gguf(path, &metadata).unwrap();
        let chat = ChatTemplate::builtin(
            BuiltinTemplate::Plain,
            tok.bos.as_ref().map(|t| t.text.clone()),
            tok.eos.as_ref().map(|t| t.text.clone()),
        )
        .unwrap();
        let pair = chat
            .render_pair("Once upon a time", "there was a cat.")
            .unwrap();
        let encoding = tok.encode(&pair.text).unwrap();
        let mask = response_mask(encoding.get_offsets(), pair.response_start);
        let ids = encoding.get_ids();
        let response: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter_map(|(&id, &m)| m.then_some(id))
            .collect();
        assert!(mask.iter().skip_while(|m| !**m).all(|m| *m), "{mask:?}");
        assert_eq!(ids[0], 1);
        assert_eq!(*response.last().unwrap(), 2);
        assert_eq!(tok.decode(&response).unwrap(), "there was a cat.</s>");
    }

    #[test]
    fn mask_starts_at_the_first_token_inside_the_response() {
        // "ab|cd" tokenised as [a][bc][d] with the response starting at byte 2: the straddling
        // token [bc] stays prompt.
        let offsets = [(0, 1), (1, 3), (3, 4)];
        assert_eq!(response_mask(&offsets, 2), vec![false, false, true]);
        assert_eq!(response_mask(&offsets, 1), vec![false, true, true]);
        assert_eq!(response_mask(&offsets, 0), vec![true, true, true]);
        assert_eq!(response_mask(&offsets, 4), vec![false, false, false]);
        assert!(response_mask(&[], 0).is_empty());
    }
}
