//! Tables of a [`Report`]: as aligned text for the terminal and as Markdown for
//! BENCHMARKS.md and docs/, both generated from the same rows (numbers are never typed by
//! hand into a document).

use super::formula::{LayerKind, Op};
use super::report::{imp, series_label, Report, Row};
use super::stats::{fmt_time, Stats};
use crate::layer::Shape;
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

/// A table of text cells; comfy-table lays it out as aligned text or as Markdown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// Column titles.
    pub header: Vec<String>,
    /// Cells, one `Vec` per row, as wide as the header.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn layout(&self, preset: &str) -> String {
        let mut t = comfy_table::Table::new();
        t.load_preset(preset)
            .set_header(&self.header)
            .add_rows(&self.rows);
        // Numbers right-aligned; the first column (a label) left.
        for c in t.column_iter_mut().skip(1) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
        format!("{}\n", t.trim_fmt())
    }

    /// Aligned text, columns apart by spaces.
    pub fn to_text(&self) -> String {
        self.layout(comfy_table::presets::NOTHING)
    }

    /// A GitHub-flavoured Markdown table.
    pub fn to_markdown(&self) -> String {
        self.layout(comfy_table::presets::ASCII_MARKDOWN)
    }
}

/// `met` or `missed`, for a target's figure.
pub fn verdict(met: bool) -> String {
    if met { "met" } else { "missed" }.into()
}

/// The columns of the comparison tables: (implementation, kind), in order.
const COLUMNS: [(&str, LayerKind); 8] = [
    (imp::BASE, LayerKind::Base),
    (imp::PEFT_EAGER, LayerKind::Base),
    (imp::DORAFUSE, LayerKind::Lora),
    (imp::UNFUSED, LayerKind::Dora),
    (imp::DORAFUSE, LayerKind::Dora),
    (imp::PEFT_EAGER, LayerKind::Lora),
    (imp::PEFT_EAGER, LayerKind::Dora),
    (imp::PEFT_COMPILE, LayerKind::Dora),
];

/// `1.23×`, or `–` when either side is missing.
fn ratio(a: Option<&Row>, b: Option<&Row>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.time.median_s > 0.0 => {
            format!("{:.2}×", a.time.median_s / b.time.median_s)
        }
        _ => "–".into(),
    }
}

/// `12.3 µs ±4%` (half the p10–p90 spread, relative to the median).
pub fn time_cell(s: &Stats) -> String {
    format!("{} ±{:.0}%", fmt_time(s.median_s), 50.0 * s.rel_spread())
}

/// `(d_in, d_out, r)` triples present, and T values per triple, in ascending order.
fn layer_shapes(rep: &Report) -> Vec<(usize, usize, usize)> {
    let set: BTreeSet<_> = rep.rows.iter().map(|r| (r.d_in, r.d_out, r.r)).collect();
    set.into_iter().collect()
}

fn tokens_of(rep: &Report, (i, o, r): (usize, usize, usize)) -> Vec<usize> {
    let set: BTreeSet<_> = rep
        .rows
        .iter()
        .filter(|x| (x.d_in, x.d_out, x.r) == (i, o, r) && x.t > 0)
        .map(|x| x.t)
        .collect();
    set.into_iter().collect()
}

/// The overhead table of one layer operation: a column per implementation present, then
/// fused DoRA over the base layer, over LoRA, and unfused over fused. `None` when no row has
/// this operation.
pub fn overhead_table(rep: &Report, op: Op) -> Option<Table> {
    let cols: Vec<(&str, LayerKind)> = COLUMNS
        .into_iter()
        .filter(|&(im, k)| {
            rep.rows
                .iter()
                .any(|r| r.implementation == im && r.kind == k && r.op == op)
        })
        .collect();
    if cols.is_empty() {
        return None;
    }
    let mut header: Vec<String> = vec!["shape (d_in×d_out)".into(), "r".into(), "T".into()];
    header.extend(cols.iter().map(|&(im, k)| series_label(im, k)));
    header.extend(
        ["fused/base", "fused/LoRA", "unfused/fused"]
            .iter()
            .map(|s| s.to_string()),
    );
    let has_peft = cols.iter().any(|&(im, _)| im.starts_with("peft"));
    if has_peft {
        header.push("PEFT/fused".into());
    }
    let mut rows = Vec::new();
    for key @ (i, o, r) in layer_shapes(rep) {
        for t in tokens_of(rep, key) {
            let shape = Shape {
                t,
                d_in: i,
                d_out: o,
                r,
            };
            let get = |im: &str, k: LayerKind, op: Op| rep.find(im, k, op, shape);
            if !cols.iter().any(|&(im, k)| get(im, k, op).is_some()) {
                continue;
            }
            let mut cells = vec![format!("{i}×{o}"), r.to_string(), t.to_string()];
            for &(im, k) in &cols {
                cells.push(get(im, k, op).map_or("–".into(), |r| time_cell(&r.time)));
            }
            let fused = get(imp::DORAFUSE, LayerKind::Dora, op);
            // Inference is compared with the base layer's forward (the base has no cached
            // state, its inference is its forward).
            let base_op = if op == Op::Inference { Op::Forward } else { op };
            let base = get(imp::BASE, LayerKind::Base, base_op)
                .or_else(|| get(imp::PEFT_EAGER, LayerKind::Base, base_op));
            let lora = get(imp::DORAFUSE, LayerKind::Lora, base_op);
            let unfused = get(imp::UNFUSED, LayerKind::Dora, op);
            cells.push(ratio(fused, base));
            cells.push(ratio(fused, lora));
            cells.push(ratio(unfused, fused));
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
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.0}%", 100.0 * v))
}

/// Every dorafuse and unfused DoRA row against the ceilings: time, GB/s, TFLOP/s and the
/// fractions of copy bandwidth, GEMM rate and the floor; extra memory where known.
pub fn ceiling_table(rep: &Report) -> Table {
    let header = [
        "op",
        "impl",
        "shape",
        "r",
        "T",
        "time",
        "GB/s",
        "TFLOP/s",
        "of copy",
        "of GEMM",
        "of floor",
        "extra mem",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rows: Vec<&Row> = rep
        .rows
        .iter()
        .filter(|r| r.kind == LayerKind::Dora || r.implementation == imp::BASE)
        .collect();
    rows.sort_by_key(|r| (r.op, r.d_in, r.d_out, r.r, r.t, r.series()));
    let rows = rows
        .into_iter()
        .map(|r| {
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
        })
        .collect();
    Table { header, rows }
}

/// The GPU targets (docs/design.md §5: H200-class GPU, bf16, 4096×4096 and 4096×11008,
/// r = 16), checked
/// against the rows: one line per target and shape with the figure and met/missed. `None`
/// unless the report is a CUDA run with rows at those shapes.
pub fn targets_table(rep: &Report) -> Option<Table> {
    if rep.device.kind != "cuda" {
        return None;
    }
    let mut rows = Vec::new();
    let dora = |op: Op, s: Shape| rep.find(imp::DORAFUSE, LayerKind::Dora, op, s);
    let ratio_of = |a: Option<&Row>, b: Option<&Row>| match (a, b) {
        (Some(a), Some(b)) => Some(a.time.median_s / b.time.median_s),
        _ => None,
    };
    for (d_in, d_out) in [(4096, 4096), (4096, 11008)] {
        let r = 16;
        let at = |t: usize| Shape { t, d_in, d_out, r };
        let shape = format!("{d_in}×{d_out}");
        let tokens: Vec<usize> = {
            let set: BTreeSet<usize> = rep
                .rows
                .iter()
                .filter(|x| {
                    (x.d_in, x.d_out, x.r) == (d_in, d_out, r) && x.dtype == "bf16" && x.t > 0
                })
                .map(|x| x.t)
                .collect();
            set.into_iter().collect()
        };
        if tokens.is_empty() {
            continue;
        }
        let t_big = *tokens.iter().max().expect("non-empty");
        let mut line = |what: String,
                        fig: Option<f64>,
                        fmt: &dyn Fn(f64) -> String,
                        ok: &dyn Fn(f64) -> bool| {
            rows.push(vec![
                what,
                shape.clone(),
                fig.map_or("not measured".into(), fmt),
                fig.map_or("–".into(), |v| verdict(ok(v))),
            ]);
        };
        let pctf = |v: f64| format!("{:.0}% of copy bandwidth", 100.0 * v);
        let times = |v: f64| format!("{v:.2}×");
        line(
            "norm ≥ 85% of copy bandwidth".into(),
            dora(Op::Norm, at(0)).and_then(|x| x.frac_copy),
            &pctf,
            &|v| v >= 0.85,
        );
        line(
            format!("compose ≥ 80% of copy bandwidth (T = {t_big})"),
            dora(Op::Compose, at(t_big)).and_then(|x| x.frac_copy),
            &pctf,
            &|v| v >= 0.80,
        );
        line(
            format!("training forward ≤ 1.10× base GEMM (T = {t_big})"),
            ratio_of(
                dora(Op::Forward, at(t_big)),
                rep.find(imp::BASE, LayerKind::Base, Op::Forward, at(t_big)),
            ),
            &times,
            &|v| v <= 1.10,
        );
        line(
            format!("forward+backward ≤ 1.15× base forward+backward (T = {t_big})"),
            ratio_of(
                dora(Op::ForwardBackward, at(t_big)),
                rep.find(imp::BASE, LayerKind::Base, Op::ForwardBackward, at(t_big)),
            ),
            &times,
            &|v| v <= 1.15,
        );
        // Inference: the worst T.
        let worst_inf = tokens
            .iter()
            .filter_map(|&t| {
                ratio_of(
                    dora(Op::Inference, at(t)),
                    rep.find(imp::BASE, LayerKind::Base, Op::Forward, at(t)),
                )
                .map(|v| (v, t))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        line(
            format!(
                "inference (cached g) ≤ 1.05× base GEMM (worst T{})",
                worst_inf.map_or(String::new(), |(_, t)| format!(" = {t}"))
            ),
            worst_inf.map(|x| x.0),
            &times,
            &|v| v <= 1.05,
        );
        // Fused over unfused: the worst T ≤ 512, forward and forward+backward.
        let worst_gain = tokens
            .iter()
            .filter(|&&t| t <= 512)
            .flat_map(|&t| [Op::Forward, Op::ForwardBackward].map(move |op| (op, t)))
            .filter_map(|(op, t)| {
                ratio_of(
                    rep.find(imp::UNFUSED, LayerKind::Dora, op, at(t)),
                    dora(op, at(t)),
                )
                .map(|v| (v, op, t))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0));
        line(
            format!(
                "fused ≥ 2× faster than unfused at T ≤ 512 (worst{})",
                worst_gain.map_or(String::new(), |(_, op, t)| format!(
                    ": {} T = {t}",
                    op.name()
                ))
            ),
            worst_gain.map(|x| x.0),
            &times,
            &|v| v >= 2.0,
        );
    }
    if rows.is_empty() {
        return None;
    }
    Some(Table {
        header: ["target (bf16, r = 16)", "shape", "measured", "verdict"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        rows,
    })
}

/// The heading lines of a report: device, dtype, date, commit, ceilings, notes.
pub fn preamble(rep: &Report) -> Vec<String> {
    let units = match (rep.device.kind.as_str(), rep.device.units) {
        ("cpu", Some(n)) => format!(", {n} cores"),
        (_, Some(n)) => format!(", {n} units"),
        _ => String::new(),
    };
    let dtypes: BTreeSet<&str> = rep.rows.iter().map(|r| r.dtype.as_str()).collect();
    let mut v = vec![format!(
        "device: {} ({}{}) · dtype {} · {} · commit {}",
        rep.device.kind,
        rep.device.name,
        units,
        dtypes.into_iter().collect::<Vec<_>>().join("/"),
        rep.date,
        rep.git_commit.as_deref().unwrap_or("unknown"),
    )];
    match &rep.ceilings {
        Some(c) => v.push(format!(
            "ceilings measured in this run: copy {:.1} GB/s ({}); GEMM {:.3} TFLOP/s {} ({})",
            c.copy_gbps, c.copy_method, c.gemm_tflops, c.gemm_dtype, c.gemm_method
        )),
        None => v.push("no ceilings: fractions of the hardware limit are not given".into()),
    }
    v.push(format!(
        "timing: {}; warm-up {}, {}–{} timed runs per row; median ±half the p10–p90 spread; {}",
        rep.settings.clock,
        rep.settings.warmup,
        rep.settings.min_reps,
        rep.settings.max_reps,
        rep.settings.cache_policy
    ));
    for n in &rep.notes {
        v.push(format!("note: {n}"));
    }
    v
}

/// Titles of the layer operations' tables.
fn op_title(op: Op) -> &'static str {
    match op {
        Op::Forward => "Training forward (norm + base + adapter + scale)",
        Op::ForwardBackward => "Forward + backward (norm detached, as PEFT)",
        Op::Inference => "Inference forward with cached g (compared with the base forward)",
        Op::Backward => "Backward alone",
        Op::Norm => "Norm",
        Op::Compose => "Compose",
    }
}

/// The whole report as terminal text.
pub fn render_text(rep: &Report) -> String {
    let mut out = preamble(rep).join("\n");
    out.push('\n');
    for op in [
        Op::Forward,
        Op::ForwardBackward,
        Op::Inference,
        Op::Backward,
    ] {
        if let Some(t) = overhead_table(rep, op) {
            out.push_str(&format!("\n{}\n", op_title(op)));
            out.push_str(&t.to_text());
        }
    }
    if let Some(t) = targets_table(rep) {
        out.push_str("\nTargets\n");
        out.push_str(&t.to_text());
    }
    out.push_str("\nAgainst the ceilings (bytes and FLOPs by formula, src/bench/formula.rs)\n");
    out.push_str(&ceiling_table(rep).to_text());
    out
}

/// The whole report as Markdown (no top-level heading; the caller places it).
pub fn render_markdown(rep: &Report) -> String {
    let mut out = String::new();
    for l in preamble(rep) {
        out.push_str(&format!("- {l}\n"));
    }
    for op in [
        Op::Forward,
        Op::ForwardBackward,
        Op::Inference,
        Op::Backward,
    ] {
        if let Some(t) = overhead_table(rep, op) {
            out.push_str(&format!("\n**{}**\n\n", op_title(op)));
            out.push_str(&t.to_markdown());
        }
    }
    if let Some(t) = targets_table(rep) {
        out.push_str(
            "\n**Targets** (docs/design.md §5; measured on this device, not a timed test)\n\n",
        );
        out.push_str(&t.to_markdown());
    }
    out.push_str(
        "\n**Against the ceilings** (bytes and FLOPs by formula, `src/bench/formula.rs`)\n\n",
    );
    out.push_str(&ceiling_table(rep).to_markdown());
    out
}

/// The markers around a generated section named `name` in a Markdown file.
pub fn section_markers(name: &str) -> (String, String) {
    (
        format!("<!-- dorafuse-bench:{name}:begin (generated; do not edit by hand) -->"),
        format!("<!-- dorafuse-bench:{name}:end -->"),
    )
}

/// Replaces the generated section `name` of `doc` with `body`, or appends it when `doc` has
/// no such section. Text outside the markers is kept byte for byte.
///
/// # Errors
/// A begin marker without its end marker.
pub fn replace_section(doc: &str, name: &str, body: &str) -> Result<String> {
    let (begin, end) = section_markers(name);
    let block = format!("{begin}\n{}\n{end}", body.trim_end());
    match doc.find(&begin) {
        Some(b) => {
            let e = doc[b..]
                .find(&end)
                .with_context(|| format!("section {name:?}: begin marker without end marker"))?
                + b;
            Ok(format!("{}{block}{}", &doc[..b], &doc[e + end.len()..]))
        }
        None => {
            let sep = if doc.is_empty() || doc.ends_with("\n\n") {
                ""
            } else if doc.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            Ok(format!("{doc}{sep}{block}\n"))
        }
    }
}

/// Writes `body` as the generated section `name` of the Markdown file at `path` (created when
/// missing), atomically.
///
/// # Errors
/// The file cannot be read or written, or has a broken section.
pub fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = replace_section(&doc, name, body).with_context(|| path.display().to_string())?;
    crate::fsutil::write_atomic(path, |f| Ok(f.write_all(new.as_bytes())?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::report::{Ceilings, DeviceInfo, Settings};
    use crate::bench::stats::Stats;
    use crate::dtype::DType;

    pub(crate) fn report() -> Report {
        let mut rep = Report::new(
            DeviceInfo {
                kind: "cpu".into(),
                name: "test CPU".into(),
                units: Some(2),
                memory_bytes: None,
            },
            Settings {
                clock: "scripted".into(),
                warmup: 1,
                min_reps: 3,
                max_reps: 3,
                budget_s: None,
                cache_policy: "none".into(),
            },
            Some(Ceilings {
                copy_gbps: 10.0,
                copy_method: "m".into(),
                gemm_tflops: 0.1,
                gemm_dtype: "f32".into(),
                gemm_method: "g".into(),
            }),
        );
        let s = |ms: f64| Stats::from_samples(&[ms * 1e-3]).unwrap();
        for t in [1, 16] {
            let shape = Shape {
                t,
                d_in: 64,
                d_out: 32,
                r: 4,
            };
            for (im, k, op, ms) in [
                (imp::BASE, LayerKind::Base, Op::Forward, 1.0),
                (imp::DORAFUSE, LayerKind::Lora, Op::Forward, 1.2),
                (imp::UNFUSED, LayerKind::Dora, Op::Forward, 3.0),
                (imp::DORAFUSE, LayerKind::Dora, Op::Forward, 1.5),
                (imp::DORAFUSE, LayerKind::Dora, Op::Inference, 1.1),
            ] {
                let row = Row::new(
                    im,
                    k,
                    op,
                    shape,
                    DType::F32,
                    s(ms * t as f64),
                    rep.ceilings.as_ref(),
                );
                rep.rows.push(row.unwrap());
            }
        }
        rep
    }

    #[test]
    fn overhead_ratios() {
        let rep = report();
        let t = overhead_table(&rep, Op::Forward).unwrap();
        assert_eq!(t.rows.len(), 2);
        let h = &t.header;
        let col = |name: &str| h.iter().position(|c| c == name).unwrap();
        assert_eq!(t.rows[0][col("fused/base")], "1.50×");
        assert_eq!(t.rows[0][col("fused/LoRA")], "1.25×");
        assert_eq!(t.rows[0][col("unfused/fused")], "2.00×");
        assert_eq!(t.rows[1][col("T")], "16");
        // Inference compares with the base forward.
        let t = overhead_table(&rep, Op::Inference).unwrap();
        assert_eq!(
            t.rows[0][t.header.iter().position(|c| c == "fused/base").unwrap()],
            "1.10×"
        );
        assert!(overhead_table(&rep, Op::Backward).is_none());
    }

    #[test]
    fn text_and_markdown_carry_the_same_numbers() {
        let rep = report();
        let text = render_text(&rep);
        let md = render_markdown(&rep);
        for needle in ["1.50×", "2.00×", "test CPU", "2 cores"] {
            assert!(text.contains(needle), "text lacks {needle}:\n{text}");
            assert!(md.contains(needle), "markdown lacks {needle}:\n{md}");
        }
        assert!(md.contains("|---"), "{md}");
    }

    #[test]
    fn sections_are_replaced_in_place() {
        let doc = "# Title\n\nhand-written intro\n";
        let once = replace_section(doc, "cpu", "table 1").unwrap();
        assert!(once.starts_with(doc));
        assert!(once.contains("table 1"));
        let twice = replace_section(&once, "cpu", "table 2").unwrap();
        assert!(!twice.contains("table 1") && twice.contains("table 2"));
        assert!(twice.starts_with(doc));
        // Another section is left alone.
        let both = replace_section(&twice, "cuda", "gpu").unwrap();
        let again = replace_section(&both, "cpu", "table 3").unwrap();
        assert!(again.contains("gpu") && again.contains("table 3"));
        let (b, _) = section_markers("x");
        assert!(replace_section(&format!("{b}\nno end"), "x", "y").is_err());
    }

    #[test]
    fn write_section_creates_and_updates_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("B.md");
        write_section(&p, "cpu", "one").unwrap();
        write_section(&p, "cpu", "two").unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.contains("two") && !s.contains("one"), "{s}");
    }

    #[test]
    fn targets_are_checked_on_cuda_runs_only() {
        let mut rep = report();
        assert!(targets_table(&rep).is_none());
        rep.device.kind = "cuda".into();
        // No rows at the target shapes: nothing to say.
        assert!(targets_table(&rep).is_none());
        let st = |s: f64| Stats::from_samples(&[s]).unwrap();
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
            rep.rows.push(
                Row::new(im, k, op, shape, DType::BF16, st(s), rep.ceilings.as_ref()).unwrap(),
            );
        }
        let t = targets_table(&rep).unwrap();
        let find = |prefix: &str| {
            t.rows
                .iter()
                .find(|r| r[0].starts_with(prefix))
                .unwrap()
                .clone()
        };
        assert_eq!(find("training forward")[2], "1.05×");
        assert_eq!(find("training forward")[3], "met");
        let inf = find("inference");
        assert!(inf[0].contains("T = 16"), "{inf:?}");
        assert_eq!((inf[2].as_str(), inf[3].as_str()), ("1.20×", "missed"));
        assert_eq!(find("fused ≥ 2×")[2], "3.00×");
        assert_eq!(find("norm")[2], "not measured");
        assert!(render_markdown(&rep).contains("**Targets**"));
    }

    #[test]
    fn text_table_aligns() {
        let t = Table {
            header: vec!["a".into(), "bb".into()],
            rows: vec![vec!["long".into(), "1".into()]],
        };
        let text = t.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0].chars().count(), lines[1].chars().count(), "{text}");
        assert_eq!(lines[0].find('a'), lines[1].find('l'), "{text}");
        assert!(t.to_markdown().starts_with("| a "), "{}", t.to_markdown());
    }
}
