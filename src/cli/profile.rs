//! `dorafuse profile`: the kernels' memory figures and grid fill from the emulator's access
//! record (src/profile, docs/profile.md).

use super::Device;
use anyhow::{bail, Context, Result};
use clap::Parser;
use dorafuse::kernels::spec::Tuning;
use dorafuse::layer::Shape;
use dorafuse::markdown::{self, Table};
use dorafuse::profile::{self, Settings};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `dorafuse profile`.
#[derive(Parser, Debug)]
#[command(after_help = "Examples:
  dorafuse profile --device emu
  dorafuse profile --device emu --kernel dora_norm_v2 --json norm.json
  dorafuse profile --device emu --tokens 4096 --kernel dora_compose_bf16
  dorafuse profile --device emu --shape 4096x4096 --tokens 512 --kernel dora_bwd_dz_bf16
  dorafuse profile --device emu --tuning previous --kernel dora_norm_v2_bf16
  dorafuse profile --device emu --markdown kernels/README.md")]
pub struct Args {
    /// Where the kernels run: only `emu` (the access record comes from the emulator).
    #[arg(long, value_enum, default_value = "emu", hide_possible_values = true)]
    device: Device,
    /// Profile only the entry points whose name contains this, or one of its comma-separated
    /// parts (e.g. `dora_norm_v2_bf16` or `dora_shrink_bf16,dora_compose_bf16`).
    #[arg(long)]
    kernel: Option<String>,
    /// The launch configuration of the tuned kernels: `tuned` (the library's) or `previous`
    /// (before tuning; src/kernels/spec.rs `Tuning`).
    #[arg(long, default_value = "tuned", value_parser = ["tuned", "previous"])]
    tuning: String,
    /// Regenerate the generated sections of this Markdown file (kernels/README.md): the
    /// bytes-that-must-move formulas, the launch geometry of the tuned kernels, and their
    /// before/after profile (bf16 and bf16 with f32 adapters, both configurations, at the
    /// shapes given). Replaces the per-kernel table.
    #[arg(long, value_name = "FILE.md")]
    markdown: Option<PathBuf>,
    /// The weight of the norm and merged-weight passes as `D_INxD_OUT` (the bench's
    /// reference layer by default).
    #[arg(long, default_value = "4096x4096")]
    weight_shape: String,
    /// The layer of the forward, backward and multi-adapter calls, `D_INxD_OUT` (their host
    /// GEMMs run in full on the CPU; scaled down from the reference by default).
    #[arg(long, default_value = "1024x1024")]
    shape: String,
    /// Tokens T of the forward, backward and multi-adapter calls.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Adapter rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// The rank for kernels that serve larger ranks only (`dora_tn_r64`).
    #[arg(long, default_value_t = 64)]
    large_rank: usize,
    /// Blocks per launch recorded and run at most (the others are skipped); 0 runs all.
    #[arg(long, default_value_t = 2)]
    max_blocks: u32,
    /// Environment settings for the run, `NAME=VALUE` (repeatable): a launch knob the
    /// kernels read from the environment selects the variant profiled.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Write the profile as JSON (fields: docs/profile.md).
    #[arg(long, value_name = "FILE.json", conflicts_with = "markdown")]
    json: Option<PathBuf>,
}

/// `D_INxD_OUT` given to `flag`.
fn parse_shape(flag: &str, s: &str) -> Result<(usize, usize)> {
    let (i, o) = s
        .split_once('x')
        .with_context(|| format!("{flag} {s:?}: expected D_INxD_OUT, e.g. 4096x4096"))?;
    let p = |v: &str| -> Result<usize> {
        let n: usize = v
            .trim()
            .parse()
            .with_context(|| format!("{flag} {s:?}: {v:?} is not a size"))?;
        anyhow::ensure!(n > 0, "{flag} {s:?}: sizes must be at least 1");
        Ok(n)
    };
    Ok((p(i)?, p(o)?))
}

/// Runs `dorafuse profile`.
pub fn run(args: Args) -> Result<ExitCode> {
    if args.device != Device::Emu {
        bail!("profile: --device emu only (the access record comes from the CPU emulator)");
    }
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: expected NAME=VALUE"))?;
        // Set before any kernel runs, on this (still single-threaded) command.
        std::env::set_var(k, v);
    }
    let (d_in, d_out) = parse_shape("--shape", &args.shape)?;
    let (w_in, w_out) = parse_shape("--weight-shape", &args.weight_shape)?;
    anyhow::ensure!(args.tokens > 0, "--tokens must be at least 1");
    anyhow::ensure!(
        (1..=dorafuse::kernels::spec::MAX_RANK).contains(&args.rank)
            && (1..=dorafuse::kernels::spec::MAX_RANK).contains(&args.large_rank),
        "--rank and --large-rank must be in 1..={}",
        dorafuse::kernels::spec::MAX_RANK
    );
    let settings = Settings {
        weight_shape: Shape {
            t: 1,
            d_in: w_in,
            d_out: w_out,
            r: args.rank,
        },
        shape: Shape {
            t: args.tokens,
            d_in,
            d_out,
            r: args.rank,
        },
        large_rank: args.large_rank,
        kernel: args.kernel.clone(),
        tuning: if args.tuning == "previous" {
            Tuning::Previous
        } else {
            Tuning::Tuned
        },
        max_blocks: args.max_blocks,
        seed: dorafuse::emu::EmuBackend::from_env()?.seed(),
    };
    if let Some(path) = &args.markdown {
        return write_markdown(path, &settings);
    }
    let p = profile::run(&settings, &mut |msg| eprintln!("{msg}"))?;
    for n in &p.notes {
        println!("# {n}");
    }
    print!("{}", profile::kernel_table(&p).to_text());
    if !p.not_launched.is_empty() {
        println!(
            "not launched by any library call (no profile): {}",
            p.not_launched.join(", ")
        );
    }
    println!();
    println!("worst sites (wasted sector bytes, excess shared wavefronts):");
    let mut sites = Table::new("kernel|kind|site|requests|per request|efficiency");
    for k in &p.kernels {
        for s in &k.worst_sites {
            sites.rows.push(vec![
                k.kernel.clone(),
                s.kind.to_string(),
                s.site.clone(),
                s.requests.to_string(),
                format!("{:.2}", s.per_request),
                s.efficiency
                    .map_or("-".into(), |x| format!("{:.1}%", 100.0 * x)),
            ]);
        }
    }
    match sites.rows.is_empty() {
        true => println!("none"),
        false => print!("{}", sites.to_text()),
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&p)?;
        dorafuse::fsutil::write_atomic(path, |f| {
            use std::io::Write;
            f.write_all(text.as_bytes())?;
            f.write_all(b"\n")?;
            Ok(())
        })
        .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `--markdown FILE`: the generated sections (`profile::README_SECTIONS`) rewritten in place.
fn write_markdown(path: &std::path::Path, settings: &Settings) -> Result<ExitCode> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--markdown: reading {}", path.display()))?;
    // Sections checked before the (long) run.
    for name in profile::README_SECTIONS {
        markdown::section(&text, name).with_context(|| format!("--markdown {}", path.display()))?;
    }
    let tuning = profile::tuning_table(settings, &mut |msg| eprintln!("{msg}"))?;
    let tables = [profile::formula::table(), profile::geometry_table(), tuning];
    let mut text = text;
    for (name, table) in profile::README_SECTIONS.into_iter().zip(&tables) {
        text = markdown::replace_section(&text, name, &table.to_markdown())?;
    }
    dorafuse::fsutil::write_atomic(path, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))
        .with_context(|| format!("writing {}", path.display()))?;
    print!("{}", tables[2].to_markdown());
    println!("wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}
