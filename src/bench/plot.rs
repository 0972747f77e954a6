//! `dorafuse bench --plot FILE.svg`: time against tokens, one panel per layer shape and rank
//! and per operation (training forward, forward + backward), one line per implementation
//! (base, LoRA, unfused DoRA, fused DoRA, and PEFT's when its rows were merged in). Drawn
//! from a [`Report`], so an old JSON can be plotted again (`--from`).

use super::report::{series_label, Report, SERIES};
use super::stats::fmt_time;
use crate::formula::Op;
use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;

/// A colour per series of [`SERIES`] (fixed, so plots compare across runs).
const COLOURS: [RGBColor; SERIES.len()] = [
    RGBColor(0x44, 0x44, 0x44),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The operations drawn, one panel column each.
const OPS: [Op; 2] = [Op::Forward, Op::ForwardBackward];

/// Draws the report to an SVG file at `path` (written atomically).
///
/// # Errors
/// No forward or forward+backward rows to draw, or the file cannot be written.
pub fn plot_svg(rep: &Report, path: &Path) -> Result<()> {
    let svg = render_svg(rep)?;
    crate::fsutil::write_atomic(path, |f| Ok(f.write_all(svg.as_bytes())?))
}

/// Draws the report as an SVG document.
///
/// # Errors
/// No forward or forward+backward rows to draw, or a drawing error.
pub fn render_svg(rep: &Report) -> Result<String> {
    let mut svg = String::new();
    draw(rep, &mut svg)?;
    Ok(svg)
}

fn draw(rep: &Report, svg: &mut String) -> Result<()> {
    let panels: Vec<(usize, usize, usize)> = rep
        .rows
        .iter()
        .filter(|r| OPS.contains(&r.op) && r.t > 0)
        .map(|r| (r.d_in, r.d_out, r.r))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    ensure!(
        !panels.is_empty(),
        "nothing to plot: the results have no forward or forward_backward rows"
    );
    let ops: Vec<Op> = OPS
        .into_iter()
        .filter(|op| rep.rows.iter().any(|r| r.op == *op))
        .collect();
    let (pw, ph) = (560u32, 380u32);
    let title_h = 40u32;
    let size = (pw * ops.len() as u32, ph * panels.len() as u32 + title_h);
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    let e = |err: DrawingAreaErrorKind<_>| anyhow!("drawing the benchmark plot: {err:?}");
    root.fill(&WHITE).map_err(e)?;
    let (title, body) = root.split_vertically(title_h);
    title
        .draw(&Text::new(
            format!(
                "dorafuse bench · {} ({}) · {} · commit {}",
                rep.device.kind,
                rep.device.name,
                rep.date,
                rep.git_commit.as_deref().unwrap_or("unknown")
            ),
            (10, 12),
            ("sans-serif", 16).into_font(),
        ))
        .map_err(e)?;
    let areas = body.split_evenly((panels.len(), ops.len()));
    for (pi, &(d_in, d_out, r)) in panels.iter().enumerate() {
        for (oi, &op) in ops.iter().enumerate() {
            let area = &areas[pi * ops.len() + oi];
            let rows: Vec<_> = rep
                .rows
                .iter()
                .filter(|x| x.op == op && (x.d_in, x.d_out, x.r) == (d_in, d_out, r) && x.t > 0)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let tmin = rows.iter().map(|x| x.t).min().unwrap_or(1) as f64;
            let tmax = rows.iter().map(|x| x.t).max().unwrap_or(1) as f64;
            let ymin = rows
                .iter()
                .map(|x| x.time.median_s)
                .fold(f64::MAX, f64::min)
                * 1e6;
            let ymax = rows.iter().map(|x| x.time.median_s).fold(0.0, f64::max) * 1e6;
            // Log axes need a non-empty range: widen a single point by a factor of two.
            let (x0, x1) = if tmax > tmin {
                (tmin, tmax)
            } else {
                (tmin / 2.0, tmin * 2.0)
            };
            let (y0, y1) = (ymin / 1.5, ymax * 1.5);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!("{d_in}×{d_out}, r={r}: {}", op.name()),
                    ("sans-serif", 15),
                )
                .margin(8)
                .x_label_area_size(32)
                .y_label_area_size(64)
                .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("tokens T")
                .y_desc("median time")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_labels(8)
                .y_label_formatter(&|us| fmt_time(*us * 1e-6))
                .draw()
                .map_err(e)?;
            for ((im, kind), colour) in SERIES.into_iter().zip(COLOURS) {
                let mut pts: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|x| x.implementation == im && x.kind == kind)
                    .map(|x| (x.t as f64, x.time.median_s * 1e6))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let style = ShapeStyle::from(&colour).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(e)?
                    .label(series_label(im, kind))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                    .map_err(e)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_valid_svg_with_every_series() {
        let rep = crate::bench::table::tests::report();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plot.svg");
        plot_svg(&rep, &p).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(
            s.starts_with("<svg") || s.starts_with("<?xml"),
            "{}",
            &s[..80]
        );
        assert!(s.trim_end().ends_with("</svg>"));
        for label in [
            "base",
            "LoRA",
            "DoRA unfused",
            "DoRA fused",
            "64×32, r=4: forward",
        ] {
            assert!(s.contains(label), "SVG lacks {label:?}");
        }
        // One polyline per series drawn (4 implementations in one panel).
        assert!(s.matches("<polyline").count() >= 4);
    }

    #[test]
    fn refuses_an_empty_report() {
        let mut rep = crate::bench::table::tests::report();
        rep.rows.retain(|r| r.op == Op::Inference);
        let dir = tempfile::tempdir().unwrap();
        let e = plot_svg(&rep, &dir.path().join("x.svg")).unwrap_err();
        assert!(e.to_string().contains("nothing to plot"), "{e}");
    }
}
