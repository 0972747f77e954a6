//! The CPU path's target: forward + backward of a 4096×4096, r = 16, f32 DoRA layer
//! at T = 1 and T = 256 beside the GEMM crate alone for `x·W0ᵀ` and `dz·W0` and one pass over
//! W0. Prints the table and writes it, with the machine, date and commit, to
//! `docs/cpu-bench.md` and to the generated `cpu-target` section of README.md when asked with
//! `--write` (generated here; never typed by hand): a plain `cargo bench` leaves the tree alone.
//!
//! `cargo bench --bench cpu_target -- --write` (about a minute on two cores).

use anyhow::Result;
use dorafuse::bench::measure::Plan;
use dorafuse::bench::target::{run_target, TARGET_RATIO};

fn main() -> Result<()> {
    let plan = Plan {
        warmup: 1,
        min_reps: 5,
        max_reps: 30,
        budget_s: 2.0,
    };
    let (rows, md) = run_target(&[1, 256], &plan, &mut |l| eprintln!("… {l}"))?;
    println!("{md}");
    for r in &rows {
        println!(
            "T={}: DoRA / (x·W0ᵀ + dz·W0 + W0 pass) = {:.2} (target ≤ {TARGET_RATIO})",
            r.shape.t,
            r.ratio()
        );
    }
    if !std::env::args().any(|a| a == "--write") {
        println!("(pass --write to update docs/cpu-bench.md and the README section)");
        return Ok(());
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cpu-bench.md");
    std::fs::create_dir_all(path.parent().expect("docs/"))?;
    dorafuse::fsutil::write_atomic(&path, |f| {
        use std::io::Write;
        Ok(f.write_all(md.as_bytes())?)
    })?;
    println!("wrote {}", path.display());
    // The README carries the same figures, without the page title.
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let body: String = md
        .lines()
        .filter(|l| !l.starts_with("# "))
        .collect::<Vec<_>>()
        .join("\n");
    dorafuse::bench::table::write_section(&readme, "cpu-target", body.trim())?;
    println!("wrote the cpu-target section of {}", readme.display());
    Ok(())
}
