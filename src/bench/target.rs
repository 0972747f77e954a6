//! The CPU path's performance target (issue 2): forward + backward of a DoRA layer beside
//! the GEMM crate alone doing the two big products of the same shape (`x·W0ᵀ` and `dz·W0`)
//! plus one pass over W0 (what the norm must at least read). The DoRA layer should stay
//! within 30% of that sum. `cargo bench --bench cpu_target -- --write` runs it and writes
//! `docs/cpu-bench.md`.

use super::cpu::{sgemm, w0_pass};
use super::inputs::{random_set, InputSet};
use super::measure::{host_llc_bytes, measure_interleaved, rotation_sets, HostClock, Plan};
use super::report::{git_commit, host_cpu, utc_now_rfc3339, DeviceInfo};
use super::stats::{fmt_time, Stats};
use super::table::Table;
use crate::dtype::DType;
use crate::layer::{GradMode, Shape};
use anyhow::{Context, Result};
use std::hint::black_box;

/// The target: DoRA forward + backward at most this many times the reference sum.
pub const TARGET_RATIO: f64 = 1.30;

/// One token count's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRow {
    /// The layer call's shape.
    pub shape: Shape,
    /// `cpu::run` forward + backward (detached), f32.
    pub dora: Stats,
    /// `x·W0ᵀ` through the GEMM crate alone.
    pub gemm_fwd: Stats,
    /// `dz·W0` through the GEMM crate alone.
    pub gemm_bwd: Stats,
    /// One pass over W0 (row sums of squares, all cores).
    pub w0_pass: Stats,
}

impl TargetRow {
    /// The reference: both products plus the W0 pass (medians).
    pub fn reference_s(&self) -> f64 {
        self.gemm_fwd.median_s + self.gemm_bwd.median_s + self.w0_pass.median_s
    }

    /// DoRA's time over the reference.
    pub fn ratio(&self) -> f64 {
        self.dora.median_s / self.reference_s()
    }
}

/// Measures the target at `d_in × d_out`, rank `r`, for each T in `tokens`, in f32, rotating
/// input sets over twice the last-level cache.
///
/// # Errors
/// A failure of the CPU path or a broken clock.
pub fn measure_target(
    d_in: usize,
    d_out: usize,
    r: usize,
    tokens: &[usize],
    plan: &Plan,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<TargetRow>> {
    let t_max = tokens.iter().copied().max().unwrap_or(1);
    let full = Shape {
        t: t_max,
        d_in,
        d_out,
        r,
    };
    let w_bytes = 4 * d_in * d_out;
    let n_sets = rotation_sets(w_bytes, host_llc_bytes(), 12)
        .min((2usize << 30) / w_bytes.max(1))
        .max(1);
    progress(&format!("building {n_sets} input sets of {full}"));
    let sets: Vec<InputSet> = (0..n_sets)
        .map(|k| random_set(full, DType::F32, 500 + k as u64))
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for &t in tokens {
        let shape = Shape { t, ..full };
        let cut = |x: &crate::tensor::Tensor| -> Result<crate::tensor::Tensor> {
            let cols = x.shape()[1];
            crate::tensor::Tensor::from_bytes(
                x.dtype(),
                vec![t, cols],
                &x.as_bytes()[..t * cols * 4],
            )
        };
        let inputs: Vec<(crate::tensor::Tensor, crate::tensor::Tensor)> = sets
            .iter()
            .map(|s| Ok((cut(&s.x)?, cut(&s.dy)?)))
            .collect::<Result<_>>()?;
        progress(&format!(
            "DoRA forward+backward, x·W0ᵀ, dz·W0 and a W0 pass, interleaved, {shape}"
        ));
        let mut c_fwd = vec![0f32; t * d_out];
        let mut c_bwd = vec![0f32; t * d_in];
        let mut sums = vec![0f32; d_out];
        // Interleaved rounds: on a shared machine a load change hits all four alike, so the
        // ratio stays meaningful even when the absolute times move.
        let st = measure_interleaved(&mut HostClock, plan, n_sets, 4, |k, i| {
            let (layer, x, dy) = (&sets[i].layer, &inputs[i].0, &inputs[i].1);
            // Borrowed f32 views: no copy inside the timed region.
            let w = super::cpu::f32_of(&layer.weight);
            match k {
                0 => {
                    black_box(crate::cpu::run(layer, x, Some(dy), GradMode::Detached)?);
                }
                1 => {
                    let x = super::cpu::f32_of(x);
                    sgemm(t, d_in, d_out, 1.0, &x, false, &w, true, 0.0, &mut c_fwd)?;
                    black_box(&mut c_fwd);
                }
                2 => {
                    let dz = super::cpu::f32_of(dy);
                    sgemm(t, d_out, d_in, 1.0, &dz, false, &w, false, 0.0, &mut c_bwd)?;
                    black_box(&mut c_bwd);
                }
                _ => {
                    w0_pass(&sets[i], &mut sums)?;
                    black_box(&mut sums);
                }
            }
            Ok(())
        })
        .with_context(|| format!("CPU target at {shape}"))?;
        let [dora, gemm_fwd, gemm_bwd, w0] = [st[0], st[1], st[2], st[3]];
        rows.push(TargetRow {
            shape,
            dora,
            gemm_fwd,
            gemm_bwd,
            w0_pass: w0,
        });
    }
    Ok(rows)
}

/// The Markdown report of the target: machine, date, commit, a table, the verdict per T.
pub fn target_markdown(
    rows: &[TargetRow],
    device: &DeviceInfo,
    date: &str,
    commit: Option<&str>,
) -> String {
    let mut t = Table {
        header: [
            "T",
            "DoRA fwd+bwd (cpu::run)",
            "x·W0ᵀ (GEMM crate)",
            "dz·W0 (GEMM crate)",
            "one pass over W0",
            "reference sum",
            "DoRA / reference",
            "target ≤ 1.30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        rows: Vec::new(),
    };
    let cell = |s: &Stats| format!("{} ±{:.0}%", fmt_time(s.median_s), 50.0 * s.rel_spread());
    for r in rows {
        t.rows.push(vec![
            r.shape.t.to_string(),
            cell(&r.dora),
            cell(&r.gemm_fwd),
            cell(&r.gemm_bwd),
            cell(&r.w0_pass),
            fmt_time(r.reference_s()),
            format!("{:.2}×", r.ratio()),
            if r.ratio() <= TARGET_RATIO {
                "met"
            } else {
                "missed"
            }
            .to_string(),
        ]);
    }
    let shape = rows.first().map(|r| r.shape);
    let mut out = String::from("# CPU path benchmark (issue 2 target)\n\n");
    out.push_str(
        "Generated by `cargo bench --bench cpu_target -- --write` (benches/cpu_target.rs); do not edit by \
         hand. Forward + backward (norm detached) of one DoRA layer through the CPU path, \
         beside the GEMM crate (matrixmultiply, the same crate the CPU path uses) alone doing \
         the two big products of the same shape and one pass over W0 (the least the norm must \
         read). The target: DoRA within 30% of that sum.\n\n",
    );
    if let Some(s) = shape {
        out.push_str(&format!(
            "- layer: d_in = {}, d_out = {}, r = {}, f32, no bias\n",
            s.d_in, s.d_out, s.r
        ));
    }
    out.push_str(&format!(
        "- machine: {} ({} cores), {:.1} GiB memory\n- date: {date}\n- commit: {}\n- timing: median of timed runs after warm-up (± half the p10–p90 spread), host clock, the four measurements interleaved round by round, input sets rotated over twice the last-level cache\n\n",
        device.name,
        device.units.unwrap_or(0),
        device.memory_bytes.unwrap_or(0) as f64 / (1u64 << 30) as f64,
        commit.unwrap_or("unknown"),
    ));
    out.push_str(&t.to_markdown());
    out
}

/// Runs the target and returns its Markdown (machine, date and commit of this run).
///
/// # Errors
/// As [`measure_target`].
pub fn run_target(
    tokens: &[usize],
    plan: &Plan,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<TargetRow>, String)> {
    let before = super::suite::load_average();
    let rows = measure_target(4096, 4096, 16, tokens, plan, progress)?;
    let mut md = target_markdown(
        &rows,
        &host_cpu(),
        &utc_now_rfc3339(),
        git_commit().as_deref(),
    );
    if let (Some(a), Some(b)) = (before, super::suite::load_average()) {
        let cores = host_cpu().units.unwrap_or(1) as f64;
        md.push_str(&format!(
            "\nLoad average {a:.1} before and {b:.1} after the run on {cores} cores{}.\n",
            if a.max(b) > 0.5 * cores + 1.0 {
                ": other processes competed for the CPU, and the spreads show it"
            } else {
                ""
            }
        ));
    }
    Ok((rows, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_target_and_markdown() {
        let rows = measure_target(40, 24, 3, &[1, 5], &Plan::fixed(0, 2), &mut |_| {}).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].shape.t, 5);
        for r in &rows {
            assert!(r.reference_s() > 0.0 && r.ratio() > 0.0);
            assert_eq!(r.dora.runs, 2);
        }
        let md = target_markdown(&rows, &host_cpu(), "2026-01-01T00:00:00Z", Some("abc"));
        assert!(md.contains("d_in = 40, d_out = 24, r = 3"));
        assert!(md.contains("commit: abc"));
        assert!(md.contains("| 5 |"));
        assert!(md.contains("met") || md.contains("missed"));
    }
}
