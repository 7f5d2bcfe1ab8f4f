//! `random` and `upscale`: uniformly random responses per instruction, without
//! replacement, from a seeded RNG.

use super::{Among, Count, ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::util::Rng;
use crate::Result;

pub struct Random {
    name: &'static str,
    count: Count,
    among: Among,
}

pub fn build_random(params: &Params) -> Result<Box<dyn Selector>> {
    let p = ParamReader::new("random", params, &["k", "like", "only"])?;
    Ok(Box::new(Random { name: "random", count: Count::read(&p, "k", 1)?, among: Among::read(&p) }))
}

/// The paper's "3x data": `factor` times as many responses as the one GRAPE keeps.
pub fn build_upscale(params: &Params) -> Result<Box<dyn Selector>> {
    let p = ParamReader::new("upscale", params, &["factor", "like", "only"])?;
    Ok(Box::new(Random { name: "upscale", count: Count::read(&p, "factor", 3)?, among: Among::read(&p) }))
}

impl Selector for Random {
    fn name(&self) -> &'static str {
        self.name
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        self.count.check(self.name, input.pool)?;
        self.among.check(self.name, input.pool)?;
        let mut rng = Rng::new(input.seed);
        let mut picks = Vec::new();
        let mut flagged = Vec::new();
        for (i, instruction) in input.pool.instructions.iter().enumerate() {
            let mut order: Vec<usize> = (0..instruction.candidates.len()).collect();
            rng.shuffle(&mut order);
            order.retain(|&j| self.among.allows(&instruction.candidates[j]));
            let (n, wanted) = (order.len(), self.count.of(instruction));
            if n < wanted {
                flagged.push(format!("instruction `{}`: {n} candidates, fewer than {wanted} asked; all kept", instruction.id));
            }
            for &j in order.iter().take(wanted) {
                let score = input.scores.and_then(|s| s.get(i)?.get(j)?.as_ref()).map(|s| s.sum_logprob);
                picks.push(Pick {
                    instruction: i,
                    candidate: j,
                    score,
                    detail: None,
                    why: format!("uniform draw {} of {} (seed {})", order.iter().position(|&o| o == j).unwrap_or(0) + 1, n, input.seed),
                });
            }
        }
        Ok(Selection { selector: self.name.to_string(), picks, flagged, report: None })
    }
}
