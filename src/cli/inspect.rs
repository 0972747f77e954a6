//! `dorafuse inspect` (being written).

use anyhow::{bail, Result};
use std::process::ExitCode;

/// Arguments of `dorafuse inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dorafuse inspect`.
pub fn run(_args: Args) -> Result<ExitCode> {
    bail!("inspect is not built yet")
}
