//! `dorafuse merge`: write a base model with a PEFT adapter merged into its weights, or undo
//! such a merge.

use anyhow::{bail, Context, Result};
use dorafuse::adapter::{
    merge_model, unmerge_model, Adapter, ApplyOptions, BaseModel, MergeDevice, MergeOptions,
    NameMap,
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

/// The choices an adapter's files cannot settle, shared by `merge` and `inspect`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApplyArgs {
    /// Base tensor names are PREFIX + "." + the adapter's module names ("" for the names as
    /// they are). Needed when the names fit the base in more than one way.
    #[arg(long, value_name = "PREFIX", conflicts_with = "strip_prefix")]
    base_prefix: Option<String>,
    /// Base tensor names are the adapter's module names without their first component
    /// PREFIX (e.g. "bert").
    #[arg(long, value_name = "PREFIX")]
    strip_prefix: Option<String>,
    /// Adapter modules (a regular expression over the whole module name) whose base
    /// weights are stored [in, out] (transformers' Conv1D); all others are [out, in]. Needed
    /// when a square weight's layout is not told by the base's config.json ("" for none).
    #[arg(long, value_name = "REGEX")]
    fan_in_fan_out: Option<String>,
}

impl ApplyArgs {
    /// The library's options.
    pub fn options(&self) -> ApplyOptions {
        let names = match (&self.base_prefix, &self.strip_prefix) {
            (Some(p), _) if p.trim_end_matches('.').is_empty() => Some(NameMap::Identity),
            (Some(p), _) => Some(NameMap::Add(p.trim_end_matches('.').to_string())),
            (None, Some(p)) => Some(NameMap::Strip(p.trim_end_matches('.').to_string())),
            (None, None) => None,
        };
        ApplyOptions {
            names,
            fan_in_fan_out: self.fan_in_fan_out.clone(),
        }
    }
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
    #[command(flatten)]
    apply: ApplyArgs,
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
        &MergeOptions {
            device,
            progress,
            apply: args.apply.options(),
        },
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
