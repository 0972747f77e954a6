//! `dorafuse merge` (being written).

use anyhow::{bail, Result};
use std::process::ExitCode;

/// Arguments of `dorafuse merge`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `dorafuse merge`.
pub fn run(_args: Args) -> Result<ExitCode> {
    bail!("merge is not built yet")
}
