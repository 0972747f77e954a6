//! Benchmark sets (which shapes, tokens, ranks, ops) and the CPU runner that turns a set
//! into a [`Report`].

use super::cpu::{self as cb, Workspace};
use super::formula::{LayerKind, Op};
use super::inputs::{random_set, InputSet};
use super::measure::{
    host_llc_bytes, measure, measure_interleaved, rotation_sets, Clock, HostClock, Plan,
};
use super::report::{host_cpu, imp, Ceilings, Report, Row, Settings};
use crate::dtype::DType;
use crate::layer::{GradMode, Shape};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::hint::black_box;

/// What to benchmark.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Layer shapes as `(d_in, d_out)`.
    pub shapes: Vec<(usize, usize)>,
    /// Token counts T.
    pub tokens: Vec<usize>,
    /// Adapter ranks.
    pub ranks: Vec<usize>,
    /// Activation and weight dtype.
    pub dtype: DType,
    /// Operations to time (those an implementation lacks are skipped).
    pub ops: Vec<Op>,
    /// How many runs.
    pub plan: Plan,
}

impl Config {
    /// The GPU default: the Llama-7B/8B projection shapes, decode to prefill, r = 16 and 64,
    /// bf16, every operation: 372 rows, about a minute on an H200 (scripts/gpu-check.sh gives
    /// it 180 s).
    pub fn default_gpu() -> Config {
        Config {
            shapes: vec![(4096, 4096), (4096, 11008), (11008, 4096)],
            tokens: vec![1, 16, 128, 512, 4096],
            ranks: vec![16, 64],
            dtype: DType::BF16,
            ops: Op::ALL.to_vec(),
            plan: Plan {
                warmup: 5,
                min_reps: 20,
                max_reps: 100,
                budget_s: 0.1,
            },
        }
    }

    /// The CPU default: one 4096×4096 layer (a Llama-7B attention projection) from decode to
    /// a short prefill, r = 16 and 64, f32; about a minute on two cores.
    pub fn default_cpu() -> Config {
        Config {
            shapes: vec![(4096, 4096)],
            tokens: vec![1, 16, 256],
            ranks: vec![16, 64],
            dtype: DType::F32,
            ops: vec![Op::Norm, Op::Forward, Op::ForwardBackward, Op::Inference],
            plan: Plan {
                warmup: 1,
                min_reps: 3,
                max_reps: 30,
                budget_s: 0.4,
            },
        }
    }

    /// The emulator default: small shapes only (the emulator runs every GPU thread as a
    /// host fiber, so it is thousands of times slower than a GPU).
    pub fn default_emu() -> Config {
        Config {
            shapes: vec![(256, 256)],
            tokens: vec![1, 16],
            ranks: vec![16],
            dtype: DType::BF16,
            ops: vec![Op::Norm, Op::Forward, Op::ForwardBackward, Op::Inference],
            plan: Plan {
                warmup: 1,
                min_reps: 2,
                max_reps: 3,
                budget_s: 1.0,
            },
        }
    }

    /// Checks the set is non-empty and every size is at least 1.
    ///
    /// # Errors
    /// An empty list or a zero size, naming it.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.shapes.is_empty(), "no shapes to benchmark");
        ensure!(!self.tokens.is_empty(), "no token counts to benchmark");
        ensure!(!self.ranks.is_empty(), "no ranks to benchmark");
        ensure!(!self.ops.is_empty(), "no operations to benchmark");
        for &(i, o) in &self.shapes {
            ensure!(i > 0 && o > 0, "shape {i}x{o}: sizes must be at least 1");
        }
        ensure!(
            self.tokens.iter().all(|&t| t > 0),
            "token counts must be at least 1"
        );
        ensure!(
            self.ranks.iter().all(|&r| r > 0),
            "ranks must be at least 1"
        );
        Ok(())
    }
}

/// Parses `4096x4096,4096x11008` (`d_in`x`d_out`, as docs/design.md §5 lists them).
///
/// # Errors
/// A malformed item, quoting it.
pub fn parse_shapes(s: &str) -> Result<Vec<(usize, usize)>> {
    s.split(',')
        .map(|item| {
            let item = item.trim();
            let (a, b) = item
                .split_once(['x', 'X', '×'])
                .with_context(|| format!("shape {item:?}: expected D_INxD_OUT, e.g. 4096x11008"))?;
            let a: usize = a
                .trim()
                .parse()
                .with_context(|| format!("shape {item:?}: d_in is not a number"))?;
            let b: usize = b
                .trim()
                .parse()
                .with_context(|| format!("shape {item:?}: d_out is not a number"))?;
            ensure!(a > 0 && b > 0, "shape {item:?}: sizes must be at least 1");
            Ok((a, b))
        })
        .collect()
}

/// Parses a comma-separated list of positive integers, naming `what` in errors.
///
/// # Errors
/// A malformed or zero item.
pub fn parse_list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|item| {
            let v: usize = item
                .trim()
                .parse()
                .with_context(|| format!("{what} {item:?} is not a number"))?;
            ensure!(v > 0, "{what} must be at least 1, got {v}");
            Ok(v)
        })
        .collect()
}

/// The (implementation, kind, op) rows the CPU runner measures per shape and T, in order.
/// `Norm` does not depend on T and is measured once per shape and rank (its rows have
/// `t = 0`).
pub fn cpu_rows(ops: &[Op]) -> Vec<(&'static str, LayerKind, Op)> {
    let all = [
        (imp::BASE, LayerKind::Base, Op::Forward),
        (imp::DORAFUSE, LayerKind::Lora, Op::Forward),
        (imp::UNFUSED, LayerKind::Dora, Op::Forward),
        (imp::DORAFUSE, LayerKind::Dora, Op::Forward),
        (imp::DORAFUSE, LayerKind::Dora, Op::Inference),
        (imp::BASE, LayerKind::Base, Op::ForwardBackward),
        (imp::DORAFUSE, LayerKind::Lora, Op::ForwardBackward),
        (imp::UNFUSED, LayerKind::Dora, Op::ForwardBackward),
        (imp::DORAFUSE, LayerKind::Dora, Op::ForwardBackward),
    ];
    all.into_iter()
        .filter(|(_, _, o)| ops.contains(o))
        .collect()
}

/// Number of rows [`run_cpu`] will measure (for a progress bar).
pub fn cpu_row_count(cfg: &Config) -> usize {
    let per_t = cpu_rows(&cfg.ops).len();
    let norm = if cfg.ops.contains(&Op::Norm) { 2 } else { 0 };
    cfg.shapes.len() * cfg.ranks.len() * (norm + per_t * cfg.tokens.len())
}

/// The CPU ceilings: copy bandwidth over 2 × 256 MiB and the GEMM crate's 2048³ sgemm.
///
/// # Errors
/// A broken clock.
pub fn cpu_ceilings() -> Result<Ceilings> {
    let bytes = 256 << 20;
    let bw = cb::copy_bandwidth(bytes, 5)?;
    let n = 2048;
    let rate = cb::sgemm_rate(n, 3)?;
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
    Ok(Ceilings {
        copy_gbps: bw / 1e9,
        copy_method: format!(
            "copy_from_slice of 256 MiB split over {threads} threads, read + write bytes, median of 5"
        ),
        gemm_tflops: rate / 1e12,
        gemm_dtype: "f32".into(),
        gemm_method: format!("matrixmultiply sgemm {n}x{n}x{n}, median of 3"),
    })
}

/// Most bytes of rotated input sets the CPU runner keeps alive.
const CPU_ROTATION_BYTES: usize = 2 << 30;

/// Runs `cfg` on the CPU: the GEMM crate alone (base), dorafuse's CPU path (LoRA and DoRA),
/// and PEFT-style unfused DoRA, each timed with the host clock over rotated input sets.
/// `progress` is called with a label before each row is measured.
///
/// # Errors
/// A failure of any implementation, naming the row.
pub fn run_cpu(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    cfg.validate()?;
    progress("measuring CPU ceilings (copy bandwidth, sgemm)");
    let ceilings = cpu_ceilings()?;
    let llc = host_llc_bytes();
    let clock_desc = HostClock.describe();
    let mut report = Report::new(
        host_cpu(),
        Settings {
            clock: clock_desc,
            warmup: cfg.plan.warmup,
            min_reps: cfg.plan.min_reps,
            max_reps: cfg.plan.max_reps,
            budget_s: cfg.plan.budget_s.is_finite().then_some(cfg.plan.budget_s),
            cache_policy: format!(
                "the rows of each shape and T interleaved round by round; input sets rotated so \
                 together they exceed 2x the {} MiB last-level cache (at most 12 sets, 2 GiB)",
                llc >> 20
            ),
        },
        Some(ceilings.clone()),
    );
    let load_before = load_average();
    report.notes.push(
        "CPU timings: the CPU path and the GEMM crate (matrixmultiply) in f32 arithmetic; \
         they say nothing about GPU speed"
            .into(),
    );
    let rows = cpu_rows(&cfg.ops);
    for &(d_in, d_out) in &cfg.shapes {
        for &r in &cfg.ranks {
            let t_max = *cfg.tokens.iter().max().expect("validated");
            let probe = Shape {
                t: t_max,
                d_in,
                d_out,
                r,
            };
            let set_bytes = layer_bytes(probe, cfg.dtype);
            let n_sets = rotation_sets(set_bytes, llc, 12)
                .min((CPU_ROTATION_BYTES / set_bytes.max(1)).max(1));
            // One layer per set; the inputs of every T are cut from the T_max inputs.
            let mut sets: Vec<InputSet> = (0..n_sets)
                .map(|k| random_set(probe, cfg.dtype, 1000 + k as u64))
                .collect::<Result<_>>()?;
            if cfg.ops.contains(&Op::Norm) {
                for (implementation, kind) in [
                    (imp::UNFUSED, LayerKind::Dora),
                    (imp::DORAFUSE, LayerKind::Dora),
                ] {
                    let shape = Shape { t: 0, ..probe };
                    let label = format!(
                        "cpu {} norm {d_in}x{d_out} r={r}",
                        super::report::series_label(implementation, kind)
                    );
                    progress(&label);
                    let mut ws = Workspace::new(0, d_in, d_out, r);
                    let st = measure(&mut HostClock, &cfg.plan, n_sets, |i| {
                        let s = &sets[i];
                        if implementation == imp::UNFUSED {
                            unfused_norm(s, &mut ws)
                        } else {
                            black_box(crate::cpu::magnitude_scale(&s.layer)?);
                            Ok(())
                        }
                    })
                    .with_context(|| label.clone())?;
                    let mut row = Row::new(
                        implementation,
                        kind,
                        Op::Norm,
                        shape,
                        cfg.dtype,
                        st,
                        Some(&ceilings),
                    )?;
                    if implementation == imp::UNFUSED {
                        row.extra_mem_bytes = Some((8 * d_out * d_in) as u64);
                        row.extra_mem_source =
                            Some("allocated temporaries (B·A and V, f32)".into());
                    }
                    report.rows.push(row);
                }
            }
            // g computed once per set for the cached-g inference rows.
            let gs: Vec<Vec<f32>> = if cfg.ops.contains(&Op::Inference) {
                sets.iter()
                    .map(|s| {
                        crate::cpu::magnitude_scale(&s.layer)
                            .map(|g| g.expect("benchmark layers are DoRA"))
                    })
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            // Only the norm was asked for: no per-T rows.
            let tokens: &[usize] = if rows.is_empty() { &[] } else { &cfg.tokens };
            for &t in tokens {
                let shape = Shape { t, d_in, d_out, r };
                // The first t tokens of each set's T_max inputs; the full ones are put back
                // after this T.
                let full: Vec<(Tensor, Tensor)> = sets
                    .iter_mut()
                    .map(|s| -> Result<(Tensor, Tensor)> {
                        let x = first_tokens(&s.x, t)?;
                        let dy = first_tokens(&s.dy, t)?;
                        Ok((
                            std::mem::replace(&mut s.x, x),
                            std::mem::replace(&mut s.dy, dy),
                        ))
                    })
                    .collect::<Result<_>>()?;
                let mut ws = Workspace::new(t, d_in, d_out, r);
                for &(implementation, kind, op) in &rows {
                    progress(&format!(
                        "cpu {} {} {d_in}x{d_out} r={r} T={t}",
                        super::report::series_label(implementation, kind),
                        op.name()
                    ));
                }
                // All rows of this T interleaved round by round: on a shared machine a load
                // change hits every implementation alike, so their ratios stay meaningful.
                let stats =
                    measure_interleaved(&mut HostClock, &cfg.plan, n_sets, rows.len(), |k, i| {
                        let (implementation, kind, op) = rows[k];
                        cpu_call(implementation, kind, op, &mut sets[i], gs.get(i), &mut ws)
                    })
                    .with_context(|| format!("cpu rows at {shape}"))?;
                for (&(implementation, kind, op), st) in rows.iter().zip(stats) {
                    let mut row = Row::new(
                        implementation,
                        kind,
                        op,
                        shape,
                        cfg.dtype,
                        st,
                        Some(&ceilings),
                    )?;
                    if implementation == imp::UNFUSED {
                        row.extra_mem_bytes = Some(ws.unfused_extra_bytes() as u64);
                        row.extra_mem_source = Some("allocated temporaries (f32)".into());
                    }
                    report.rows.push(row);
                }
                for (s, (x, dy)) in sets.iter_mut().zip(full) {
                    s.x = x;
                    s.dy = dy;
                }
            }
            drop(sets);
        }
    }
    if let (Some(a), Some(b)) = (load_before, load_average()) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        report.notes.push(format!(
            "load average {a:.1} before and {b:.1} after the run on {cores} cores{}",
            if a.max(b) > 0.5 * cores as f64 + 1.0 {
                ": other processes competed for the cores, so spreads are wide and single rows \
                 can be off by tens of percent"
            } else {
                ""
            }
        ));
    }
    Ok(report)
}

/// The 1-minute load average from /proc/loadavg, when readable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes of one rotated set: the layer's weights and the T_max inputs.
fn layer_bytes(s: Shape, dtype: DType) -> usize {
    let e = dtype.size();
    e * (s.d_out * s.d_in + s.r * (s.d_in + s.d_out) + s.t * (s.d_in + s.d_out)) + 4 * s.d_out
}

/// The first `t` rows of a `[T, cols]` tensor.
fn first_tokens(x: &Tensor, t: usize) -> Result<Tensor> {
    let cols = x.shape()[1];
    Tensor::from_bytes(
        x.dtype(),
        vec![t, cols],
        &x.as_bytes()[..t * cols * x.dtype().size()],
    )
}

/// PEFT's norm pass alone: materialise B·A, build V, take row norms and g.
fn unfused_norm(set: &InputSet, ws: &mut Workspace) -> Result<()> {
    let l = &set.layer;
    let (d_in, d_out, r) = l.dims()?;
    let s = l.scaling as f32;
    let w = cb::f32_of(&l.weight);
    let a = cb::f32_of(&l.lora_a);
    let b = cb::f32_of(&l.lora_b);
    let m = cb::f32_of(
        l.magnitude
            .as_ref()
            .context("unfused DoRA needs a magnitude")?,
    );
    cb::sgemm(d_out, r, d_in, 1.0, &b, false, &a, false, 0.0, &mut ws.ba)?;
    for ((v, w), ba) in ws.v.iter_mut().zip(w.iter()).zip(ws.ba.iter()) {
        *v = w + s * ba;
    }
    for j in 0..d_out {
        let n = ws.v[j * d_in..(j + 1) * d_in]
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt();
        ws.n[j] = n;
        ws.g[j] = m[j] / n.max(crate::layer::NORM_EPS as f32);
    }
    black_box(&ws.g);
    Ok(())
}

/// One timed call of one CPU row.
fn cpu_call(
    implementation: &str,
    kind: LayerKind,
    op: Op,
    set: &mut InputSet,
    g: Option<&Vec<f32>>,
    ws: &mut Workspace,
) -> Result<()> {
    match (implementation, kind, op) {
        (imp::BASE, LayerKind::Base, Op::Forward) => {
            black_box(cb::base_forward(set, ws)?);
        }
        (imp::BASE, LayerKind::Base, Op::ForwardBackward) => {
            black_box(cb::base_forward_backward(set, ws)?);
        }
        (imp::UNFUSED, LayerKind::Dora, Op::Forward) => {
            cb::unfused_forward(set, ws)?;
            black_box(cb::unfused_outputs(set, ws, false)?);
        }
        (imp::UNFUSED, LayerKind::Dora, Op::ForwardBackward) => {
            cb::unfused_forward(set, ws)?;
            cb::unfused_backward(set, ws)?;
            black_box(cb::unfused_outputs(set, ws, true)?);
        }
        (imp::DORAFUSE, LayerKind::Lora, op) => {
            // Plain LoRA is the same layer without its magnitude.
            let m = set.layer.magnitude.take();
            let res = match op {
                Op::Forward => crate::cpu::forward(&set.layer, &set.x).map(|y| {
                    black_box(y);
                }),
                Op::ForwardBackward => {
                    crate::cpu::run(&set.layer, &set.x, Some(&set.dy), GradMode::Detached).map(
                        |o| {
                            black_box(o);
                        },
                    )
                }
                _ => Err(anyhow::anyhow!("no CPU LoRA row for {}", op.name())),
            };
            set.layer.magnitude = m;
            res?;
        }
        (imp::DORAFUSE, LayerKind::Dora, Op::Forward) => {
            black_box(crate::cpu::forward(&set.layer, &set.x)?);
        }
        (imp::DORAFUSE, LayerKind::Dora, Op::Inference) => {
            let g = g.context("inference row without a cached g")?;
            black_box(crate::cpu::forward_with_scale(&set.layer, &set.x, Some(g))?);
        }
        (imp::DORAFUSE, LayerKind::Dora, Op::ForwardBackward) => {
            black_box(crate::cpu::run(
                &set.layer,
                &set.x,
                Some(&set.dy),
                GradMode::Detached,
            )?);
        }
        _ => bail!(
            "no CPU implementation of {implementation} {kind:?} {}",
            op.name()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shapes_and_lists() {
        assert_eq!(
            parse_shapes("4096x11008, 8192X28672").unwrap(),
            vec![(4096, 11008), (8192, 28672)]
        );
        assert!(parse_shapes("4096")
            .unwrap_err()
            .to_string()
            .contains("D_INxD_OUT"));
        assert!(parse_shapes("4096x0").is_err());
        assert!(parse_shapes("ax4")
            .unwrap_err()
            .to_string()
            .contains("d_in"));
        assert_eq!(parse_list("1,16, 128", "tokens").unwrap(), vec![1, 16, 128]);
        let e = parse_list("1,x", "tokens").unwrap_err().to_string();
        assert!(e.contains("tokens \"x\""), "{e}");
        assert!(parse_list("0", "ranks").is_err());
    }

    #[test]
    fn defaults_are_valid() {
        for c in [
            Config::default_gpu(),
            Config::default_cpu(),
            Config::default_emu(),
        ] {
            c.validate().unwrap();
        }
        assert_eq!(Config::default_gpu().dtype, DType::BF16);
        assert_eq!(Config::default_gpu().ranks, vec![16, 64]);
    }

    #[test]
    fn tiny_cpu_run_has_every_row_and_consistent_numbers() {
        let cfg = Config {
            shapes: vec![(33, 19)],
            tokens: vec![1, 7],
            ranks: vec![3],
            dtype: DType::BF16,
            ops: vec![Op::Norm, Op::Forward, Op::ForwardBackward, Op::Inference],
            plan: Plan::fixed(1, 2),
        };
        let mut labels = Vec::new();
        // Ceilings are measured on large buffers; this test accepts their cost (~1 s).
        let rep = run_cpu(&cfg, &mut |l| labels.push(l.to_string())).unwrap();
        assert_eq!(rep.rows.len(), cpu_row_count(&cfg));
        assert_eq!(labels.len(), cpu_row_count(&cfg) + 1);
        for row in &rep.rows {
            assert_eq!(row.time.runs, 2);
            assert!(row.time.median_s > 0.0);
            assert!(row.bytes > 0.0 && row.flops > 0.0);
            assert!(row.frac_floor.unwrap() > 0.0);
        }
        let s = Shape {
            t: 7,
            d_in: 33,
            d_out: 19,
            r: 3,
        };
        assert!(rep
            .find(imp::UNFUSED, LayerKind::Dora, Op::ForwardBackward, s)
            .is_some());
        assert!(rep
            .find(
                imp::DORAFUSE,
                LayerKind::Dora,
                Op::Norm,
                Shape { t: 0, ..s }
            )
            .is_some());
        assert_eq!(rep.device.kind, "cpu");
    }
}
