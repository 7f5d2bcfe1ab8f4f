//! `grape` and `lowest`: rank each instruction's candidates by their score under the target
//! model and keep the top or bottom `k`. The score is the mean log-probability per response
//! token by default: the final version of the paper keeps "the highest normalized probability
//! (i.e., lowest perplexity)" (§3.2); `normalize=sum`, the first version's π(y|x), stays as an
//! ablation.

use super::{Among, Count, Needs, ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::score::Score;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalize {
    /// log π(y|x), summed over response tokens (the first version of the paper).
    Sum,
    /// Per response token: the length-normalised score of the final version (the default).
    Mean,
    /// Per UTF-8 byte of the response, comparable across tokenizers.
    Bytes,
}

impl std::str::FromStr for Normalize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Normalize::Sum),
            "mean" => Ok(Normalize::Mean),
            "bytes" => Ok(Normalize::Bytes),
            other => Err(Error::Invalid(format!("normalize `{other}`: expected sum, mean or bytes"))),
        }
    }
}

impl Normalize {
    pub fn apply(self, s: &Score) -> f64 {
        match self {
            Normalize::Sum => s.sum_logprob,
            Normalize::Mean => s.sum_logprob / s.n_tokens.max(1) as f64,
            Normalize::Bytes => s.sum_logprob / s.n_bytes.max(1) as f64,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Normalize::Sum => "sum",
            Normalize::Mean => "mean",
            Normalize::Bytes => "per-byte",
        }
    }
}

pub struct Ranked {
    name: &'static str,
    highest: bool,
    normalize: Normalize,
    count: Count,
    among: Among,
}

pub fn build_highest(params: &Params) -> Result<Box<dyn Selector>> {
    build("grape", true, params)
}

pub fn build_lowest(params: &Params) -> Result<Box<dyn Selector>> {
    build("lowest", false, params)
}

fn build(name: &'static str, highest: bool, params: &Params) -> Result<Box<dyn Selector>> {
    let p = ParamReader::new(name, params, &["normalize", "k", "like", "only"])?;
    Ok(Box::new(Ranked {
        name,
        highest,
        normalize: p.get("normalize", Normalize::Mean, "sum, mean or bytes")?,
        count: Count::read(&p, "k", 1)?,
        among: Among::read(&p),
    }))
}

impl Selector for Ranked {
    fn name(&self) -> &'static str {
        self.name
    }

    fn needs(&self) -> Needs {
        Needs::Scores
    }

    /// The default changed from sum to mean.
    fn defaults(&self) -> Option<serde_json::Value> {
        Some(serde_json::json!({"normalize": self.normalize.name()}))
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        let scores = input.scores(self.name)?;
        self.count.check(self.name, input.pool)?;
        self.among.check(self.name, input.pool)?;
        let mut picks = Vec::new();
        let mut flagged = Vec::new();
        for (i, (instruction, instruction_scores)) in input.pool.instructions.iter().zip(scores).enumerate() {
            let mut ranked: Vec<(usize, f64)> = instruction_scores
                .iter()
                .enumerate()
                .filter(|&(j, _)| self.among.allows(&instruction.candidates[j]))
                .filter_map(|(j, s)| Some((j, self.normalize.apply(s.as_ref()?))))
                .collect();
            if ranked.is_empty() {
                flagged.push(format!("instruction `{}`: no scored candidate, dropped", instruction.id));
                continue;
            }
            if instruction.candidates.len() == 1 {
                flagged.push(format!("instruction `{}`: a single candidate, kept", instruction.id));
            }
            // Best first; ties go to the earlier candidate, so the order is reproducible.
            ranked.sort_by(|a, b| {
                let by_score = if self.highest { b.1.total_cmp(&a.1) } else { a.1.total_cmp(&b.1) };
                by_score.then(a.0.cmp(&b.0))
            });
            let total = ranked.len();
            for (rank, (j, value)) in ranked.into_iter().take(self.count.of(instruction)).enumerate() {
                picks.push(Pick {
                    instruction: i,
                    candidate: j,
                    score: Some(value),
                    detail: None,
                    why: format!(
                        "{} {} log-prob {value:.4}, rank {} of {total}",
                        if self.highest { "highest" } else { "lowest" },
                        self.normalize.name(),
                        rank + 1
                    ),
                });
            }
        }
        Ok(Selection { selector: self.name.to_string(), picks, flagged, report: None })
    }
}
