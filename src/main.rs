//! The `dorafuse` command line.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // One line: the outermost context first, then each cause.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
