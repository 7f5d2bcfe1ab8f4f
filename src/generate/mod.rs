//! Batched decoding with the KV cache: greedy or seeded temperature/top-p sampling, stop
//! sequences, EOS and a token budget.
//!
//! Prompts are sorted by length and decoded in batches; a row that finishes leaves the
//! batch (and the cache) at once, so one long answer does not keep fifteen finished rows
//! computing. Each prompt samples from its own RNG, seeded from the seed and the prompt's
//! index, so the text of a prompt never depends on which others share its batch.

use crate::model::{chat::Message, KvCache, LoadedModel, Mode};
use crate::util::Rng;
use crate::{Error, Result};
use candle_core::Tensor;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// 0 decodes greedily.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Generation ends before the first of these; the text excludes it.
    pub stop: Vec<String>,
    /// Prompts decoded together.
    pub batch_size: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_new_tokens: 512, temperature: 0.0, top_p: 1.0, seed: 0, stop: Vec::new(), batch_size: 16 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// The model ended its turn.
    Eos,
    /// A stop sequence appeared.
    Stop,
    /// `max_new_tokens` ran out: the answer is truncated.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub finish: Finish,
}

/// Token ids of a one-turn chat prompt with the generation prompt, followed by
/// `response_prefix` (text the answer is forced to start with, e.g. a code fence).
pub fn prompt_ids(model: &LoadedModel, user: &str, response_prefix: &str) -> Result<Vec<u32>> {
    let mut text = model.template.render(&[Message::new("user", user)], true)?;
    text.push_str(response_prefix);
    Ok(model.tokenizer.encode(&text)?.get_ids().to_vec())
}

/// Ids that end a turn: EOS and the end-of-turn markers of the common chat formats.
fn end_ids(model: &LoadedModel) -> Vec<u32> {
    let mut ids: Vec<u32> = model.tokenizer.eos.iter().map(|t| t.id).collect();
    for marker in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>"] {
        ids.extend(model.tokenizer.id_of(marker));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One prompt being decoded.
struct Row {
    index: usize,
    prompt_tokens: usize,
    generated: Vec<u32>,
    text: String,
    rng: Rng,
}

/// Generates a continuation of every prompt, in input order. `on_tokens` hears how many
/// tokens each decoding step produced (for a progress bar).
pub fn generate(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    mut on_tokens: impl FnMut(usize),
) -> Result<Vec<Generation>> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!("prompt {i} has no tokens")));
    }
    let limit = model.config.max_position_embeddings;
    if let Some(i) = prompts.iter().position(|p| p.len() >= limit) {
        return Err(Error::Invalid(format!(
            "prompt {i} has {} tokens, at or beyond the model's {limit} positions",
            prompts[i].len()
        )));
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
    for batch in order.chunks(options.batch_size.max(1)) {
        for (index, generation) in generate_batch(model, prompts, batch, options, &mut on_tokens)? {
            results[index] = Some(generation);
        }
    }
    Ok(results.into_iter().map(|g| g.expect("every prompt is in one batch")).collect())
}

fn generate_batch(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    batch: &[usize],
    options: &GenerateOptions,
    on_tokens: &mut impl FnMut(usize),
) -> Result<Vec<(usize, Generation)>> {
    let decoder = model.decoder()?;
    let device = &model.device;
    let ends = end_ids(model);
    let budget = options.max_new_tokens.min(model.config.max_position_embeddings - prompts[batch[0]].len());
    let mut rows: Vec<Row> = batch
        .iter()
        .map(|&index| Row {
            index,
            prompt_tokens: prompts[index].len(),
            generated: Vec::new(),
            text: String::new(),
            rng: Rng::new(options.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        })
        .collect();
    let mut done = Vec::with_capacity(rows.len());
    let mut cache = KvCache::new(model.config.num_layers);

    // Prefill: right-padded prompts, logits at each row's last real token.
    let lengths: Vec<usize> = batch.iter().map(|&i| prompts[i].len()).collect();
    let width = lengths.iter().copied().max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * width);
    for &i in batch {
        ids.extend_from_slice(&prompts[i]);
        ids.extend(std::iter::repeat_n(0, width - prompts[i].len()));
    }
    let input = Tensor::from_vec(ids, (batch.len(), width), device)?;
    let hidden = decoder.forward(&input, &lengths, Some(&mut cache), Mode::Infer)?;
    let mut logits = decoder.last_logits(&hidden, &lengths)?;

    for step in 0..budget {
        let logits_rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(rows.len());
        let mut keep = Vec::with_capacity(rows.len());
        let mut finished = Vec::new();
        for (r, (mut row, row_logits)) in std::mem::take(&mut rows).into_iter().zip(logits_rows).enumerate() {
            let token = pick(&row_logits, options, &mut row.rng);
            let finish = if ends.contains(&token) {
                Some(Finish::Eos)
            } else {
                row.generated.push(token);
                row.text = model.tokenizer.decode(&row.generated)?;
                match earliest_stop(&row.text, &options.stop) {
                    Some(at) => {
                        row.text.truncate(at);
                        Some(Finish::Stop)
                    }
                    None if step + 1 == budget => Some(Finish::Length),
                    None => None,
                }
            };
            match finish {
                Some(finish) => finished.push((row, finish)),
                None => {
                    next.push(token);
                    keep.push(r);
                    rows.push(row);
                }
            }
        }
        on_tokens(next.len() + finished.len());
        done.extend(finished);
        if rows.is_empty() {
            break;
        }
        if keep.len() < cache.batch_size().unwrap_or(0) {
            cache.keep_rows(&keep)?;
        }
        let input = Tensor::from_vec(next, (rows.len(), 1), device)?;
        let hidden = decoder.forward(&input, &vec![1; rows.len()], Some(&mut cache), Mode::Infer)?;
        logits = decoder.last_logits(&hidden, &vec![1; rows.len()])?;
    }
    // A zero budget leaves rows that never decoded.
    done.extend(rows.into_iter().map(|row| (row, Finish::Length)));
    Ok(done
        .into_iter()
        .map(|(row, finish)| {
            let generation = Generation {
                text: row.text,
                prompt_tokens: row.prompt_tokens,
                new_tokens: row.generated.len(),
                finish,
            };
            (row.index, generation)
        })
        .collect())
}

/// Byte offset of the first stop sequence in `text`.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// The next token: argmax (first of ties) when greedy, else a draw from the temperature-
/// scaled distribution restricted to the smallest set of tokens holding `top_p` of it.
fn pick(logits: &[f32], options: &GenerateOptions, rng: &mut Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if options.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut weighted: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / options.temperature).exp()))
        .filter(|&(_, w)| w > 0.0)
        .collect();
    weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = weighted.iter().map(|w| w.1).sum();
    let mut kept = 0.0;
    let cut = weighted
        .iter()
        .position(|w| {
            kept += w.1;
            kept >= options.top_p * total
        })
        .map_or(weighted.len(), |p| p + 1);
    let mut draw = rng.uniform() * kept;
    for &(id, w) in &weighted[..cut] {
        draw -= w;
        if draw <= 0.0 {
            return id;
        }
    }
    weighted.first().map_or_else(argmax, |w| w.0)
}
