//! `dorafuse bench`: what DoRA costs over the frozen base layer and over LoRA, and how close
//! each operation runs to the machine's measured ceilings.

use super::Device;
use anyhow::{ensure, Context, Result};
use clap::ValueEnum;
use dorafuse::bench::formula::Op;
use dorafuse::bench::measure::Plan;
use dorafuse::bench::report::Report;
use dorafuse::bench::runner::{self, Config};
use dorafuse::bench::{cpu, device, plot, table};
use dorafuse::dtype::DType;
use dorafuse::{fsutil, markdown};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Arguments of `dorafuse bench`.
#[derive(clap::Args, Debug)]
#[command(after_long_help = AFTER_HELP)]
pub struct Args {
    /// Where to run: `cuda` (the first GPU), `cpu` (the CPU path) or `emu` (the kernels on
    /// the CPU emulator; its times say nothing about GPU speed). Default: cuda when a CUDA
    /// device is usable, else the CPU (and the first line says so).
    #[arg(long, value_enum)]
    device: Option<Device>,
    /// Layer shapes as D_INxD_OUT, comma-separated (e.g. 4096x4096,4096x11008).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = parse_shape)]
    shapes: Vec<(usize, usize)>,
    /// Token counts T, comma-separated (e.g. 1,16,128,512,4096).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = positive)]
    tokens: Vec<usize>,
    /// Adapter ranks, comma-separated (e.g. 16,64).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = positive)]
    ranks: Vec<usize>,
    /// Activation and weight dtype: f32, f16 or bf16 (default: bf16 on a GPU and the
    /// emulator, f32 on the CPU).
    #[arg(long, value_parser = DType::parse)]
    dtype: Option<DType>,
    /// Operations, comma-separated: norm, compose, forward, backward, forward_backward,
    /// inference (default: the device's set).
    #[arg(long, value_name = "LIST", value_delimiter = ',', value_parser = Op::parse)]
    ops: Vec<Op>,
    /// Exactly N timed runs per row (default: adaptive, within a time budget per row).
    #[arg(long, value_name = "N", value_parser = positive)]
    reps: Option<usize>,
    /// Untimed warm-up runs per row.
    #[arg(long, value_name = "N")]
    warmup: Option<usize>,
    /// Write the results as JSON (schema: docs/bench-json.md).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw time against tokens per shape (base, LoRA, unfused and fused DoRA) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Write the tables as a generated section of a Markdown file (e.g. BENCHMARKS.md); the
    /// section is replaced in place on later runs.
    #[arg(long, value_name = "FILE.md")]
    markdown: Option<PathBuf>,
    /// Name of the Markdown section (default: the device kind: cpu, cuda or emu).
    #[arg(long, value_name = "NAME", requires = "markdown")]
    section: Option<String>,
    /// Don't run anything: read results from this JSON (repeat to merge several, e.g. with
    /// benches/peft_bench.py's), then print, plot or write Markdown.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = [
        "device", "shapes", "tokens", "ranks", "dtype", "ops", "reps", "warmup",
    ])]
    from: Vec<PathBuf>,
    /// After running, merge the rows of these JSON files (e.g. PEFT's) into the table,
    /// plot and JSON.
    #[arg(long, value_name = "FILE.json")]
    merge: Vec<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Time the multi-adapter serving rows instead (src/bench/serving.rs): a mixed batch from
    /// an adapter pool against the base GEMM, the same batch as LoRA, and the naive loop. Its
    /// sizes are fixed per device; it takes --device, --reps, --markdown and --section.
    #[arg(long, conflicts_with_all = [
        "shapes", "tokens", "ranks", "dtype", "ops", "warmup", "json", "plot", "from", "merge",
    ])]
    serving: bool,
}

const AFTER_HELP: &str = "\
Rows per shape, rank and T: the base layer alone (cuBLAS / the GEMM crate: the floor), plain \
LoRA and fused DoRA through dorafuse, and unfused DoRA as PEFT performs it (materialised B·A, \
separate norm, scale and add passes) in the same process. Each row: median and spread of many \
timed runs after warm-up, input sets rotated (and L2 flushed on a GPU) so the cache is not \
measured, bytes and FLOPs by formula, achieved GB/s and TFLOP/s, and fractions of the copy \
bandwidth and GEMM rate measured in the same run.

Examples:
  dorafuse bench                                  # representative set on the first GPU (or the CPU)
  dorafuse bench --shapes 4096x11008 --tokens 1,4096 --ranks 16 --json out.json --plot out.svg
  dorafuse bench --device emu                     # the kernels on the emulator (small shapes)
  dorafuse bench --from out.json --merge peft.json --plot both.svg
  dorafuse bench --from out.json --markdown BENCHMARKS.md";

/// The device to run on when none was asked for, and the line that says why.
fn pick_device(asked: Option<Device>) -> (Device, Option<&'static str>) {
    match asked {
        Some(d) => (d, None),
        None if dorafuse::cuda::device_available() && dorafuse::cuda::KERNELS_COMPILED => {
            (Device::Cuda, None)
        }
        None if dorafuse::cuda::device_available() => (
            Device::Cpu,
            Some(
                "CUDA device found but this build has no compiled kernels: running the CPU path; \
                 these are CPU timings",
            ),
        ),
        None => (
            Device::Cpu,
            Some("no CUDA device: running the CPU path; these are CPU timings"),
        ),
    }
}

/// A size of at least 1.
fn positive(s: &str) -> Result<usize> {
    let v: usize = s
        .trim()
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    ensure!(v > 0, "must be at least 1, got {v}");
    Ok(v)
}

/// `4096x11008` (d_in x d_out, as docs/design.md §5 lists them).
fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (a, b) = (s.trim().split_once(['x', 'X', '×']))
        .with_context(|| format!("shape {s:?}: expected D_INxD_OUT, e.g. 4096x11008"))?;
    // clap prints the outermost message only, so the cause goes into it.
    let size =
        |v: &str, what: &str| positive(v).map_err(|e| anyhow::anyhow!("shape {s:?}: {what}: {e}"));
    Ok((size(a, "d_in")?, size(b, "d_out")?))
}

/// The configuration: the device's default set, overridden by the flags.
fn config(args: &Args, device: Device) -> Result<Config> {
    let mut cfg = match device {
        Device::Cuda => Config::default_gpu(),
        Device::Cpu => Config::default_cpu(),
        Device::Emu => Config::default_emu(),
    };
    if !args.shapes.is_empty() {
        cfg.shapes.clone_from(&args.shapes);
    }
    if !args.tokens.is_empty() {
        cfg.tokens.clone_from(&args.tokens);
    }
    if !args.ranks.is_empty() {
        cfg.ranks.clone_from(&args.ranks);
    }
    if !args.ops.is_empty() {
        cfg.ops.clone_from(&args.ops);
    }
    cfg.dtype = args.dtype.unwrap_or(cfg.dtype);
    if let Some(n) = args.reps {
        cfg.plan = Plan::fixed(cfg.plan.warmup, n);
    }
    cfg.plan.warmup = args.warmup.unwrap_or(cfg.plan.warmup);
    cfg.validate()?;
    Ok(cfg)
}

/// `dorafuse bench --serving`: the serving rows, printed and optionally written as the
/// Markdown section `serving-<device>`.
fn serving(args: &Args) -> Result<ExitCode> {
    let (device, why) = pick_device(args.device);
    if let Some(line) = why {
        println!("{line}");
    }
    let value = device.to_possible_value().expect("every device has a name");
    let (text, md) = dorafuse::bench::serving::run(value.get_name(), args.reps)?;
    print!("{text}");
    if let Some(p) = &args.markdown {
        let name = format!("serving-{}", value.get_name());
        write_markdown(p, args.section.as_deref().unwrap_or(&name), &md)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `md` as the generated section `name` of the Markdown file at `path`, headed by the
/// command line that made it.
fn write_markdown(path: &Path, name: &str, md: &str) -> Result<()> {
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let head = format!(
        "Generated by `dorafuse {}`; do not edit by hand.",
        cmd.join(" ")
    );
    table::write_section(path, name, &format!("{head}\n\n{md}"))?;
    println!("wrote section {name:?} of {}", path.display());
    Ok(())
}

/// Refuses, before a run that may take minutes, an output that could not be written: a
/// missing directory or an unwritable file for `--json`, `--plot` and `--markdown`, a plot
/// path that is not `.svg`, and a Markdown file with a broken generated section.
fn check_outputs(args: &Args) -> Result<()> {
    for (flag, path) in [("--json", &args.json), ("--plot", &args.plot)] {
        if let Some(p) = path {
            fsutil::check_writable(p).context(flag)?;
        }
    }
    if let Some(p) = &args.plot {
        let svg = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        ensure!(
            svg,
            "--plot {}: the plot is SVG; give a .svg path",
            p.display()
        );
    }
    if let Some(p) = &args.markdown {
        fsutil::check_writable(p).context("--markdown")?;
        if let Ok(doc) = std::fs::read_to_string(p) {
            markdown::check_sections(&doc)
                .with_context(|| format!("--markdown {}", p.display()))?;
        }
    }
    Ok(())
}

/// Reads `paths` (at least one) and merges them into one report.
fn read_merged(first: Report, paths: &[PathBuf]) -> Result<Report> {
    let mut rep = first;
    for p in paths {
        rep.merge(Report::read(p)?)
            .with_context(|| format!("merging {}", p.display()))?;
    }
    Ok(rep)
}

/// Runs `dorafuse bench`.
pub fn run(args: Args) -> Result<ExitCode> {
    check_outputs(&args)?;
    if args.serving {
        return serving(&args);
    }
    let report = if let Some((first, rest)) = args.from.split_first() {
        read_merged(Report::read(first)?, rest)?
    } else {
        let (device, why) = pick_device(args.device);
        if let Some(line) = why {
            // The first line of output, before anything else.
            println!("{line}");
        }
        if device == Device::Emu {
            println!("emulator: the CUDA kernels run on the CPU emulator; emulator times say nothing about GPU speed");
        }
        let cfg = config(&args, device)?;
        let bar = if args.quiet {
            ProgressBar::hidden()
        } else {
            let total = match device {
                Device::Cpu => runner::row_count(&cfg, cpu::has),
                Device::Cuda | Device::Emu => runner::row_count(&cfg, device::has),
            };
            let b = ProgressBar::new(total as u64 + 1);
            b.set_style(
                ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
                    .expect("static template"),
            );
            b
        };
        let mut progress = |label: &str| {
            bar.set_message(label.to_string());
            bar.inc(1);
        };
        let rep = match device {
            Device::Cpu => cpu::run_cpu(&cfg, &mut progress)?,
            Device::Cuda => dorafuse::bench::cuda::run_cuda(&cfg, &mut progress)?,
            Device::Emu => device::run_emu(&cfg, &mut progress)?,
        };
        bar.finish_and_clear();
        rep
    };
    let report = read_merged(report, &args.merge)?;
    print!("{}", table::render(&report, false));
    if let Some(p) = &args.json {
        report.write(p)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.plot {
        plot::plot_svg(&report, p)?;
        println!("wrote {}", p.display());
    }
    if let Some(p) = &args.markdown {
        let name = args.section.as_deref().unwrap_or(&report.device.kind);
        write_markdown(p, name, &table::render(&report, true))?;
    }
    Ok(ExitCode::SUCCESS)
}
