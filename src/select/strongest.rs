//! `strongest`: only the responses of one named source model (the paper's
//! "Llama3.1-405B only"). Instructions that model did not answer are dropped or filled
//! with a random response, by `fill`.

use super::{Count, ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::util::Rng;
use crate::{Error, Result};

pub struct Strongest {
    source: String,
    fill_random: bool,
    /// The source's responses kept per instruction (`None`: all of them, as the paper's
    /// "Original-UI" keeps).
    count: Option<Count>,
}

pub fn build(params: &Params) -> Result<Box<dyn Selector>> {
    let p = ParamReader::new("strongest", params, &["source", "fill", "k", "like"])?;
    let source: String = p.get("source", String::new(), "a source model name")?;
    if source.is_empty() {
        return Err(Error::Invalid("selector `strongest`: parameter `source` is required".into()));
    }
    let fill_random = match p.get("fill", "drop".to_string(), "drop or random")?.as_str() {
        "drop" => false,
        "random" => true,
        other => return Err(Error::Invalid(format!("selector `strongest`: `fill={other}`: expected drop or random"))),
    };
    let count = match params.get("k").map(String::as_str) {
        Some("all") => None,
        _ => Some(Count::read(&p, "k", 1)?),
    };
    Ok(Box::new(Strongest { source, fill_random, count }))
}

impl Selector for Strongest {
    fn name(&self) -> &'static str {
        "strongest"
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        let sources = input.pool.sources();
        if !sources.contains(&self.source) {
            return Err(Error::Invalid(format!(
                "selector `strongest`: source `{}` is not in the pool (sources present: {})",
                self.source,
                sources.join(", ")
            )));
        }
        if let Some(count) = &self.count {
            count.check("strongest", input.pool)?;
        }
        let mut rng = Rng::new(input.seed);
        let mut picks = Vec::new();
        let mut flagged = Vec::new();
        for (i, instruction) in input.pool.instructions.iter().enumerate() {
            let score = |j: usize| input.scores.and_then(|s| s.get(i)?.get(j)?.as_ref()).map(|s| s.sum_logprob);
            let own: Vec<usize> = (0..instruction.candidates.len())
                .filter(|&j| instruction.candidates[j].source == self.source)
                .take(self.count.as_ref().map_or(usize::MAX, |c| c.of(instruction)))
                .collect();
            match own.first() {
                Some(_) => picks.extend(own.into_iter().map(|j| Pick {
                    instruction: i,
                    candidate: j,
                    score: score(j),
                    detail: None,
                    why: format!("written by {}", self.source),
                })),
                None if self.fill_random => {
                    let j = rng.below(instruction.candidates.len());
                    flagged.push(format!("instruction `{}`: no {} response, filled at random", instruction.id, self.source));
                    picks.push(Pick { instruction: i, candidate: j, score: score(j), detail: None, why: format!("no {} response; uniform fill", self.source) });
                }
                None => flagged.push(format!("instruction `{}`: no {} response, dropped", instruction.id, self.source)),
            }
        }
        Ok(Selection { selector: "strongest".into(), picks, flagged, report: None })
    }
}
