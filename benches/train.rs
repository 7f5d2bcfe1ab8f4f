//! `cargo bench --bench train`: full fine-tuning steps of SmolLM2-135M in f32 at micro-batch
//! 4x512 (tokens/s, GFLOP/s, peak memory).

use grape_harness::{bench, model};

fn main() -> anyhow::Result<()> {
    grape_harness::util::keep_freed_memory();
    let (m, vars) = model::load_trainable("smollm2-135m-instruct", &model::LoadOptions::default())?;
    println!("{}", bench::training(&m, &vars, 4, 512, 3)?);
    Ok(())
}
