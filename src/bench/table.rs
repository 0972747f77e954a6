//! Tables of a [`Report`], as aligned text for the terminal and as Markdown for the
//! generated sections of BENCHMARKS.md and docs/ ([`crate::markdown`]), both from the same
//! rows (numbers are never typed by hand into a document).

use super::report::{imp, series_label, Report, Row, SERIES};
use super::stats::{fmt_time, Stats};
use crate::formula::{LayerKind, Op};
use crate::layer::Shape;
use crate::markdown::{columns, Table};
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::Path;

/// `met` or `missed`, for a target's figure.
pub fn verdict(met: bool) -> String {
    if met { "met" } else { "missed" }.into()
}

/// `12.3 µs ±4%` (half the p10–p90 spread, relative to the median).
pub fn time_cell(s: &Stats) -> String {
    format!("{} ±{:.0}%", fmt_time(s.median_s), 50.0 * s.rel_spread())
}

/// The median of `a` over that of `b`, when both were measured.
fn over(a: Option<&Row>, b: Option<&Row>) -> Option<f64> {
    Some(a?.time.median_s / b?.time.median_s)
}

/// `1.23×`, or `–` when either side is missing.
fn ratio(a: Option<&Row>, b: Option<&Row>) -> String {
    over(a, b).map_or("–".into(), |v| format!("{v:.2}×"))
}

/// The token counts (`t > 0`) measured at `(d_in, d_out, r)` in rows passing `keep`.
fn tokens_of(rep: &Report, key: (usize, usize, usize), keep: impl Fn(&Row) -> bool) -> Vec<usize> {
    let rows = rep
        .rows
        .iter()
        .filter(|x| (x.d_in, x.d_out, x.r) == key && x.t > 0);
    let set: BTreeSet<usize> = rows.filter(|x| keep(x)).map(|x| x.t).collect();
    set.into_iter().collect()
}

/// The overhead table of one layer operation: a column per implementation present, then
/// fused DoRA over the base layer, over LoRA, and unfused over fused (and PEFT over fused
/// when PEFT's rows were merged in). `None` when no row has this operation.
pub fn overhead_table(rep: &Report, op: Op) -> Option<Table> {
    let has = |im: &str, k: LayerKind| {
        (rep.rows.iter()).any(|r| r.implementation == im && r.kind == k && r.op == op)
    };
    let cols: Vec<(&str, LayerKind)> = SERIES.into_iter().filter(|&(im, k)| has(im, k)).collect();
    if cols.is_empty() {
        return None;
    }
    let mut header = columns("shape (d_in×d_out)|r|T");
    header.extend(cols.iter().map(|&(im, k)| series_label(im, k)));
    header.extend(columns("fused/base|fused/LoRA|unfused/fused"));
    let has_peft = cols.iter().any(|&(im, _)| im.starts_with("peft"));
    if has_peft {
        header.push("PEFT/fused".into());
    }
    let mut rows = Vec::new();
    let keys: BTreeSet<_> = rep.rows.iter().map(|r| (r.d_in, r.d_out, r.r)).collect();
    for key @ (d_in, d_out, r) in keys {
        for t in tokens_of(rep, key, |_| true) {
            let shape = Shape { t, d_in, d_out, r };
            let get = |im: &str, k: LayerKind, op: Op| rep.find(im, k, op, shape);
            if !cols.iter().any(|&(im, k)| get(im, k, op).is_some()) {
                continue;
            }
            let mut cells = vec![format!("{d_in}×{d_out}"), r.to_string(), t.to_string()];
            for &(im, k) in &cols {
                cells.push(get(im, k, op).map_or("–".into(), |r| time_cell(&r.time)));
            }
            let fused = get(imp::DORAFUSE, LayerKind::Dora, op);
            // Inference is compared with the base forward (the base layer caches nothing).
            let base_op = if op == Op::Inference { Op::Forward } else { op };
            let base = get(imp::BASE, LayerKind::Base, base_op)
                .or_else(|| get(imp::PEFT_EAGER, LayerKind::Base, base_op));
            cells.push(ratio(fused, base));
            cells.push(ratio(fused, get(imp::DORAFUSE, LayerKind::Lora, base_op)));
            cells.push(ratio(get(imp::UNFUSED, LayerKind::Dora, op), fused));
            if has_peft {
                let peft = get(imp::PEFT_COMPILE, LayerKind::Dora, op)
                    .or_else(|| get(imp::PEFT_EAGER, LayerKind::Dora, op));
                cells.push(ratio(peft, fused));
            }
            rows.push(cells);
        }
    }
    Some(Table { header, rows })
}

/// `12.3 MiB`, `4.0 KiB`, `0 B`.
fn fmt_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.0}%", 100.0 * v))
}

/// Every DoRA and base row against the ceilings: time, GB/s, TFLOP/s and the fractions of
/// copy bandwidth, GEMM rate and the floor; extra memory where known.
pub fn ceiling_table(rep: &Report) -> Table {
    let header = columns("op|impl|shape|r|T|time|GB/s|TFLOP/s|of copy|of GEMM|of floor|extra mem");
    let mut rows: Vec<&Row> = (rep.rows.iter())
        .filter(|r| r.kind == LayerKind::Dora || r.implementation == imp::BASE)
        .collect();
    rows.sort_by_key(|r| (r.op, r.d_in, r.d_out, r.r, r.t, r.series()));
    let cells = |r: &Row| {
        vec![
            r.op.name().to_string(),
            r.series(),
            format!("{}×{}", r.d_in, r.d_out),
            r.r.to_string(),
            if r.t == 0 {
                "–".into()
            } else {
                r.t.to_string()
            },
            fmt_time(r.time.median_s),
            format!("{:.1}", r.gbps),
            format!("{:.3}", r.tflops),
            pct(r.frac_copy),
            pct(r.frac_gemm),
            pct(r.frac_floor),
            r.extra_mem_bytes.map_or("–".into(), fmt_bytes),
        ]
    };
    let rows = rows.into_iter().map(cells).collect();
    Table { header, rows }
}

/// The CPU path's target: forward + backward of a DoRA layer (`cpu::run`, norm detached) at
/// most this many times the base layer's forward + backward through the GEMM crate (`x·W0ᵀ`
/// and `dz·W0`) plus one read of W0 at the measured copy bandwidth (the least the norm must
/// read).
pub const CPU_TARGET_RATIO: f64 = 1.30;

/// One target against the rows: what, at which shape, the figure (None: not measured), the
/// limit, whether the figure must be at least (else at most) the limit, and whether it is a
/// fraction of the copy bandwidth (else a ratio).
struct Check {
    what: String,
    shape: String,
    figure: Option<f64>,
    limit: f64,
    at_least: bool,
    copy: bool,
}

/// The targets of docs/design.md §5 checked against the rows, one line per target and shape
/// with the figure and met/missed: on a CUDA run the GPU targets (bf16, 4096×4096 and
/// 4096×11008, r = 16), on a CPU run [`CPU_TARGET_RATIO`] at every shape and T measured.
/// `None` for other runs, or when no row has a target's shape.
pub fn targets_table(rep: &Report) -> Option<Table> {
    let (title, checks) = match rep.device.kind.as_str() {
        "cuda" => ("target (bf16, r = 16)", gpu_targets(rep)),
        "cpu" => ("target (CPU path)", cpu_targets(rep)),
        _ => return None,
    };
    let rows: Vec<Vec<String>> = (checks.into_iter())
        .map(|c| {
            let show = |v: f64| match c.copy {
                true => format!("{:.0}% of copy bandwidth", 100.0 * v),
                false => format!("{v:.2}×"),
            };
            let met = |v: f64| {
                if c.at_least {
                    v >= c.limit
                } else {
                    v <= c.limit
                }
            };
            vec![
                c.what,
                c.shape,
                c.figure.map_or("not measured".into(), show),
                c.figure.map_or("–".into(), |v| verdict(met(v))),
            ]
        })
        .collect();
    let header = columns(&format!("{title}|shape|measured|verdict"));
    (!rows.is_empty()).then_some(Table { header, rows })
}

/// [`CPU_TARGET_RATIO`] at every shape and T with a DoRA and a base forward + backward row.
fn cpu_targets(rep: &Report) -> Vec<Check> {
    let rows = rep.rows.iter().filter(|x| {
        (x.implementation.as_str(), x.kind, x.op)
            == (imp::DORAFUSE, LayerKind::Dora, Op::ForwardBackward)
    });
    let ceilings = rep.ceilings.as_ref();
    (rows.filter_map(|dora| {
        let s = dora.shape();
        let base = rep.find(imp::BASE, LayerKind::Base, Op::ForwardBackward, s)?;
        let size = crate::dtype::DType::parse(&dora.dtype).map_or(4, |d| d.size());
        let figure = ceilings.map(|c| {
            let w0_read_s = (s.d_out * s.d_in * size) as f64 / (c.copy_gbps * 1e9);
            dora.time.median_s / (base.time.median_s + w0_read_s)
        });
        Some(Check {
            what: format!(
                "forward+backward ≤ {CPU_TARGET_RATIO:.2}× (base forward+backward + one read of \
                 W0 at copy bandwidth), {} r = {} T = {}",
                dora.dtype, s.r, s.t
            ),
            shape: format!("{}×{}", s.d_in, s.d_out),
            figure,
            limit: CPU_TARGET_RATIO,
            at_least: false,
            copy: false,
        })
    }))
    .collect()
}

/// The GPU targets of docs/design.md §5 (H200-class GPU, bf16, 4096×4096 and 4096×11008,
/// r = 16).
fn gpu_targets(rep: &Report) -> Vec<Check> {
    let mut out = Vec::new();
    for (d_in, d_out) in [(4096, 4096), (4096, 11008)] {
        let r = 16;
        let tokens = tokens_of(rep, (d_in, d_out, r), |x| x.dtype == "bf16");
        let Some(&t_big) = tokens.last() else {
            continue;
        };
        let at = |t: usize| Shape { t, d_in, d_out, r };
        let dora = |op: Op, t: usize| rep.find(imp::DORAFUSE, LayerKind::Dora, op, at(t));
        let base = |op: Op, t: usize| rep.find(imp::BASE, LayerKind::Base, op, at(t));
        // Inference at its worst T; fused over unfused at its worst T ≤ 512.
        let worst_inf = (tokens.iter())
            .filter_map(|&t| Some((over(dora(Op::Inference, t), base(Op::Forward, t))?, t)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let worst_gain = (tokens.iter().filter(|&&t| t <= 512))
            .flat_map(|&t| [Op::Forward, Op::ForwardBackward].map(|op| (op, t)))
            .filter_map(|(op, t)| {
                let unfused = rep.find(imp::UNFUSED, LayerKind::Dora, op, at(t));
                Some((over(unfused, dora(op, t))?, op, t))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        // (target, figure, limit, the figure must be at least the limit, a copy fraction).
        let checks = [
            (
                "norm ≥ 85% of copy bandwidth".to_string(),
                dora(Op::Norm, 0).and_then(|x| x.frac_copy),
                0.85,
                true,
                true,
            ),
            (
                format!("compose ≥ 80% of copy bandwidth (T = {t_big})"),
                dora(Op::Compose, t_big).and_then(|x| x.frac_copy),
                0.80,
                true,
                true,
            ),
            (
                format!("training forward ≤ 1.10× base GEMM (T = {t_big})"),
                over(dora(Op::Forward, t_big), base(Op::Forward, t_big)),
                1.10,
                false,
                false,
            ),
            (
                format!("forward+backward ≤ 1.15× base forward+backward (T = {t_big})"),
                over(
                    dora(Op::ForwardBackward, t_big),
                    base(Op::ForwardBackward, t_big),
                ),
                1.15,
                false,
                false,
            ),
            (
                format!(
                    "inference (cached g) ≤ 1.05× base GEMM (worst T{})",
                    worst_inf.map_or(String::new(), |(_, t)| format!(" = {t}"))
                ),
                worst_inf.map(|x| x.0),
                1.05,
                false,
                false,
            ),
            (
                format!(
                    "fused ≥ 2× faster than unfused at T ≤ 512 (worst{})",
                    worst_gain.map_or(String::new(), |(_, op, t)| format!(
                        ": {} T = {t}",
                        op.name()
                    ))
                ),
                worst_gain.map(|x| x.0),
                2.0,
                true,
                false,
            ),
        ];
        out.extend(
            (checks.into_iter()).map(|(what, figure, limit, at_least, copy)| Check {
                what,
                shape: format!("{d_in}×{d_out}"),
                figure,
                limit,
                at_least,
                copy,
            }),
        );
    }
    out
}

/// The heading lines of a report: device, dtype, date, commit, ceilings, timing, notes.
pub fn preamble(rep: &Report) -> Vec<String> {
    let (d, s) = (&rep.device, &rep.settings);
    let units = match (d.kind.as_str(), d.units) {
        ("cpu", Some(n)) => format!(", {n} cores"),
        (_, Some(n)) => format!(", {n} units"),
        _ => String::new(),
    };
    let dtypes: BTreeSet<&str> = rep.rows.iter().map(|r| r.dtype.as_str()).collect();
    let dtypes = dtypes.into_iter().collect::<Vec<_>>().join("/");
    let commit = rep.git_commit.as_deref().unwrap_or("unknown");
    let mut v = vec![format!(
        "device: {} ({}{units}) · dtype {dtypes} · {} · commit {commit}",
        d.kind, d.name, rep.date
    )];
    v.push(match &rep.ceilings {
        Some(c) => format!(
            "ceilings measured in this run: copy {:.1} GB/s ({}); GEMM {:.3} TFLOP/s {} ({})",
            c.copy_gbps, c.copy_method, c.gemm_tflops, c.gemm_dtype, c.gemm_method
        ),
        None => "no ceilings: fractions of the hardware limit are not given".into(),
    });
    let runs = match (s.min_reps, s.max_reps) {
        (a, b) if a == b => format!("{a}"),
        (a, b) => format!("{a}–{b}"),
    };
    v.push(format!(
        "timing: {}; warm-up {}, {runs} timed runs per row; median ±half the p10–p90 spread; \
         cache: {}",
        s.clock, s.warmup, s.cache_policy
    ));
    v.extend(rep.notes.iter().map(|n| format!("note: {n}")));
    v
}

/// The whole report as terminal text, or as Markdown (no top-level heading; the caller
/// places it).
pub fn render(rep: &Report, markdown: bool) -> String {
    let mut out = String::new();
    for l in preamble(rep) {
        out.push_str(&if markdown {
            format!("- {l}\n")
        } else {
            format!("{l}\n")
        });
    }
    let mut section = |title: &str, t: &Table| {
        out.push_str(&match markdown {
            true => format!("\n**{title}**\n\n{}", t.to_markdown()),
            false => format!("\n{title}\n{}", t.to_text()),
        });
    };
    for (op, title) in [
        (
            Op::Forward,
            "Training forward (norm + base + adapter + scale)",
        ),
        (
            Op::ForwardBackward,
            "Forward + backward (norm detached, as PEFT)",
        ),
        (
            Op::Inference,
            "Inference forward with cached g (compared with the base forward)",
        ),
        (Op::Backward, "Backward alone"),
    ] {
        if let Some(t) = overhead_table(rep, op) {
            section(title, &t);
        }
    }
    if let Some(t) = targets_table(rep) {
        section(
            "Targets (docs/design.md §5; measured on this device, not a timed test)",
            &t,
        );
    }
    let t = ceiling_table(rep);
    section(
        "Against the ceilings (bytes and FLOPs by formula, src/formula.rs)",
        &t,
    );
    out
}

/// Writes `body` as the generated section `dorafuse-bench:<name>` (`cpu`, `cuda`, `serving-cpu`,
/// ...) of the Markdown file at `path`, as [`crate::markdown::write_section`].
///
/// # Errors
/// The file cannot be read or written, or has a broken section.
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    crate::markdown::write_section(path, &format!("dorafuse-bench:{name}"), body)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::report::{Ceilings, DeviceInfo, Settings};
    use crate::dtype::DType;

    /// A CPU report at 64×32, r = 4, T = 1 and 16, with times in ms set so the ratios are
    /// round: fused/base 1.50×, fused/LoRA 1.25×, unfused/fused 2.00×.
    pub(crate) fn report() -> Report {
        let device = DeviceInfo {
            kind: "cpu".into(),
            name: "test CPU".into(),
            units: Some(2),
            memory_bytes: None,
        };
        let settings = Settings {
            clock: "scripted".into(),
            warmup: 1,
            min_reps: 3,
            max_reps: 3,
            budget_s: None,
            cache_policy: "none".into(),
        };
        let ceilings = Ceilings {
            copy_gbps: 10.0,
            copy_method: "memcpy".into(),
            gemm_tflops: 0.1,
            gemm_dtype: "f32".into(),
            gemm_method: "sgemm".into(),
        };
        let mut rep = Report::new(device, settings, Some(ceilings));
        for t in [1, 16] {
            for (im, k, op, ms) in [
                (imp::BASE, LayerKind::Base, Op::Forward, 1.0),
                (imp::DORAFUSE, LayerKind::Lora, Op::Forward, 1.2),
                (imp::UNFUSED, LayerKind::Dora, Op::Forward, 3.0),
                (imp::DORAFUSE, LayerKind::Dora, Op::Forward, 1.5),
                (imp::DORAFUSE, LayerKind::Dora, Op::Inference, 1.1),
            ] {
                let shape = Shape {
                    t,
                    d_in: 64,
                    d_out: 32,
                    r: 4,
                };
                let st = Stats::from_samples(&[ms * 1e-3 * t as f64]).unwrap();
                let row = Row::new(im, k, op, shape, DType::F32, st, rep.ceilings.as_ref());
                rep.rows.push(row.unwrap());
            }
        }
        rep
    }

    #[test]
    fn overhead_ratios_and_both_renderings() {
        let rep = report();
        let t = overhead_table(&rep, Op::Forward).unwrap();
        assert_eq!(t.rows.len(), 2);
        let col = |t: &Table, name: &str| t.header.iter().position(|c| c == name).unwrap();
        assert_eq!(t.rows[0][col(&t, "fused/base")], "1.50×");
        assert_eq!(t.rows[0][col(&t, "fused/LoRA")], "1.25×");
        assert_eq!(t.rows[0][col(&t, "unfused/fused")], "2.00×");
        assert_eq!(t.rows[1][col(&t, "T")], "16");
        // Inference compares with the base forward.
        let t = overhead_table(&rep, Op::Inference).unwrap();
        assert_eq!(t.rows[0][col(&t, "fused/base")], "1.10×");
        assert!(overhead_table(&rep, Op::Backward).is_none());
        let (text, md) = (render(&rep, false), render(&rep, true));
        for needle in [
            "1.50×",
            "2.00×",
            "test CPU",
            "2 cores",
            "Against the ceilings",
        ] {
            assert!(
                text.contains(needle) && md.contains(needle),
                "{needle}:\n{text}\n{md}"
            );
        }
        assert!(md.contains("|---") && !text.contains("|---"), "{md}");
        // The forward table: a title, then header and rows right-aligned to one width.
        let lines: Vec<&str> = text.split("\n\n").nth(1).unwrap().lines().skip(1).collect();
        assert_eq!(lines.len(), 3, "{text}");
        let width = lines[0].chars().count();
        assert!(lines.iter().all(|l| l.chars().count() == width), "{text}");
    }

    #[test]
    fn targets_are_checked_on_cuda_and_cpu_runs() {
        let mut rep = report();
        // A CPU run without forward + backward rows: nothing to check.
        assert!(targets_table(&rep).is_none());
        let mut cpu = rep.clone();
        let shape = cpu.rows[0].shape();
        for (im, k, ms) in [
            (imp::BASE, LayerKind::Base, 2.0),
            (imp::DORAFUSE, LayerKind::Dora, 2.4),
        ] {
            let st = Stats::from_samples(&[ms * 1e-3]).unwrap();
            let op = Op::ForwardBackward;
            let row = Row::new(im, k, op, shape, DType::F32, st, cpu.ceilings.as_ref());
            cpu.rows.push(row.unwrap());
        }
        // 2.4 ms over 2 ms plus 64·32·4 bytes at 10 GB/s (0.8 µs).
        let t = targets_table(&cpu).unwrap();
        assert_eq!(t.rows.len(), 1);
        assert!(t.rows[0][0].contains("T = 1"), "{:?}", t.rows[0]);
        assert_eq!(t.rows[0][1..], ["64×32", "1.20×", "met"]);
        cpu.ceilings = None;
        assert_eq!(targets_table(&cpu).unwrap().rows[0][2], "not measured");
        rep.device.kind = "emu".into();
        assert!(targets_table(&rep).is_none());
        rep.device.kind = "cuda".into();
        // No rows at the target shapes: nothing to say.
        assert!(targets_table(&rep).is_none());
        for (im, k, op, t, s) in [
            (imp::BASE, LayerKind::Base, Op::Forward, 4096, 1.0),
            (imp::DORAFUSE, LayerKind::Dora, Op::Forward, 4096, 1.05),
            (imp::BASE, LayerKind::Base, Op::Forward, 16, 1.0),
            (imp::DORAFUSE, LayerKind::Dora, Op::Inference, 16, 1.2),
            (imp::DORAFUSE, LayerKind::Dora, Op::Inference, 4096, 1.0),
            (imp::UNFUSED, LayerKind::Dora, Op::Forward, 16, 3.0),
            (imp::DORAFUSE, LayerKind::Dora, Op::Forward, 16, 1.0),
        ] {
            let shape = Shape {
                t,
                d_in: 4096,
                d_out: 4096,
                r: 16,
            };
            let st = Stats::from_samples(&[s]).unwrap();
            let row = Row::new(im, k, op, shape, DType::BF16, st, rep.ceilings.as_ref());
            rep.rows.push(row.unwrap());
        }
        let t = targets_table(&rep).unwrap();
        let find = |p: &str| t.rows.iter().find(|r| r[0].starts_with(p)).unwrap().clone();
        assert_eq!(find("training forward")[2..], ["1.05×", "met"]);
        let inf = find("inference");
        assert!(inf[0].contains("T = 16"), "{inf:?}");
        assert_eq!(inf[2..], ["1.20×", "missed"]);
        assert_eq!(find("fused ≥ 2×")[2..], ["3.00×", "met"]);
        assert_eq!(find("norm")[2..], ["not measured", "–"]);
        assert!(render(&rep, true).contains("**Targets"));
    }
}
