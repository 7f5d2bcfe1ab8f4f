//! `cargo bench`: forward throughput of SmolLM2-135M in f32 at 8x512 and 1x512, beside
//! the machine's f32 matmul rate through candle. Prints tokens/s and GFLOP/s.

use grape_harness::{bench, model};

fn main() -> anyhow::Result<()> {
    grape_harness::util::keep_freed_memory();
    let name = std::env::var("HARNESS_BENCH_MODEL").unwrap_or_else(|_| "smollm2-135m-instruct".into());
    let options = model::LoadOptions::default();
    let m = model::load(&name, &options)?;
    let decoder = m.decoder()?;
    println!("{name}: {} parameters", m.config.parameter_count());
    println!("{}", bench::matmul_peak(1024, 10, &options.device)?);
    for (batch, len) in [(8, 512), (1, 512)] {
        println!("{}", bench::forward(decoder, &m.config, batch, len, 3, &options.device)?);
    }
    Ok(())
}
