//! `longest`: the longest response per instruction, in characters (Zhao et al., 2024, "Long
//! Is More for Alignment"), a strong baseline that needs no model. Also the example of how
//! a selector is written: a struct, a `build` from parameters, and `select`.

use super::{ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::Result;

pub struct Longest {
    k: usize,
}

/// Registered in `select::REGISTRY` as `("longest", "...", longest::build)`.
pub fn build(params: &Params) -> Result<Box<dyn Selector>> {
    let p = ParamReader::new("longest", params, &["k"])?;
    Ok(Box::new(Longest { k: p.positive("k", 1)? }))
}

impl Selector for Longest {
    fn name(&self) -> &'static str {
        "longest"
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        let mut picks = Vec::new();
        for (i, instruction) in input.pool.instructions.iter().enumerate() {
            let length = |j: usize| instruction.candidates[j].response.chars().count();
            let mut order: Vec<usize> = (0..instruction.candidates.len()).collect();
            // Longest first; ties to the earlier candidate, so the choice is reproducible.
            order.sort_by_key(|&j| (std::cmp::Reverse(length(j)), j));
            for &j in order.iter().take(self.k) {
                picks.push(Pick {
                    instruction: i,
                    candidate: j,
                    score: Some(length(j) as f64),
                    detail: None,
                    why: format!("{} characters, rank {} of {} by length", length(j), picks.len() % self.k + 1, order.len()),
                });
            }
        }
        Ok(Selection { selector: "longest".into(), picks, flagged: Vec::new(), report: None })
    }
}
