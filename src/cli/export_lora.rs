//! `dorafuse export-lora`: a DoRA adapter as a plain LoRA adapter, for engines that load only
//! LoRA.

use anyhow::Result;
use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel};
use dorafuse::analysis::export::{export_lora, ExportOptions, ExportRow};
use dorafuse::analysis::lowrank::RankTarget;
use dorafuse::analysis::save_new_adapter;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dorafuse export-lora`.
///
/// A DoRA layer's full update over its base is ΔW = diag(g − 1)·W0 + diag(g)·s·B·A, with
/// g = m/‖W0 + s·B·A‖ per output row. It is approximated by s'·B'·A' of rank k through a
/// randomized SVD (Halko, Martinsson, Tropp 2011) whose products read W0 block by block from
/// the base's memory map; no d_out×d_in matrix is held. The reported errors are exact, from
/// the factors as written: ‖ΔW − s'·B'·A'‖_F/‖ΔW‖_F and the layer output error on random
/// inputs. Written as PEFT's LoRA format (use_dora false; r and rank_pattern give the ranks,
/// lora_alpha and alpha_pattern are kept).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The DoRA adapter directory.
    adapter: PathBuf,
    /// The base model the adapter was trained on (directory or .safetensors file); required:
    /// ΔW involves W0.
    #[arg(long)]
    base: Option<PathBuf>,
    /// The output adapter directory; must not exist.
    #[arg(long)]
    out: PathBuf,
    /// The LoRA rank of every module (1 ..= min(d_out, d_in)).
    #[arg(long)]
    rank: Option<usize>,
    /// Per module, the smallest rank holding this fraction, in (0, 1], of ‖ΔW‖_F².
    #[arg(long, allow_negative_numbers = true)]
    energy: Option<f64>,
    /// Subspace iterations of the randomized SVD (each reads W0 twice more).
    #[arg(long, default_value_t = 2)]
    power_iters: usize,
    /// Sketch columns beyond the rank.
    #[arg(long, default_value_t = 10)]
    oversample: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    // How the adapter's modules map onto the base (as for `merge`).
    #[command(flatten)]
    apply: super::merge::ApplyArgs,
}

/// Runs `dorafuse export-lora`.
pub fn run(args: Args) -> Result<ExitCode> {
    let target = RankTarget::from_options(args.rank, args.energy)?;
    let Some(base) = &args.base else {
        anyhow::bail!(
            "export-lora needs --base MODEL_DIR: the DoRA update ΔW involves the base weight W0"
        );
    };
    anyhow::ensure!(
        !args.out.exists(),
        "output {} already exists; choose a new directory",
        args.out.display()
    );
    let adapter = Adapter::load(&args.adapter)?;
    let base = BaseModel::open(base)?;
    let model = AdaptedModel::with_options(&base, &adapter, &args.apply.options())?;
    let opts = ExportOptions {
        target,
        oversample: args.oversample,
        power_iters: args.power_iters,
    };
    let (out, rows) = export_lora(&model, opts)?;
    save_new_adapter(&out, &args.out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
        eprintln!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[ExportRow]) {
    let w = rows
        .iter()
        .map(|r| r.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:w$}  {:>6} {:>6} {:>7} {:>12} {:>14} {:>14}",
        "module", "r DoRA", "r LoRA", "sketch", "‖ΔW‖_F", "‖ΔW−s'B'A'‖ rel", "layer Δy rel"
    );
    for r in rows {
        println!(
            "{:w$}  {:>6} {:>6} {:>7} {:>12.4e} {:>14.3e} {:>14.3e}",
            r.module,
            r.rank_before,
            r.rank,
            r.sketch,
            r.delta_w_fro,
            r.weight_rel_err,
            r.output_rel_err
        );
    }
    let worst = rows.iter().map(|r| r.weight_rel_err).fold(0.0, f64::max);
    println!(
        "{} modules; worst weight error {worst:.3e}; Δy on {} standard normal tokens",
        rows.len(),
        dorafuse::analysis::INPUT_TOKENS
    );
}
