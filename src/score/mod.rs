//! log π(response | prompt) for every candidate under the target model: GRAPE's one number
//! per candidate, computed exactly as training will see the pair (same chat template, same
//! end-of-turn token) and as fast as the machine allows.
//!
//! Speed comes from three things. Each prompt runs once and its KV cache is shared by all
//! of its candidates. Batches are filled to a token budget from length-sorted candidates,
//! with the prompt caches of several instructions stacked into one batch. The output
//! projection and log-softmax run only at response positions.

pub mod shard;
mod store;

pub use store::{pair_hash, ScoreStore};

use crate::model::{EncodedPair, KvCache, LoadedModel, Mode};
use crate::{Error, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashMap;

/// Instructions whose candidates are sorted together (see `score`).
const GROUPS_PER_CHUNK: usize = 256;

/// One instruction's prompt and its candidate responses.
#[derive(Debug, Clone)]
pub struct Group {
    pub prompt: String,
    pub responses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// Sum of log-probabilities of the response tokens (end-of-turn token included).
    pub sum_logprob: f64,
    pub n_tokens: usize,
    /// UTF-8 bytes of the response text, for per-byte normalisation.
    pub n_bytes: usize,
    /// The pair was longer than `max_len` and only its first `max_len` tokens were scored.
    pub truncated: bool,
    pub token_logprobs: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Score the first `max_len` tokens and flag the candidate.
    Truncate,
    /// Leave the candidate unscored.
    Skip,
}

#[derive(Debug, Clone)]
pub struct ScoreOptions {
    /// Longest prompt + response, in tokens.
    pub max_len: usize,
    /// Rows x padded length of one batch's continuations.
    pub batch_tokens: usize,
    pub share_prefix: bool,
    pub keep_token_logprobs: bool,
    pub overflow: Overflow,
    pub progress: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        Self {
            max_len: 2048,
            batch_tokens: 4096,
            share_prefix: true,
            keep_token_logprobs: false,
            overflow: Overflow::Truncate,
            progress: false,
        }
    }
}

impl ScoreOptions {
    /// These options for `model`: `max_len` never beyond the model's positions, so the
    /// default (2048) serves a model with fewer.
    pub fn fitted(&self, model: &LoadedModel) -> ScoreOptions {
        ScoreOptions { max_len: self.max_len.min(model.config.max_position_embeddings), ..self.clone() }
    }
}

/// A candidate after rendering and tokenization.
struct Encoded {
    group: usize,
    index: usize,
    pair: EncodedPair,
    n_bytes: usize,
    truncated: bool,
}

/// Scores every response of every group: `result[g][i]` is `None` only when the pair was
/// too long and `Overflow::Skip` is set.
pub fn score(model: &LoadedModel, groups: &[Group], options: &ScoreOptions) -> Result<Vec<Vec<Option<Score>>>> {
    score_with(model, groups, &options.fitted(model), |_| Ok(()))
}

/// [`score`], serving what `store` already holds and saving every new batch to it as soon
/// as it is computed. Returns the scores and how many were computed afresh.
pub fn score_stored(
    model: &LoadedModel,
    groups: &[Group],
    options: &ScoreOptions,
    store: &mut ScoreStore,
) -> Result<(Vec<Vec<Option<Score>>>, usize)> {
    let options = &options.fitted(model);
    let (mut results, lacking) = lookup(store, groups, options);
    // What is still to score, grouped again: (group, candidate) of each missing response.
    let mut missing: Vec<(Group, Vec<(usize, usize)>)> = Vec::new();
    for (g, i) in lacking {
        if missing.last().is_none_or(|(_, origin)| origin[0].0 != g) {
            missing.push((Group { prompt: groups[g].prompt.clone(), responses: Vec::new() }, Vec::new()));
        }
        let (todo, origin) = missing.last_mut().expect("pushed above");
        todo.responses.push(groups[g].responses[i].clone());
        origin.push((g, i));
    }
    let keys = pair_keys(groups);
    let (todo_groups, origins): (Vec<Group>, Vec<Vec<(usize, usize)>>) = missing.into_iter().unzip();
    let fresh = score_with(model, &todo_groups, options, |batch| {
        let rows = batch.iter().map(|&(g, i, s)| {
            let (og, oi) = origins[g][i];
            (keys[og][oi].clone(), s.clone())
        });
        store.append(options.max_len, rows.collect())
    })?;
    let mut computed = 0;
    for (scores, origin) in fresh.into_iter().zip(&origins) {
        for (score, &(g, i)) in scores.into_iter().zip(origin) {
            computed += usize::from(score.is_some());
            results[g][i] = score;
        }
    }
    Ok((results, computed))
}

/// Prompt tokens of the pool, each prompt once: the scorer runs a prompt once for all of its
/// candidates, so this plus the response tokens is the whole forward work of one pass.
pub fn prompt_tokens(model: &LoadedModel, pool: &crate::pool::Pool) -> Result<usize> {
    let mut total = 0;
    for ins in &pool.instructions {
        let Some(first) = ins.candidates.first() else { continue };
        total += model.encode_pair(&ins.prompt, &first.response)?.first_response;
    }
    Ok(total)
}

/// `scores[g][i]`: candidate `i` of group `g`, `None` where unscored.
pub type Scores = Vec<Vec<Option<Score>>>;

fn pair_keys(groups: &[Group]) -> Vec<Vec<String>> {
    groups.iter().map(|g| g.responses.iter().map(|r| pair_hash(&g.prompt, r)).collect()).collect()
}

/// What `store` holds of `groups` under `options` (already [`ScoreOptions::fitted`]): the
/// scores, `None` where missing, and the (group, candidate) pairs it lacks, in order. A
/// finished scoring stage lacks none that can be scored, so selection needs no weights.
pub fn lookup(store: &ScoreStore, groups: &[Group], options: &ScoreOptions) -> (Scores, Vec<(usize, usize)>) {
    let keys = pair_keys(groups);
    let mut results: Vec<Vec<Option<Score>>> = groups.iter().map(|g| vec![None; g.responses.len()]).collect();
    let mut lacking = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for i in 0..group.responses.len() {
            let stored = store
                .get(options.max_len, &keys[g][i])
                .filter(|s| !options.keep_token_logprobs || s.token_logprobs.is_some());
            match stored {
                // A pair stored truncated is one that `Overflow::Skip` leaves unscored.
                Some(s) => results[g][i] = (!s.truncated || options.overflow == Overflow::Truncate).then(|| s.clone()),
                None => lacking.push((g, i)),
            }
        }
    }
    (results, lacking)
}

/// `options` already [`ScoreOptions::fitted`] to `model`.
fn score_with(
    model: &LoadedModel,
    groups: &[Group],
    options: &ScoreOptions,
    mut on_batch: impl FnMut(&[(usize, usize, &Score)]) -> Result<()>,
) -> Result<Vec<Vec<Option<Score>>>> {
    let decoder = model.decoder()?;
    let device = model.device.clone();
    let mut results: Vec<Vec<Option<Score>>> = groups.iter().map(|g| vec![None; g.responses.len()]).collect();
    let encoded = encode_all(model, groups, options)?;

    // Tokens every candidate of a group shares, minus one: the last shared token's
    // successor must be in the continuation, where its predicting hidden state is.
    let mut by_group: HashMap<usize, Vec<&Encoded>> = HashMap::new();
    for e in &encoded {
        by_group.entry(e.group).or_default().push(e);
    }
    let shared: HashMap<usize, usize> = by_group
        .iter()
        .map(|(&g, members)| {
            let first_response = members.iter().map(|e| e.pair.first_response).min().unwrap_or(0);
            let prefix = if options.share_prefix { common_prefix(members) } else { 0 };
            (g, prefix.min(first_response.saturating_sub(1)))
        })
        .collect();

    // Longest continuations first across instructions, so rows of a batch have similar
    // lengths (the candidates of one prompt differ widely) and memory peaks at once. Prompt
    // caches live until their last candidate is scored; sorting within chunks of
    // instructions bounds how many are alive.
    let continuation = |e: &Encoded| e.pair.ids.len() - shared[&e.group];
    let mut order: Vec<&Encoded> = encoded.iter().collect();
    order.sort_by_key(|e| (e.group / GROUPS_PER_CHUNK, std::cmp::Reverse(continuation(e)), e.group, e.index));

    let total_tokens: u64 = order.iter().map(|e| e.pair.ids.len() as u64).sum();
    let bar = progress_bar(options.progress, total_tokens);
    let mut prompt_caches: HashMap<usize, (KvCache, usize)> = HashMap::new();
    let mut start = 0;
    while start < order.len() {
        let end = batch_end(&order, start, &shared, options.batch_tokens);
        let batch = &order[start..end];
        start = end;

        for e in batch {
            if !prompt_caches.contains_key(&e.group) {
                let prefix = &e.pair.ids[..shared[&e.group]];
                let mut cache = KvCache::new(model.config.num_layers);
                if !prefix.is_empty() {
                    let x = Tensor::new(prefix, &device)?.unsqueeze(0)?;
                    decoder.forward(&x, &[prefix.len()], Some(&mut cache), Mode::Infer)?;
                }
                let remaining = by_group[&e.group].len();
                prompt_caches.insert(e.group, (cache, remaining));
            }
        }
        let parts: Vec<(&KvCache, usize)> = batch.iter().map(|e| (&prompt_caches[&e.group].0, 1)).collect();
        let mut cache = KvCache::stack(&parts)?;

        let continuations: Vec<&[u32]> = batch.iter().map(|e| &e.pair.ids[shared[&e.group]..]).collect();
        let width = continuations.iter().map(|c| c.len()).max().unwrap_or(0);
        let lengths: Vec<usize> = continuations.iter().map(|c| c.len()).collect();
        let mut flat = Vec::with_capacity(batch.len() * width);
        for c in &continuations {
            flat.extend_from_slice(c);
            flat.resize(flat.len() + width - c.len(), 0);
        }
        let x = Tensor::from_vec(flat, (batch.len(), width), &device)?;
        let hidden = decoder.forward(&x, &lengths, Some(&mut cache), Mode::Infer)?;

        let (mut rows, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
        for (b, e) in batch.iter().enumerate() {
            let offset = shared[&e.group];
            for j in 1..continuations[b].len() {
                if e.pair.response_mask[offset + j] {
                    rows.push((b * width + j - 1) as u32);
                    targets.push(continuations[b][j]);
                    owners.push(b);
                }
            }
        }
        let logprobs: Vec<f32> = decoder.target_logprobs(&hidden, &rows, &targets)?.to_vec1()?;
        let mut per_row: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        for (owner, lp) in owners.into_iter().zip(logprobs) {
            per_row[owner].push(lp);
        }
        for (e, lps) in batch.iter().zip(per_row) {
            results[e.group][e.index] = Some(Score {
                sum_logprob: lps.iter().map(|&x| x as f64).sum(),
                n_tokens: lps.len(),
                n_bytes: e.n_bytes,
                truncated: e.truncated,
                token_logprobs: options.keep_token_logprobs.then_some(lps),
            });
            let entry = prompt_caches.get_mut(&e.group).expect("built above");
            entry.1 -= 1;
            if entry.1 == 0 {
                prompt_caches.remove(&e.group);
            }
        }
        let done: Vec<(usize, usize, &Score)> = batch
            .iter()
            .filter_map(|e| results[e.group][e.index].as_ref().map(|s| (e.group, e.index, s)))
            .collect();
        on_batch(&done)?;
        bar.inc(batch.iter().map(|e| e.pair.ids.len() as u64).sum());
    }
    bar.finish_and_clear();
    Ok(results)
}

/// The obvious computation, for checking `score`: each candidate alone, the whole
/// sequence, no cache, no batching.
pub fn score_naive(model: &LoadedModel, group: &Group, options: &ScoreOptions) -> Result<Vec<Option<Score>>> {
    let options = &options.fitted(model);
    let decoder = model.decoder()?;
    let device = model.device.clone();
    let encoded = encode_all(model, std::slice::from_ref(group), options)?;
    let mut results = vec![None; group.responses.len()];
    for e in encoded {
        let x = Tensor::new(e.pair.ids.as_slice(), &device)?.unsqueeze(0)?;
        let hidden = decoder.forward(&x, &[e.pair.ids.len()], None, Mode::Infer)?;
        let (rows, targets): (Vec<u32>, Vec<u32>) =
            e.pair.targets().map(|(row, target)| (row as u32, target)).unzip();
        let lps: Vec<f32> = decoder.target_logprobs(&hidden, &rows, &targets)?.to_vec1()?;
        results[e.index] = Some(Score {
            sum_logprob: lps.iter().map(|&x| x as f64).sum(),
            n_tokens: lps.len(),
            n_bytes: e.n_bytes,
            truncated: e.truncated,
            token_logprobs: options.keep_token_logprobs.then_some(lps),
        });
    }
    Ok(results)
}

/// Renders and tokenizes every pair once (see [`LoadedModel::encode_pair`]).
fn encode_all(model: &LoadedModel, groups: &[Group], options: &ScoreOptions) -> Result<Vec<Encoded>> {
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for (i, response) in group.responses.iter().enumerate() {
            let pair = model
                .encode_pair(&group.prompt, response)
                .map_err(|e| Error::Invalid(format!("instruction {g}, candidate {i}: {e}")))?;
            let truncated = pair.ids.len() > options.max_len;
            if truncated && options.overflow == Overflow::Skip {
                continue;
            }
            // A pair with nothing of its response left within `max_len` cannot be scored at all.
            let Some(pair) = pair.truncated(options.max_len) else { continue };
            out.push(Encoded { group: g, index: i, pair, n_bytes: response.len(), truncated });
        }
    }
    Ok(out)
}

fn common_prefix(members: &[&Encoded]) -> usize {
    let Some(first) = members.first() else { return 0 };
    members.iter().skip(1).fold(first.pair.ids.len(), |len, e| {
        first.pair.ids[..len].iter().zip(&e.pair.ids).take_while(|(a, b)| a == b).count()
    })
}

/// The end of the batch that starts at `start`: rows are added while rows x the longest
/// continuation stays within the budget (always at least one row).
fn batch_end(order: &[&Encoded], start: usize, shared: &HashMap<usize, usize>, budget: usize) -> usize {
    let mut width = 0;
    let mut end = start;
    while end < order.len() {
        let e = order[end];
        let len = e.pair.ids.len() - shared[&e.group];
        let new_width = width.max(len);
        if end > start && (end - start + 1) * new_width > budget {
            break;
        }
        width = new_width;
        end += 1;
    }
    end
}

fn progress_bar(visible: bool, total_tokens: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total_tokens);
    bar.set_style(
        ProgressStyle::with_template("scoring {bar:40} {human_pos}/{human_len} tokens  {per_sec}  ETA {eta}")
            .expect("static template"),
    );
    bar
}
