//! `dorafuse resize`: lower the rank of a PEFT LoRA/DoRA adapter by SVD of each module's
//! update, to a fixed rank or to an energy fraction (dynamic rank).

use anyhow::Result;
use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel};
use dorafuse::analysis::lowrank::RankTarget;
use dorafuse::analysis::resize::{resize, ResizeOptions, ResizeRow};
use dorafuse::analysis::save_new_adapter;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dorafuse resize`.
///
/// Each module's update s·B·A is truncated to its leading singular directions, computed from
/// B and A alone (QR of B and of Aᵀ, then the SVD of the small r×r core; d_out×d_in is never
/// built). --rank R keeps R directions in every module (all of a module of rank below R); --energy E keeps, per module, the
/// smallest rank holding the fraction E of ‖s·B·A‖_F² (with --per-module each module keeps
/// its own rank; without, every module gets the largest of those ranks). A DoRA adapter
/// keeps its magnitude vector; with --base, the change of its scale g = m/‖W0 + s·B·A‖ and of
/// the whole layer output is reported. The output is a PEFT adapter (r and rank_pattern give
/// each module its rank, lora_alpha and alpha_pattern are kept, so the scaling is alpha/k).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    adapter: PathBuf,
    /// The output adapter directory; must not exist.
    #[arg(long)]
    out: PathBuf,
    /// Keep at most this rank in every module (a module of lower rank is kept whole; above
    /// both the module's rank and min(d_out, d_in) is refused).
    #[arg(long)]
    rank: Option<usize>,
    /// Keep the smallest rank holding this fraction, in (0, 1], of each update's squared
    /// Frobenius norm.
    #[arg(long, allow_negative_numbers = true)]
    energy: Option<f64>,
    /// With --energy: each module gets its own rank (written to rank_pattern).
    #[arg(long)]
    per_module: bool,
    /// A base model (directory or .safetensors file): report the change of the whole layer
    /// output and, for DoRA, of g.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    // With --base: how the adapter's modules map onto the base (as for `merge`).
    #[command(flatten)]
    apply: super::merge::ApplyArgs,
}

/// Runs `dorafuse resize`.
pub fn run(args: Args) -> Result<ExitCode> {
    let target = RankTarget::from_options(args.rank, args.energy)?;
    anyhow::ensure!(
        !args.per_module || args.energy.is_some(),
        "--per-module goes with --energy (with --rank every module gets the same rank)"
    );
    anyhow::ensure!(
        !args.out.exists(),
        "output {} already exists; choose a new directory",
        args.out.display()
    );
    let adapter = Adapter::load(&args.adapter)?;
    let base = args.base.as_ref().map(|p| BaseModel::open(p)).transpose()?;
    let model = base
        .as_ref()
        .map(|b| AdaptedModel::with_options(b, &adapter, &args.apply.options()))
        .transpose()?;
    let opts = ResizeOptions {
        target,
        per_module: args.per_module,
    };
    let (out, rows) = resize(&adapter, model.as_ref(), opts)?;
    save_new_adapter(&out, &args.out)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows, adapter.is_dora());
        eprintln!("wrote {}", args.out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[ResizeRow], dora: bool) {
    let w = rows
        .iter()
        .map(|r| r.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let scope = rows.first().map_or("update", |r| r.output_scope);
    let out_head = format!("{scope} Δy");
    println!(
        "{:w$}  {:>6} {:>6} {:>12} {:>12} {:>12}{}",
        "module",
        "r",
        "kept",
        "energy kept",
        "‖ΔsBA‖ rel",
        out_head,
        if dora {
            format!(" {:>12}", "max Δg/g")
        } else {
            String::new()
        }
    );
    for r in rows {
        println!(
            "{:w$}  {:>6} {:>6} {:>12.6} {:>12.3e} {:>12.3e}{}",
            r.module,
            r.rank_before,
            r.rank,
            r.energy_kept,
            r.update_rel_err,
            r.output_rel_change,
            if dora {
                format!(
                    " {:>12}",
                    r.g_max_rel_change
                        .map_or("needs --base".into(), |g| format!("{g:.3e}"))
                )
            } else {
                String::new()
            }
        );
    }
    let before: usize = rows
        .iter()
        .map(|r| r.rank_before * (r.d_in + r.d_out))
        .sum();
    let after: usize = rows.iter().map(|r| r.rank * (r.d_in + r.d_out)).sum();
    println!(
        "{} modules: LoRA parameters {before} -> {after}; Δy on {} standard normal tokens",
        rows.len(),
        dorafuse::analysis::INPUT_TOKENS
    );
}
