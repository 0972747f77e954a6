//! `dorafuse bench` (being written).

use anyhow::{bail, Result};
use std::process::ExitCode;

/// Arguments of `dorafuse bench`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dorafuse bench`.
pub fn run(_args: Args) -> Result<ExitCode> {
    bail!("bench is not built yet")
}
