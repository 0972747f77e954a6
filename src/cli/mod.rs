//! Subcommands of the `dorafuse` binary; one file per command.

mod analyze;
mod bench;
mod export_lora;
mod inspect;
mod merge;
mod profile;
mod replay;
mod resize;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// Fused DoRA kernels: replay PyTorch layers, benchmark the kernels, inspect and merge PEFT
/// adapters.
#[derive(Parser, Debug)]
#[command(name = "dorafuse", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run layer cases (safetensors from PyTorch) and compare with their expected outputs.
    Replay(replay::Args),
    /// Benchmark DoRA against the base layer, LoRA and unfused DoRA (the main job).
    Bench(Box<bench::Args>),
    /// Show a PEFT adapter's modules: rank, scaling, norms, and DoRA's ΔM/ΔD against a base.
    Inspect(inspect::Args),
    /// Merge a PEFT adapter into a base model's safetensors weights.
    Merge(merge::Args),
    /// The DoRA paper's Figure 2 over checkpoints: magnitude vs direction change per module.
    Analyze(analyze::Args),
    /// Memory figures and grid fill of every kernel from the emulator's access record.
    Profile(profile::Args),
    /// Lower an adapter's rank by SVD of each module's update (fixed rank or energy).
    Resize(resize::Args),
    /// Turn a DoRA adapter into a plain LoRA adapter by a randomized SVD of its full update.
    ExportLora(export_lora::Args),
}

/// Where a layer is computed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU reference path.
    Cpu,
    /// The CUDA kernels run on the CPU emulator (slow; for verification).
    Emu,
    /// The CUDA kernels on the first GPU.
    Cuda,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Replay(a) => replay::run(a),
        Command::Bench(a) => bench::run(*a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Resize(a) => resize::run(a),
        Command::ExportLora(a) => export_lora::run(a),
    }
}
