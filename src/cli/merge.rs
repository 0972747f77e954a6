//! `dorafuse merge`: write a base model with a PEFT adapter merged into its weights, or undo
//! such a merge.

use anyhow::{bail, Context, Result};
use dorafuse::adapter::{
    merge_model, unmerge_model, Adapter, BaseModel, MergeDevice, MergeOptions,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

/// Where W' is computed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The CPU path.
    Cpu,
    /// The CUDA kernels on GPU 0 (fails without one).
    Cuda,
}

/// Arguments of `dorafuse merge`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a directory with model.safetensors or model.safetensors.index.json,
    /// or one .safetensors file. With --unmerge: a directory written by `dorafuse merge`.
    #[arg(long)]
    base: PathBuf,
    /// The PEFT adapter directory (not needed with --unmerge).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The output directory; must not exist. Written beside it, then renamed into place.
    #[arg(long)]
    out: PathBuf,
    /// Where W' = diag(g)·(W0 + s·B·A) is computed.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Undo a merge: restore W0 = W'/g − s·B·A from the dora_unmerge.safetensors it wrote.
    #[arg(long)]
    unmerge: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Runs `dorafuse merge`.
pub fn run(args: Args) -> Result<ExitCode> {
    let progress = !args.quiet && std::io::stderr().is_terminal();
    let base = BaseModel::open(&args.base)?;
    if args.unmerge {
        if args.adapter.is_some() {
            bail!("--unmerge takes no --adapter: the merged model's dora_unmerge.safetensors holds what is needed");
        }
        let r = unmerge_model(&base, &args.out, progress)?;
        eprintln!(
            "unmerged {} weights, copied {} tensors unchanged, {} shard(s) -> {}",
            r.modules,
            r.copied,
            r.shards,
            r.out.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let dir = args
        .adapter
        .as_ref()
        .context("--adapter is required (or --unmerge)")?;
    let adapter = Adapter::load(dir)?;
    let device = match args.device {
        Device::Cpu => MergeDevice::Cpu,
        Device::Cuda => MergeDevice::Cuda,
        Device::Auto => {
            if MergeDevice::cuda_usable() {
                MergeDevice::Cuda
            } else {
                MergeDevice::Cpu
            }
        }
    };
    let r = merge_model(
        &base,
        &adapter,
        &args.out,
        &MergeOptions { device, progress },
    )?;
    eprintln!(
        "merged {} modules ({:?}), copied {} tensors unchanged, {} shard(s), {:.1} MB -> {}",
        r.modules,
        device,
        r.copied,
        r.shards,
        r.bytes as f64 / 1e6,
        r.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
