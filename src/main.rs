//! The `dorafuse` command line.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so printing to a closed pipe (`dorafuse inspect … | head`) would
    // panic; with the default action the process ends quietly, as every Unix tool does.
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE and no Rust code relies on it being ignored (writes to files and
    // sockets are unaffected).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // An interrupted merge removes its temporary output before exiting.
    if let Err(e) = dorafuse::fsutil::install_signal_cleanup() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
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
