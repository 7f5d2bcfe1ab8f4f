//! `cargo bench --bench score`: scoring the first 64 instructions of the 12-model
//! AlpacaEval pool with SmolLM2-135M, prompt sharing on and off.

use grape_harness::score::ScoreOptions;
use grape_harness::{bench, model, pool};

fn main() -> anyhow::Result<()> {
    grape_harness::util::keep_freed_memory();
    let m = model::load("smollm2-135m-instruct", &model::LoadOptions::default())?;
    let path = pool::data_dir().join("pools/alpacaeval-12models.jsonl.gz");
    let pool = pool::read(&path, &pool::Columns::default(), false)?.truncated(64);
    let groups = pool.groups();
    for share_prefix in [true, false] {
        let options = ScoreOptions { share_prefix, progress: true, ..ScoreOptions::default() };
        println!("{}", bench::scoring(&m, &groups, &options)?);
    }
    Ok(())
}
