//! `dorafuse replay` (being written).

use anyhow::{bail, Result};
use std::process::ExitCode;

/// Arguments of `dorafuse replay`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dorafuse replay`.
pub fn run(_args: Args) -> Result<ExitCode> {
    bail!("replay is not built yet")
}
