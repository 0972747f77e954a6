//! `dorafuse analyze`: the DoRA paper's Figure 2 (magnitude against direction change) over
//! training checkpoints, as a table, JSON and an SVG scatter plot.

use anyhow::{Context, Result};
use dorafuse::adapter::BaseModel;
use dorafuse::analysis::delta::{analyze_run, Run};
use dorafuse::analysis::plot::plot_svg;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dorafuse analyze`.
///
/// For each checkpoint (a PEFT DoRA or plain LoRA adapter directory) and each module, against
/// the base weight W0 with rows W0_j (PEFT's row-wise norm, one magnitude per output row;
/// the paper's columns):
///   ΔM = mean_j |m_j − ‖W0_j‖|   and   ΔD = mean_j (1 − cos(W'_j, W0_j)),
/// where for DoRA m is the trained magnitude and W' = diag(m/‖W0 + s·B·A‖)·(W0 + s·B·A), and
/// for LoRA W' = W0 + s·B·A and m_j = ‖W'_j‖ (Liu et al., ICML 2024, §3.2). Per checkpoint:
/// the totals over all rows, and across modules the Pearson correlation of ΔD and ΔM and the
/// least-squares slope of ΔM on ΔD (the paper: negative for DoRA and full fine-tuning,
/// positive for LoRA). A step is the trailing number of a checkpoint's directory name.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model (directory or .safetensors file) the adapters were trained on;
    /// required: ΔM and ΔD are measured against W0.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Checkpoints of one run, in training order (at least one).
    checkpoints: Vec<PathBuf>,
    /// Checkpoints of a second run (e.g. LoRA at the same rank), drawn in its own panel.
    #[arg(long, num_args = 1..)]
    compare: Vec<PathBuf>,
    /// Write the scatter plot (SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the full results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    // How the checkpoints' modules map onto the base (as for `merge`).
    #[command(flatten)]
    apply: super::merge::ApplyArgs,
}

#[derive(serde::Serialize)]
struct Report<'a> {
    base: String,
    definitions: Definitions,
    runs: &'a [Run],
}

#[derive(serde::Serialize)]
struct Definitions {
    delta_m: &'static str,
    delta_d: &'static str,
    slope: &'static str,
}

/// Runs `dorafuse analyze`.
pub fn run(args: Args) -> Result<ExitCode> {
    for p in args.plot.iter().chain(args.json.iter()) {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(d) = parent {
            anyhow::ensure!(
                d.is_dir(),
                "{}: directory {} does not exist",
                p.display(),
                d.display()
            );
        }
    }
    let Some(base_path) = &args.base else {
        anyhow::bail!(
            "analyze needs --base MODEL_DIR: ΔM and ΔD are measured against the base weights"
        );
    };
    anyhow::ensure!(
        !args.checkpoints.is_empty(),
        "analyze needs at least one checkpoint directory"
    );
    let base = BaseModel::open(base_path)?;
    let opts = args.apply.options();
    let mut runs = vec![analyze_run(&base, &args.checkpoints, &opts)?];
    if !args.compare.is_empty() {
        runs.push(analyze_run(&base, &args.compare, &opts).context("--compare")?);
    }
    print_table(&runs);
    if let Some(p) = &args.json {
        let rep = Report {
            base: base_path.display().to_string(),
            definitions: Definitions {
                delta_m:
                    "mean over output rows j of |m_j - ||W0_j|||; LoRA: m_j = ||W0_j + s B_j A||",
                delta_d: "mean over output rows j of 1 - cos(W'_j, W0_j), W' the adapted weight",
                slope: "least-squares slope of delta_m on delta_d across modules",
            },
            runs: &runs,
        };
        let text = serde_json::to_string_pretty(&rep)?;
        dorafuse::fsutil::write_atomic(p, |f| Ok(f.write_all(text.as_bytes())?))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        plot_svg(&runs, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |x| format!("{x:+.3}"))
}

fn print_table(runs: &[Run]) {
    let w = runs
        .iter()
        .flat_map(|r| {
            r.checkpoints
                .iter()
                .flat_map(|c| c.modules.iter().map(|m| m.module.len()))
        })
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:6} {:>7} {:w$}  {:>11} {:>11}",
        "method", "step", "module", "ΔM", "ΔD"
    );
    for run in runs {
        for c in &run.checkpoints {
            for m in &c.modules {
                println!(
                    "{:6} {:>7} {:w$}  {:>11.4e} {:>11.4e}",
                    c.method, c.step, m.module, m.delta_m, m.delta_d
                );
            }
        }
    }
    println!();
    println!(
        "{:6} {:>7} {:>7} {:>11} {:>11} {:>8} {:>12}",
        "method", "step", "modules", "total ΔM", "total ΔD", "corr", "slope ΔM/ΔD"
    );
    for run in runs {
        for c in &run.checkpoints {
            println!(
                "{:6} {:>7} {:>7} {:>11.4e} {:>11.4e} {:>8} {:>12}",
                c.method,
                c.step,
                c.modules.len(),
                c.total_delta_m,
                c.total_delta_d,
                opt(c.fit.correlation),
                c.fit.slope.map_or("-".into(), |s| format!("{s:+.4e}"))
            );
        }
        println!(
            "{:6} {:>7} {:>7} {:>11} {:>11} {:>8} {:>12}",
            run.method,
            "all",
            run.fit.points,
            "",
            "",
            opt(run.fit.correlation),
            run.fit.slope.map_or("-".into(), |s| format!("{s:+.4e}"))
        );
    }
}
