//! `dorafuse replay`: run layer cases captured from PyTorch and compare with what they expect.
//!
//! For every case, and every output with an `expected.*` tensor, it prints the relative L2
//! error ‖got − expected‖₂ / ‖expected‖₂ and pass/fail against a bar:
//!
//! - x in f32 (an f32 case): the f32 tolerance, 1e-5;
//! - x in f16/bf16, with PyTorch's own error recorded (`peft_rel_err.<output>` metadata, as
//!   the PEFT fixtures have): no more than twice PyTorch's error, and never above the dtype's
//!   tolerance (f16 1e-3, bf16 8e-3). The bar is floored at the output dtype's unit roundoff,
//!   which is about what rounding the truth itself to that dtype costs;
//! - x in f16/bf16 without it: the dtype's tolerance.
//!
//! With `--exact-grad`, grad_lora_A and grad_lora_B of a DoRA case are compared only when the
//! case says its expected gradients are exact (metadata `grad_mode = "exact"`); PEFT's are
//! detached, and replay then says that they were not compared rather than failing them.
//!
//! NaN never passes. When the case records `zero_rows`, replay also checks that y equals the
//! bias on those rows and that every output is finite. The exit status is non-zero when any
//! comparison fails or any case cannot be run.
//!
//! Multi-adapter cases (docs/design.md §2b; a file with an `adapter_index` tensor) run the
//! same way, forward only: y against `expected.y` with the same bars (PyTorch's own error from
//! `peft_rel_err.y`), and for each `zero_rows.<k>` entry a check that y equals the bias in
//! those rows for every token on adapter k.
//!
//! `--out`: with one case, the file to write its outputs to; with several, an existing
//! directory that receives `<case stem>.out.safetensors` for each. Outputs are written
//! atomically (temporary file + rename), so a failure never leaves a partial file.

use super::Device;
use anyhow::{ensure, Context, Result};
use dorafuse::case::{named_outputs, write_outputs, LayerCase};
use dorafuse::case_multi::{is_multi_case, MultiCase};
use dorafuse::dtype::DType;
use dorafuse::layer::{GradMode, Outputs};
use dorafuse::tensor::{rel_l2, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `dorafuse replay`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Layer-case files (safetensors, docs/design.md §2) or multi-adapter cases (§2b) to run.
    #[arg(required = true, value_name = "CASE")]
    cases: Vec<PathBuf>,
    /// Where to compute: the CPU path, the kernels on the CPU emulator, or the kernels on a GPU.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// Write the outputs: a file with one case, or an existing directory
    /// (`<case stem>.out.safetensors` in it); never over an input case or twice to one file.
    #[arg(long, value_name = "OUT")]
    out: Option<PathBuf>,
    /// Exact gradient (the norm not detached) instead of PEFT's detached one (layer cases;
    /// multi-adapter cases are forward only).
    #[arg(long)]
    exact_grad: bool,
}

/// Computes a case's outputs on `device`: the one seam between replay and the paths.
fn run_on(device: Device, case: &LayerCase, mode: GradMode) -> Result<Outputs> {
    let (layer, x, gy) = (&case.layer, &case.x, case.grad_y.as_ref());
    match device {
        Device::Cpu => dorafuse::cpu::run(layer, x, gy, mode),
        Device::Emu => {
            let b = dorafuse::emu::EmuBackend::from_env()?;
            dorafuse::kernels::run(&b, layer, x, gy, mode)
        }
        Device::Cuda => {
            let b = dorafuse::cuda::CudaBackend::new(0)?;
            dorafuse::kernels::run(&b, layer, x, gy, mode)
        }
    }
}

/// The device's name as the command line spells it.
fn device_name(d: Device) -> &'static str {
    match d {
        Device::Cpu => "cpu",
        Device::Emu => "emu",
        Device::Cuda => "cuda",
    }
}

/// The bar output `name` of `case` is held to, and a few words on where it comes from.
pub(crate) fn bar(case: &LayerCase, name: &str) -> (f64, String) {
    let comp = case.x.dtype();
    if comp == DType::F32 {
        return (DType::F32.tolerance(), "f32 tolerance".into());
    }
    let cap = comp.tolerance();
    match case.peft_rel_err(name) {
        Some(e) => {
            let floor = case.output_dtype(name).unit_roundoff();
            let b = (2.0 * e).min(cap).max(floor);
            (b, format!("2x PyTorch's {e:.2e}, cap {cap:.0e}"))
        }
        None => (cap, format!("{comp} tolerance")),
    }
}

/// The output path of every case, decided and checked before any case runs: `out` itself for
/// one case, else (several cases, or `out` an existing directory) `<case stem>.out.safetensors`
/// inside the directory `out`.
///
/// # Errors
/// Several cases and `out` not an existing directory; two cases that would write one file;
/// an output that is one of the input cases.
fn out_paths(out: &Path, cases: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let into_dir = out.is_dir();
    ensure!(
        into_dir || cases.len() == 1,
        "--out {} must be an existing directory when several cases are given",
        out.display()
    );
    let mut paths = Vec::with_capacity(cases.len());
    for case in cases {
        paths.push(if into_dir {
            let stem = case
                .file_stem()
                .with_context(|| format!("case path {} has no file name", case.display()))?;
            out.join(format!("{}.out.safetensors", stem.to_string_lossy()))
        } else {
            out.to_path_buf()
        });
    }
    let inputs: std::collections::HashSet<PathBuf> =
        cases.iter().filter_map(|c| c.canonicalize().ok()).collect();
    let mut seen = std::collections::HashSet::new();
    for (p, case) in paths.iter().zip(cases) {
        ensure!(
            seen.insert(p.clone()),
            "--out: {} would overwrite the output of an earlier case ({}); give cases with \
             distinct file names",
            case.display(),
            p.display()
        );
        if let Ok(c) = p.canonicalize() {
            ensure!(
                !inputs.contains(&c),
                "--out {} is one of the input cases; refusing to overwrite it",
                p.display()
            );
        }
    }
    Ok(paths)
}

/// Runs one case: compute, write (if asked), compare. Returns whether every check passed.
fn replay_one(args: &Args, path: &Path, out: Option<PathBuf>) -> Result<bool> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read layer case {}", path.display()))?;
    if is_multi_case(&bytes).with_context(|| format!("case {}", path.display()))? {
        let case = MultiCase::from_bytes(&bytes)
            .with_context(|| format!("multi-adapter case {}", path.display()))?;
        return replay_multi(args, path, &case, out);
    }
    let case =
        LayerCase::from_bytes(&bytes).with_context(|| format!("layer case {}", path.display()))?;
    let shape = case.shape()?;
    let mode = if args.exact_grad {
        GradMode::Exact
    } else {
        GradMode::Detached
    };
    let outputs = run_on(args.device, &case, mode).with_context(|| {
        format!(
            "layer case {}: running on {}",
            path.display(),
            device_name(args.device)
        )
    })?;
    if let Some(o) = &out {
        let mut meta = BTreeMap::new();
        meta.insert("source_case".into(), path.display().to_string());
        meta.insert("device".into(), device_name(args.device).into());
        meta.insert("grad_mode".into(), format!("{mode:?}").to_lowercase());
        write_outputs(o, &outputs, &meta)?;
    }
    let kind = if case.layer.is_dora() { "DoRA" } else { "LoRA" };
    println!(
        "{}: {kind} {shape}, x {}, device {}, {}{}",
        path.display(),
        case.x.dtype(),
        device_name(args.device),
        if case.grad_y.is_some() {
            format!("backward {}", format!("{mode:?}").to_lowercase())
        } else {
            "forward only".into()
        },
        out.as_ref()
            .map(|o| format!(", outputs -> {}", o.display()))
            .unwrap_or_default()
    );
    let mut ok = true;
    let produced = named_outputs(&outputs);
    let mut compared = 0;
    // The expected gradients were taken with one norm gradient (metadata `grad_mode`, PEFT's
    // "detached" when absent). The two modes differ only in grad_lora_A and grad_lora_B of a
    // DoRA layer; those are not comparable when the modes differ.
    let case_mode = case
        .metadata
        .get("grad_mode")
        .map(|m| m.to_ascii_lowercase())
        .unwrap_or_else(|| "detached".into());
    let run_mode = format!("{mode:?}").to_lowercase();
    let incomparable = |name: &str| {
        case.layer.is_dora()
            && case_mode != run_mode
            && (name == "grad_lora_A" || name == "grad_lora_B")
    };
    for (name, got) in &produced {
        let Some(want) = case.expected.get(*name) else {
            continue;
        };
        if incomparable(name) {
            println!(
                "  {name:<15} not compared: the case expects the {case_mode} gradient, this run took the {run_mode} one"
            );
            continue;
        }
        compared += 1;
        let err = rel_l2(&got.to_f64(), &want.to_f64());
        let (b, why) = bar(&case, name);
        let pass = err <= b;
        ok &= pass;
        println!(
            "  {name:<15} {:<5} rel_err {err:.3e}  bar {b:.3e} ({why})  {}",
            got.dtype().name(),
            if pass { "PASS" } else { "FAIL" }
        );
    }
    for name in case.expected.keys() {
        if !produced.iter().any(|(n, _)| n == name) {
            println!("  {name:<15} expected but not produced (no grad_y?)  FAIL");
            ok = false;
        }
    }
    if compared == 0 {
        println!("  no expected.* outputs in this case: nothing compared");
    }
    if let Some(rows) = case.metadata.get("zero_rows") {
        ok &= check_zero_rows(&case, &outputs, rows)?;
    }
    Ok(ok)
}

/// Computes a multi-adapter case's y on `device`.
fn run_multi_on(device: Device, case: &MultiCase) -> Result<Tensor> {
    let (layer, x, index) = (&case.layer, &case.x, case.adapter_index.as_slice());
    let base = dorafuse::kernels::multi::MultiBase::Compute;
    match device {
        Device::Cpu => dorafuse::cpu::multi::forward(layer, x, index),
        Device::Emu => {
            let b = dorafuse::emu::EmuBackend::from_env()?;
            dorafuse::kernels::multi::run_multi(&b, layer, x, index, base)
        }
        Device::Cuda => {
            let b = dorafuse::cuda::CudaBackend::new(0)?;
            dorafuse::kernels::multi::run_multi(&b, layer, x, index, base)
        }
    }
}

/// The bar y of a multi-adapter case is held to, as [`bar`] does for a layer case.
fn multi_bar(case: &MultiCase) -> (f64, String) {
    let comp = case.x.dtype();
    if comp == DType::F32 {
        return (DType::F32.tolerance(), "f32 tolerance".into());
    }
    let cap = comp.tolerance();
    match case.peft_rel_err() {
        Some(e) => {
            let b = (2.0 * e).min(cap).max(comp.unit_roundoff());
            (b, format!("2x PyTorch's {e:.2e}, cap {cap:.0e}"))
        }
        None => (cap, format!("{comp} tolerance")),
    }
}

/// Runs one multi-adapter case: compute, write (if asked), compare y and the zero rows.
fn replay_multi(args: &Args, path: &Path, case: &MultiCase, out: Option<PathBuf>) -> Result<bool> {
    let (t, d_in, d_out) = case.layer.check_call(&case.x, &case.adapter_index)?;
    let y = run_multi_on(args.device, case).with_context(|| {
        format!(
            "multi-adapter case {}: running on {}",
            path.display(),
            device_name(args.device)
        )
    })?;
    if let Some(o) = &out {
        let mut meta = BTreeMap::new();
        meta.insert("source_case".into(), path.display().to_string());
        meta.insert("device".into(), device_name(args.device).into());
        let outputs = Outputs {
            y: y.clone(),
            grads: None,
        };
        write_outputs(o, &outputs, &meta)?;
    }
    let adapters = &case.layer.adapters;
    let dora = adapters.iter().filter(|a| a.is_dora()).count();
    let ranks: Vec<String> = adapters.iter().map(|a| a.rank().to_string()).collect();
    let base_only = case.adapter_index.iter().filter(|&&k| k < 0).count();
    println!(
        "{}: multi-adapter, {} adapters ({dora} DoRA, {} LoRA; ranks {}), T={t} ({base_only} base-only) d_in={d_in} d_out={d_out}, x {}, device {}, forward only{}",
        path.display(),
        adapters.len(),
        adapters.len() - dora,
        ranks.join("/"),
        case.x.dtype(),
        device_name(args.device),
        out.as_ref()
            .map(|o| format!(", outputs -> {}", o.display()))
            .unwrap_or_default()
    );
    if args.exact_grad {
        println!("  --exact-grad does not apply: a multi-adapter case is forward only");
    }
    let mut ok = true;
    match &case.expected_y {
        Some(want) => {
            let err = rel_l2(&y.to_f64(), &want.to_f64());
            let (b, why) = multi_bar(case);
            let pass = err <= b;
            ok &= pass;
            println!(
                "  {:<15} {:<5} rel_err {err:.3e}  bar {b:.3e} ({why})  {}",
                "y",
                y.dtype().name(),
                if pass { "PASS" } else { "FAIL" }
            );
        }
        None => println!("  no expected.y in this case: nothing compared"),
    }
    let yv = y.to_f64();
    let bias: Vec<f64> = match &case.layer.bias {
        Some(b) => b.cast(case.x.dtype()).to_f64(),
        None => vec![0.0; d_out],
    };
    for (k, rows) in case.zero_rows()? {
        let tokens: Vec<usize> = (0..t)
            .filter(|&i| case.adapter_index[i] == k as i32)
            .collect();
        let exact = tokens
            .iter()
            .all(|&i| rows.iter().all(|&j| yv[i * d_out + j] == bias[j]));
        let finite = y.first_non_finite().is_none();
        let pass = exact && finite && !tokens.is_empty();
        ok &= pass;
        let list: Vec<String> = rows.iter().map(usize::to_string).collect();
        println!(
            "  zero rows {} of adapter {k} ({} tokens): y = bias there {exact}, y finite {finite}  {}",
            list.join(","),
            tokens.len(),
            if pass { "PASS" } else { "FAIL" }
        );
    }
    Ok(ok)
}

/// Zero rows (W0_j = 0, B_j = 0, m_j = 0): y must equal the bias there, every output finite.
fn check_zero_rows(case: &LayerCase, outputs: &Outputs, rows: &str) -> Result<bool> {
    let s = case.shape()?;
    let y = outputs.y.to_f64();
    let bias: Vec<f64> = match &case.layer.bias {
        Some(b) => b.cast(case.x.dtype()).to_f64(),
        None => vec![0.0; s.d_out],
    };
    let mut ok = true;
    for j in rows.split(',').filter(|v| !v.trim().is_empty()) {
        let j: usize = j
            .trim()
            .parse()
            .with_context(|| format!("metadata zero_rows {rows:?} is not a list of rows"))?;
        ensure!(
            j < s.d_out,
            "metadata zero_rows: row {j} >= d_out {}",
            s.d_out
        );
        ok &= (0..s.t).all(|t| y[t * s.d_out + j] == bias[j]);
    }
    let finite = named_outputs(outputs)
        .iter()
        .all(|(_, t): &(&str, &Tensor)| t.first_non_finite().is_none());
    println!(
        "  zero rows {rows}: y = bias there {}, outputs finite {}  {}",
        ok,
        finite,
        if ok && finite { "PASS" } else { "FAIL" }
    );
    Ok(ok && finite)
}

/// Runs `dorafuse replay`.
///
/// # Errors
/// Only for argument problems; per-case failures are reported and turn into a non-zero exit.
pub fn run(args: Args) -> Result<ExitCode> {
    let n = args.cases.len();
    let outs: Vec<Option<PathBuf>> = match &args.out {
        Some(o) => out_paths(o, &args.cases)?.into_iter().map(Some).collect(),
        None => vec![None; n],
    };
    let mut all_ok = true;
    for (path, out) in args.cases.iter().zip(outs) {
        match replay_one(&args, path, out) {
            Ok(ok) => all_ok &= ok,
            Err(e) => {
                eprintln!("error: {e:#}");
                all_ok = false;
            }
        }
    }
    if n > 1 {
        println!(
            "{n} cases: {}",
            if all_ok { "all passed" } else { "FAILURES" }
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
