//! `all`: every candidate of every instruction (the paper's "All Responses" baseline, 1.03M
//! pairs on the Tulu-3/OLMo-2 pool).

use super::{ParamReader, Params, Pick, SelectInput, Selection, Selector};
use crate::Result;

pub struct All;

pub fn build(params: &Params) -> Result<Box<dyn Selector>> {
    ParamReader::new("all", params, &[])?;
    Ok(Box::new(All))
}

impl Selector for All {
    fn name(&self) -> &'static str {
        "all"
    }

    fn select(&self, input: &SelectInput) -> Result<Selection> {
        let picks = input
            .pool
            .instructions
            .iter()
            .enumerate()
            .flat_map(|(i, instruction)| {
                (0..instruction.candidates.len()).map(move |j| Pick {
                    instruction: i,
                    candidate: j,
                    score: None,
                    detail: None,
                    why: "every response is kept".into(),
                })
            })
            .collect();
        Ok(Selection { selector: "all".into(), picks, flagged: Vec::new(), report: None })
    }
}
