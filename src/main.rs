//! The `harness` binary: parse arguments, run, print one clear line on failure.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    grape_harness::util::keep_freed_memory();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints every cause on one line, outermost first.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
