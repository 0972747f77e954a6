//! The CPU path's performance target: forward + backward of a DoRA layer beside the GEMM
//! crate alone doing the two big products of the same shape (`x·W0ᵀ` and `dz·W0`, the base
//! layer's forward and backward) plus one pass over W0 (what the norm must at least read).
//! The DoRA layer should stay within 30% of that sum. `cargo bench --bench cpu_target --
//! --write` runs it and writes `docs/cpu-bench.md`.

use super::cpu::{temporaries, CpuPasses, MAX_SETS, ROTATE_BYTES};
use super::formula::Op;
use super::inputs::{random_set, InputSet};
use super::measure::{measure, rotation_sets, HostClock, Phase, Plan};
use super::report::{git_commit, host_cpu, load_average, load_note, utc_now_rfc3339, DeviceInfo};
use super::runner::set_bytes;
use super::stats::{fmt_time, Stats};
use super::table::{time_cell, verdict, Table};
use crate::dtype::DType;
use crate::layer::{GradMode, Shape};
use crate::tensor::Tensor;
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

/// One pass over W0 computing each row's sum of squares into `out`, split over the cores:
/// what the norm must do at least. Eight accumulators per row let the compiler vectorise, so
/// the pass runs at memory speed, as the norm's floor should.
fn w0_pass(w: &[f32], d_in: usize, out: &mut [f32]) {
    let rows_per = out.len().div_ceil(host_cpu().units.unwrap_or(1) as usize);
    std::thread::scope(|sc| {
        for (o, w) in out.chunks_mut(rows_per).zip(w.chunks(rows_per * d_in)) {
            sc.spawn(move || {
                for (o, row) in o.iter_mut().zip(w.chunks(d_in)) {
                    let mut acc = [0f32; 8];
                    let chunks = row.chunks_exact(8);
                    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
                    for c in chunks {
                        for (a, x) in acc.iter_mut().zip(c) {
                            *a += x * x;
                        }
                    }
                    *o = acc.iter().sum::<f32>() + tail;
                }
            });
        }
    });
}

/// Measures the target at `d_in × d_out`, rank `r`, for each T in `tokens`, in f32, the four
/// measurements interleaved round by round over rotated input sets.
///
/// # Errors
/// A failure of the CPU path or a broken clock.
pub fn measure_target(
    (d_in, d_out, r): (usize, usize, usize),
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
    let n_sets = rotation_sets(set_bytes(full, DType::F32), ROTATE_BYTES, MAX_SETS);
    progress(&format!("building {n_sets} input sets of {full}"));
    let sets: Vec<InputSet> = (0..n_sets)
        .map(|k| random_set(full, DType::F32, 500 + k as u64))
        .collect::<Result<_>>()?;
    let mut tmp = temporaries(full);
    let mut sums = vec![0f32; d_out];
    let mut rows = Vec::new();
    for &t in tokens {
        let shape = Shape { t, ..full };
        let cut = |x: &Tensor| {
            let cols = x.shape()[1];
            Tensor::from_bytes(x.dtype(), vec![t, cols], &x.as_bytes()[..t * cols * 4])
        };
        let inputs: Vec<(Tensor, Tensor)> = (sets.iter())
            .map(|s| Ok((cut(&s.x)?, cut(&s.dy)?)))
            .collect::<Result<_>>()?;
        progress(&format!(
            "DoRA forward+backward, x·W0ᵀ, dz·W0 and a W0 pass, {shape}"
        ));
        let st = measure(&mut HostClock, plan, n_sets, 4, |p, k, i| {
            let (set, x, dy) = (&sets[i], &inputs[i].0, &inputs[i].1);
            let passes = &mut CpuPasses {
                set,
                x,
                dy,
                tmp: &mut tmp,
            };
            match (p, k) {
                (Phase::Setup, _) => {}
                (_, 0) => drop(black_box(crate::cpu::run(
                    &set.layer,
                    x,
                    Some(dy),
                    GradMode::Detached,
                )?)),
                (_, 1) => super::unfused::base(passes, shape, Op::Forward)?,
                (_, 2) => super::unfused::base(passes, shape, Op::Backward)?,
                _ => {
                    let w = super::cpu::f32_of(&set.layer.weight);
                    w0_pass(&w, d_in, &mut sums);
                    black_box(&mut sums);
                }
            }
            Ok(())
        })
        .with_context(|| format!("CPU target at {shape}"))?;
        rows.push(TargetRow {
            shape,
            dora: st[0],
            gemm_fwd: st[1],
            gemm_bwd: st[2],
            w0_pass: st[3],
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
    let header = [
        "T",
        "DoRA fwd+bwd (cpu::run)",
        "x·W0ᵀ (GEMM crate)",
        "dz·W0 (GEMM crate)",
        "one pass over W0",
        "reference sum",
        "DoRA / reference",
    ];
    let mut header: Vec<String> = header.iter().map(|s| s.to_string()).collect();
    header.push(format!("target ≤ {TARGET_RATIO:.2}"));
    let rows_md = rows.iter().map(|r| {
        vec![
            r.shape.t.to_string(),
            time_cell(&r.dora),
            time_cell(&r.gemm_fwd),
            time_cell(&r.gemm_bwd),
            time_cell(&r.w0_pass),
            fmt_time(r.reference_s()),
            format!("{:.2}×", r.ratio()),
            verdict(r.ratio() <= TARGET_RATIO),
        ]
    });
    let table = Table {
        header,
        rows: rows_md.collect(),
    };
    let mut out = String::from("# CPU path benchmark\n\n");
    out.push_str(
        "Generated by `cargo bench --bench cpu_target -- --write` (benches/cpu_target.rs); do not \
         edit by hand. Forward + backward (norm detached) of one DoRA layer through the CPU path, \
         beside the GEMM crate (matrixmultiply, the same crate the CPU path uses) alone doing \
         the two big products of the same shape and one pass over W0 (the least the norm must \
         read). The target: DoRA within 30% of that sum.\n\n",
    );
    if let Some(s) = rows.first().map(|r| r.shape) {
        let (i, o, r) = (s.d_in, s.d_out, s.r);
        out.push_str(&format!(
            "- layer: d_in = {i}, d_out = {o}, r = {r}, f32, no bias\n"
        ));
    }
    out.push_str(&format!(
        "- machine: {} ({} cores), {:.1} GiB memory\n- date: {date}\n- commit: {}\n- timing: \
         median of timed runs after warm-up (± half the p10–p90 spread), host clock, the four \
         measurements interleaved round by round, input sets rotated over {} MiB\n\n",
        device.name,
        device.units.unwrap_or(0),
        device.memory_bytes.unwrap_or(0) as f64 / (1u64 << 30) as f64,
        commit.unwrap_or("unknown"),
        ROTATE_BYTES >> 20,
    ));
    out.push_str(&table.to_markdown());
    out
}

/// Runs the target at 4096×4096, r = 16, and returns its Markdown (machine, date and commit
/// of this run, and the load average around it).
///
/// # Errors
/// As [`measure_target`].
pub fn run_target(
    tokens: &[usize],
    plan: &Plan,
    progress: &mut dyn FnMut(&str),
) -> Result<(Vec<TargetRow>, String)> {
    let before = load_average();
    let rows = measure_target((4096, 4096, 16), tokens, plan, progress)?;
    let (date, commit) = (utc_now_rfc3339(), git_commit());
    let mut md = target_markdown(&rows, &host_cpu(), &date, commit.as_deref());
    if let Some(note) = load_note(before) {
        let mut note = note;
        note[..1].make_ascii_uppercase();
        md.push_str(&format!("\n{note}.\n"));
    }
    Ok((rows, md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_target_and_markdown() {
        let rows = measure_target((40, 24, 3), &[1, 5], &Plan::fixed(0, 2), &mut |_| {}).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].shape.t, 5);
        for r in &rows {
            assert!(r.reference_s() > 0.0 && r.ratio() > 0.0);
            assert_eq!(r.dora.runs, 2);
        }
        let md = target_markdown(&rows, &host_cpu(), "2026-01-01T00:00:00Z", Some("abc"));
        assert!(md.contains("d_in = 40, d_out = 24, r = 3"));
        assert!(md.contains("commit: abc"));
        assert!(md.contains("| 5 "), "{md}");
        assert!(md.contains("met") || md.contains("missed"));
        let mut sums = [0f32; 2];
        w0_pass(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, &mut sums);
        assert_eq!(sums, [14.0, 77.0]);
    }
}
