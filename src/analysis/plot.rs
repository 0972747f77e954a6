//! `dorafuse analyze --plot FILE.svg`: the DoRA paper's Figure 2 (Liu et al., ICML 2024):
//! one panel per run (e.g. DoRA beside LoRA), ΔD on the x axis and ΔM on the y axis, one
//! point per module and checkpoint, one colour per training step (light to dark as training
//! goes on), and the least-squares line of ΔM on ΔD over the run with its slope and
//! correlation in the panel title.

use super::delta::Run;
use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;
use std::io::Write;
use std::path::Path;

/// Colour of the i-th of n checkpoints: from a light to a dark blue-green (viridis-like
/// endpoints, linear in between).
fn step_colour(i: usize, n: usize) -> RGBColor {
    let t = if n <= 1 {
        1.0
    } else {
        i as f64 / (n - 1) as f64
    };
    let (a, b) = ((0xfd, 0xb4, 0x2f), (0x31, 0x1b, 0x92));
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * t).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |x| format!("{x:.3}"))
}

/// Draws the runs as an SVG document.
///
/// # Errors
/// No run or no point to draw, or a drawing error.
pub fn render_svg(runs: &[Run]) -> Result<String> {
    ensure!(!runs.is_empty(), "nothing to plot: no checkpoints");
    let mut svg = String::new();
    {
        let (pw, ph) = (520u32, 440u32);
        let root =
            SVGBackend::with_string(&mut svg, (pw * runs.len() as u32, ph)).into_drawing_area();
        let e = |err: DrawingAreaErrorKind<_>| anyhow!("drawing the analyze plot: {err:?}");
        root.fill(&WHITE).map_err(e)?;
        let areas = root.split_evenly((1, runs.len()));
        for (run, area) in runs.iter().zip(areas.iter()) {
            let pts: Vec<(f64, f64)> = run
                .checkpoints
                .iter()
                .flat_map(|c| c.modules.iter().map(|m| (m.delta_d, m.delta_m)))
                .collect();
            ensure!(!pts.is_empty(), "nothing to plot: a run has no modules");
            let (x0, x1) = range(pts.iter().map(|p| p.0));
            let (y0, y1) = range(pts.iter().map(|p| p.1));
            let rank = run.checkpoints.first().map_or(0, |c| c.rank);
            let mut chart = ChartBuilder::on(area)
                .caption(
                    format!(
                        "{} (r={rank}): slope {}, corr {}",
                        run.method,
                        fmt_opt(run.fit.slope),
                        fmt_opt(run.fit.correlation)
                    ),
                    ("sans-serif", 15),
                )
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(e)?;
            chart
                .configure_mesh()
                .x_desc("ΔD (mean 1 − cos to W0)")
                .y_desc("ΔM (mean |m − ‖W0‖|)")
                .x_label_formatter(&|v| format!("{v:.1e}"))
                .y_label_formatter(&|v| format!("{v:.1e}"))
                .draw()
                .map_err(e)?;
            let n = run.checkpoints.len();
            for (i, c) in run.checkpoints.iter().enumerate() {
                let colour = step_colour(i, n);
                chart
                    .draw_series(
                        c.modules
                            .iter()
                            .map(|m| Circle::new((m.delta_d, m.delta_m), 4, colour.filled())),
                    )
                    .map_err(e)?
                    .label(format!("step {}", c.step))
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
            }
            if let (Some(s), Some(b)) = (run.fit.slope, run.fit.intercept) {
                chart
                    .draw_series(LineSeries::new(
                        [(x0, s * x0 + b), (x1, s * x1 + b)],
                        ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1),
                    ))
                    .map_err(e)?
                    .label("least squares")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.6)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
        root.present().map_err(e)?;
    }
    Ok(svg)
}

/// An axis range around the values with 8% padding (a single value gets ±8% of itself).
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        lo.abs().max(1e-12) * 0.08
    };
    (lo - pad, hi + pad)
}

/// Draws the runs to an SVG file at `path` (written atomically).
///
/// # Errors
/// As [`render_svg`], or the file cannot be written.
pub fn plot_svg(runs: &[Run], path: &Path) -> Result<()> {
    let svg = render_svg(runs)?;
    crate::fsutil::write_atomic(path, |f| Ok(f.write_all(svg.as_bytes())?))
}
