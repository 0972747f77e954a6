//! The one runner: a benchmark set ([`Config`]) on a [`Target`] (the CPU path, or the
//! kernels on a backend), timed row by row from the one row list [`ROWS`] into a [`Report`].

use super::measure::{measure, rotation_sets, Clock, Phase, Plan};
use super::report::{imp, series_label, Ceilings, DeviceInfo, Report, Row, Settings};
use crate::dtype::DType;
use crate::formula::{LayerKind, Op};
use crate::layer::Shape;
use anyhow::{ensure, Context, Result};

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
    /// Operations to time (rows a target lacks are skipped).
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
            plan: Plan::new(5, 20, 100, 0.1),
        }
    }

    /// The CPU default: one 4096×4096 layer (a Llama-7B attention projection) from decode to
    /// a short prefill, r = 16 and 64, f32; about a minute on two cores.
    pub fn default_cpu() -> Config {
        Config {
            shapes: vec![(4096, 4096)],
            tokens: vec![1, 16, 256],
            dtype: DType::F32,
            ops: vec![Op::Norm, Op::Forward, Op::ForwardBackward, Op::Inference],
            plan: Plan::new(1, 3, 30, 0.4),
            ..Config::default_gpu()
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
            plan: Plan::new(1, 2, 3, 1.0),
            ..Config::default_cpu()
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

/// One row of the benchmark: an implementation (see [`imp`]) of an operation on a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpec {
    /// The implementation's JSON name.
    pub implementation: &'static str,
    /// The layer.
    pub kind: LayerKind,
    /// The operation.
    pub op: Op,
}

const fn row(implementation: &'static str, kind: LayerKind, op: Op) -> RowSpec {
    RowSpec {
        implementation,
        kind,
        op,
    }
}

/// Every row, in measuring order: the norm rows once per shape and rank (`t = 0`: the norm
/// does not depend on the tokens), the others once per T. A target measures those it has
/// (the CPU path has no `compose` kernel and no separate backward).
pub const ROWS: [RowSpec; 14] = {
    use LayerKind::{Base, Dora, Lora};
    use Op::*;
    [
        row(imp::UNFUSED, Dora, Norm),
        row(imp::DORAFUSE, Dora, Norm),
        row(imp::BASE, Base, Forward),
        row(imp::DORAFUSE, Lora, Forward),
        row(imp::UNFUSED, Dora, Forward),
        row(imp::DORAFUSE, Dora, Forward),
        row(imp::DORAFUSE, Dora, Compose),
        row(imp::DORAFUSE, Dora, Inference),
        row(imp::BASE, Base, Backward),
        row(imp::DORAFUSE, Dora, Backward),
        row(imp::BASE, Base, ForwardBackward),
        row(imp::DORAFUSE, Lora, ForwardBackward),
        row(imp::UNFUSED, Dora, ForwardBackward),
        row(imp::DORAFUSE, Dora, ForwardBackward),
    ]
};

/// One layer shape and rank on a target, with its rotated input sets made.
pub trait Layer {
    /// Cuts the inputs to their first `t` tokens (`t = 0`: the norm rows follow) and
    /// prepares what the rows of that T read (e.g. a cached g).
    ///
    /// # Errors
    /// A device error.
    fn tokens(&mut self, t: usize) -> Result<()>;

    /// Untimed work before a timed call of `row` on set `i` (the forward before a timed
    /// backward); the default does nothing.
    ///
    /// # Errors
    /// A failure of the work.
    fn setup(&mut self, row: RowSpec, i: usize) -> Result<()> {
        let _ = (row, i);
        Ok(())
    }

    /// One timed call of `row` on input set `i`.
    ///
    /// # Errors
    /// A failure of the implementation.
    fn call(&mut self, row: RowSpec, i: usize) -> Result<()>;

    /// Memory `row` uses beyond its inputs and outputs, bytes, and how that was obtained.
    fn extra_mem(&self, row: RowSpec) -> Option<(u64, String)>;
}

/// What [`Target::with_layer`] hands the layer to.
pub type WithLayer<'f> = &'f mut dyn FnMut(&mut dyn Layer) -> Result<()>;

/// A place the benchmark runs: the CPU path, or the kernels on a backend.
pub trait Target {
    /// Whether this target implements `row`.
    fn has(&self, row: RowSpec) -> bool;

    /// Makes `sets` random input sets of shape `full` (T the largest token count) in
    /// `dtype`, and calls `f` with the layer over them.
    ///
    /// # Errors
    /// Out of memory, or whatever `f` returns.
    fn with_layer(&self, full: Shape, dtype: DType, sets: usize, f: WithLayer) -> Result<()>;
}

/// The machine side of a run: its clock, its measured ceilings and its description.
pub struct Machine<'c> {
    /// The clock (host, synchronize + host, or CUDA events with an L2 flush).
    pub clock: &'c mut dyn Clock,
    /// What runs the rows.
    pub device: DeviceInfo,
    /// Ceilings measured in this run (None on the emulator).
    pub ceilings: Option<Ceilings>,
    /// The input sets of one shape together exceed this many bytes (twice the cache).
    pub rotate_bytes: usize,
    /// At most this many input sets.
    pub max_sets: usize,
    /// How the cache is kept out, for the report.
    pub cache_policy: String,
    /// Caveats for the report.
    pub notes: Vec<String>,
}

/// The rows of `cfg` that `target` measures.
pub fn rows(target: &dyn Target, cfg: &Config) -> Vec<RowSpec> {
    ROWS.into_iter()
        .filter(|r| cfg.ops.contains(&r.op) && target.has(*r))
        .collect()
}

/// Refuses an operation of `cfg` that `target` has no row of (compose or a separate backward
/// on the CPU path), before anything is measured.
///
/// # Errors
/// The first such operation, naming the device kind `kind`.
pub fn check_ops(target: &dyn Target, kind: &str, cfg: &Config) -> Result<()> {
    for op in &cfg.ops {
        let has = ROWS.iter().any(|r| r.op == *op && target.has(*r));
        ensure!(has, "--device {kind} has no {} rows", op.name());
    }
    Ok(())
}

/// How many rows [`run`] measures on a target that has the rows `has` accepts (for a
/// progress bar).
pub fn row_count(cfg: &Config, has: fn(RowSpec) -> bool) -> usize {
    let rows: Vec<RowSpec> = ROWS
        .into_iter()
        .filter(|r| cfg.ops.contains(&r.op) && has(*r))
        .collect();
    let norm = rows.iter().filter(|r| r.op == Op::Norm).count();
    cfg.shapes.len() * cfg.ranks.len() * (norm + (rows.len() - norm) * cfg.tokens.len())
}

/// Bytes of one input set: the layer's weights and the inputs of `s.t` tokens.
pub fn set_bytes(s: Shape, dtype: DType) -> usize {
    dtype.size() * (s.d_out * s.d_in + s.r * (s.d_in + s.d_out) + s.t * (s.d_in + s.d_out))
        + 4 * s.d_out
}

/// Runs `cfg` on `target`: per shape and rank, the norm rows, then the rows of each T, the
/// rows of a group interleaved round by round. `progress` gets a label before each row.
///
/// # Errors
/// A failure in any row, naming it.
pub fn run(
    target: &dyn Target,
    m: Machine<'_>,
    cfg: &Config,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    cfg.validate()?;
    check_ops(target, &m.device.kind, cfg)?;
    let settings = Settings {
        clock: m.clock.describe(),
        warmup: cfg.plan.warmup,
        min_reps: cfg.plan.min_reps,
        max_reps: cfg.plan.max_reps,
        budget_s: cfg.plan.budget_s.is_finite().then_some(cfg.plan.budget_s),
        cache_policy: m.cache_policy,
    };
    let mut report = Report::new(m.device, settings, m.ceilings);
    report.notes.extend(m.notes);
    let (clock, kind, dt) = (m.clock, report.device.kind.clone(), cfg.dtype);
    let rows = rows(target, cfg);
    let t_max = *cfg.tokens.iter().max().expect("validated");
    for &(d_in, d_out) in &cfg.shapes {
        for &r in &cfg.ranks {
            let full = Shape {
                t: t_max,
                d_in,
                d_out,
                r,
            };
            let sets = rotation_sets(set_bytes(full, dt), m.rotate_bytes, m.max_sets);
            let groups = std::iter::once(0).chain(cfg.tokens.iter().copied());
            target
                .with_layer(full, dt, sets, &mut |layer| {
                    for t in groups.clone() {
                        let group: Vec<RowSpec> = (rows.iter().copied())
                            .filter(|r| (r.op == Op::Norm) == (t == 0))
                            .collect();
                        if group.is_empty() {
                            continue;
                        }
                        let shape = Shape { t, ..full };
                        layer.tokens(t)?;
                        for r in &group {
                            let t = if t == 0 {
                                String::new()
                            } else {
                                format!(" T={t}")
                            };
                            progress(&format!(
                                "{kind} {} {} {d_in}x{d_out} r={}{t}",
                                series_label(r.implementation, r.kind),
                                r.op.name(),
                                full.r
                            ));
                        }
                        let stats =
                            measure(&mut *clock, &cfg.plan, sets, group.len(), |p, k, i| {
                                match p {
                                    Phase::Setup => layer.setup(group[k], i),
                                    Phase::Timed => layer.call(group[k], i),
                                }
                                .with_context(|| {
                                    let s = series_label(group[k].implementation, group[k].kind);
                                    format!("{s} {}", group[k].op.name())
                                })
                            })
                            .with_context(|| format!("{kind} rows at {shape}"))?;
                        for (spec, st) in group.iter().zip(stats) {
                            let c = report.ceilings.as_ref();
                            let mut row = Row::new(
                                spec.implementation,
                                spec.kind,
                                spec.op,
                                shape,
                                dt,
                                st,
                                c,
                            )?;
                            if let Some((bytes, source)) = layer.extra_mem(*spec) {
                                row.extra_mem_bytes = Some(bytes);
                                row.extra_mem_source = Some(source);
                            }
                            report.rows.push(row);
                        }
                    }
                    Ok(())
                })
                .with_context(|| format!("{kind} layer {d_in}x{d_out} r={r}"))?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_rows_are_listed_once() {
        for c in [
            Config::default_gpu(),
            Config::default_cpu(),
            Config::default_emu(),
        ] {
            c.validate().unwrap();
        }
        assert_eq!(Config::default_emu().dtype, DType::BF16);
        assert_eq!(Config::default_cpu().ranks, vec![16, 64]);
        for (i, a) in ROWS.iter().enumerate() {
            assert!(!ROWS[i + 1..].contains(a), "{a:?} listed twice");
        }
        let bad = Config {
            tokens: vec![0],
            ..Config::default_cpu()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn every_target_measures_the_rows_it_has() {
        use crate::bench::{cpu, device};
        type Run = fn(&Config, &mut dyn FnMut(&str)) -> Result<Report>;
        type Has = fn(RowSpec) -> bool;
        // (device kind, run, rows it has, rows per T): the CPU path has no compose kernel and
        // no separate backward.
        let targets: [(&str, Run, Has, usize); 2] = [
            ("cpu", cpu::run_cpu, cpu::has, 9),
            ("emu", device::run_emu, device::has, 12),
        ];
        for (kind, run, has, per_t) in targets {
            let ops = Op::ALL
                .into_iter()
                .filter(|op| ROWS.iter().any(|r| r.op == *op && has(*r)));
            let cfg = Config {
                shapes: vec![(33, 19)],
                tokens: vec![1, 7],
                ranks: vec![3],
                dtype: DType::BF16,
                ops: ops.collect(),
                plan: Plan::fixed(0, 2),
            };
            let mut labels = 0;
            // The CPU ceilings are measured on large buffers; this test accepts their cost.
            let rep = run(&cfg, &mut |_| labels += 1).unwrap();
            assert_eq!(rep.device.kind, kind);
            assert_eq!(rep.rows.len(), row_count(&cfg, has));
            assert_eq!(rep.rows.len(), 2 + per_t * 2, "{kind}");
            // A label per row, and one for the CPU ceilings.
            assert_eq!(labels, rep.rows.len() + usize::from(kind == "cpu"));
            for row in &rep.rows {
                assert_eq!(row.time.runs, 2);
                assert!(row.time.median_s > 0.0 && row.bytes > 0.0 && row.flops > 0.0);
                assert_eq!(row.frac_floor.is_some(), kind == "cpu", "{kind}");
            }
            let emu_note = (rep.notes.iter()).any(|n| n.contains("emulator times say nothing"));
            assert_eq!(emu_note, kind == "emu", "{:?}", rep.notes);
        }
        // An operation the CPU path does not have is refused before anything is measured.
        let cfg = Config {
            ops: vec![Op::Forward, Op::Compose],
            ..Config::default_cpu()
        };
        let e = cpu::run_cpu(&cfg, &mut |_| panic!("nothing is measured")).unwrap_err();
        assert!(
            e.to_string().contains("--device cpu has no compose rows"),
            "{e}"
        );
    }
}
