//! `dorafuse inspect`: a PEFT adapter's modules at a glance, and with a base model the DoRA
//! paper's Figure-2 quantities (magnitude and direction change per module).

use anyhow::{Context, Result};
use dorafuse::adapter::stats::{self, ModuleStats};
use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dorafuse inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    adapter: PathBuf,
    /// A base model (directory or .safetensors file): adds ΔM and ΔD per module.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    apply: super::merge::ApplyArgs,
}

/// Everything inspect reports.
#[derive(serde::Serialize)]
struct Report {
    adapter: String,
    base: Option<String>,
    use_dora: bool,
    use_rslora: bool,
    /// The config's single flag; each module's own layout is in its `layer`.
    config_fan_in_fan_out: bool,
    modules: Vec<ModuleStats>,
    summary: Summary,
}

#[derive(serde::Serialize)]
struct Summary {
    modules: usize,
    parameters: usize,
    ranks: Vec<usize>,
    dtypes: Vec<String>,
    mean_delta_m: Option<f64>,
    mean_delta_d: Option<f64>,
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.prec$e}"))
}

/// Runs `dorafuse inspect`.
pub fn run(args: Args) -> Result<ExitCode> {
    let adapter = Adapter::load(&args.adapter)?;
    let base = args.base.as_ref().map(|p| BaseModel::open(p)).transpose()?;
    let model = base
        .as_ref()
        .map(|b| AdaptedModel::with_options(b, &adapter, &args.apply.options()))
        .transpose()?;
    let mut rows = Vec::new();
    let mut params = 0usize;
    for m in adapter.modules.values() {
        let mut st = stats::module_stats(m);
        params += m.lora_a.len() + m.lora_b.len() + m.magnitude.as_ref().map_or(0, |t| t.len());
        if let Some(model) = &model {
            if st.layer.is_none() {
                let conv1d = model.module_fan_in_fan_out(&m.name)?;
                st.layer = Some(if conv1d { "conv1d" } else { "linear" }.into());
            }
            let (dm, dd, w0) =
                stats::module_figure2(model, &m.name).with_context(|| m.name.clone())?;
            st.delta_m = Some(dm);
            st.delta_d = Some(dd);
            st.w0_fro = Some(w0);
        }
        rows.push(st);
    }
    let mut ranks: Vec<usize> = rows.iter().map(|r| r.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let mut dtypes: Vec<String> = rows.iter().map(|r| r.dtype.clone()).collect();
    dtypes.sort();
    dtypes.dedup();
    let mean = |f: fn(&ModuleStats) -> Option<f64>| -> Option<f64> {
        let v: Option<Vec<f64>> = rows.iter().map(f).collect();
        v.filter(|v| !v.is_empty())
            .map(|v| v.iter().sum::<f64>() / v.len() as f64)
    };
    let summary = Summary {
        modules: rows.len(),
        parameters: params,
        ranks,
        dtypes,
        mean_delta_m: mean(|r| r.delta_m),
        mean_delta_d: mean(|r| r.delta_d),
    };
    let l = &adapter.config.lora;
    let report = Report {
        adapter: args.adapter.display().to_string(),
        base: args.base.as_ref().map(|p| p.display().to_string()),
        use_dora: l.use_dora,
        use_rslora: l.use_rslora,
        config_fan_in_fan_out: l.fan_in_fan_out,
        modules: rows,
        summary,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_table(&report);
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report) {
    let w = r
        .modules
        .iter()
        .map(|m| m.module.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:w$}  {:>4} {:>7} {:>9} {:>5} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}",
        "module",
        "r",
        "alpha",
        "scaling",
        "dtype",
        "layer",
        "|sBA|_F",
        "m min",
        "m mean",
        "m max",
        "dM",
        "dD"
    );
    for m in &r.modules {
        println!(
            "{:w$}  {:>4} {:>7} {:>9.4} {:>5} {:>9} {:>11.4e} {:>11} {:>11} {:>11} {:>10} {:>10}",
            m.module,
            m.rank,
            m.alpha,
            m.scaling,
            m.dtype,
            m.layer.as_deref().unwrap_or("-"),
            m.sba_fro,
            opt(m.magnitude_min, 4),
            opt(m.magnitude_mean, 4),
            opt(m.magnitude_max, 4),
            opt(m.delta_m, 3),
            opt(m.delta_d, 3),
        );
    }
    let s = &r.summary;
    let kind = if r.use_dora { "DoRA" } else { "LoRA" };
    let mut line = format!(
        "{} {kind} modules, {} parameters, rank {}, {}{}",
        s.modules,
        s.parameters,
        s.ranks
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        s.dtypes.join("/"),
        if r.use_rslora { ", rsLoRA" } else { "" }
    );
    if let (Some(dm), Some(dd)) = (s.mean_delta_m, s.mean_delta_d) {
        line.push_str(&format!("; mean dM {dm:.4e}, mean dD {dd:.4e}"));
    }
    println!("{line}");
}
