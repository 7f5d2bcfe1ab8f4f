//! `harness bench`: forward throughput of a model, beside the machine's matmul rate.

use anyhow::Context;
use clap::Args;
use grape_harness::{bench, model};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A built-in name, a .gguf file or a Hugging Face folder.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Shapes to time, as BATCHxLEN.
    #[arg(long, value_delimiter = ',', default_value = "8x512,1x512")]
    shapes: Vec<String>,
    #[arg(long, default_value_t = 3)]
    iterations: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let options = model::LoadOptions::default();
    let m = model::load(&args.model, &options).with_context(|| format!("loading `{}`", args.model))?;
    let decoder = m.decoder()?;
    let mut results = vec![bench::matmul_peak(1024, 5, &options.device)?];
    for shape in &args.shapes {
        let (batch, len) = shape
            .split_once('x')
            .and_then(|(b, l)| Some((b.parse().ok()?, l.parse().ok()?)))
            .with_context(|| format!("shape `{shape}`: expected BATCHxLEN, e.g. 8x512"))?;
        results.push(bench::forward(decoder, &m.config, batch, len, args.iterations, &options.device)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        println!("model {} ({} parameters), {} threads", args.model, m.config.parameter_count(), cpu_threads());
        for r in &results {
            println!("{r}");
        }
    }
    Ok(())
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
