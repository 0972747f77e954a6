//! `dorafuse analyze`: the DoRA paper's Figure 2 over training checkpoints.
//!
//! Liu et al. (ICML 2024, §3.2, eq. 5–6) decompose a weight into magnitude and direction and
//! measure, per module n at training step t, against the pre-trained weight W0:
//!
//! ```text
//! ΔM = (1/k) Σ_j |m_j − ‖W0_j‖|          ΔD = (1/k) Σ_j (1 − cos(W'_j, W0_j))
//! ```
//!
//! The paper normalises columns of a `[d, k]` weight; PEFT normalises the rows of its
//! `[d_out, d_in]` weight (one magnitude per output feature), so here j runs over the
//! k = d_out rows. For a DoRA checkpoint `m` is the trained magnitude vector and
//! `W' = diag(m / ‖W0 + s·B·A‖)·(W0 + s·B·A)`; for plain LoRA `W' = W0 + s·B·A` and
//! `m_j = ‖W'_j‖`. Both are [`crate::adapter::stats::figure2`], the same code as
//! `dorafuse inspect --base`.
//!
//! Per checkpoint, the modules give points (ΔD, ΔM): their Pearson correlation and the
//! least-squares slope of ΔM on ΔD (the line through the paper's scatter, ΔD on the x axis).
//! The paper reports a negative slope for full fine-tuning and DoRA and a positive one for
//! LoRA.

use crate::adapter::stats::figure2;
use crate::adapter::{AdaptedModel, Adapter, ApplyOptions, BaseModel};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// One module at one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleDelta {
    /// Module name.
    pub module: String,
    /// Output rows (the k of the means).
    pub d_out: usize,
    /// ΔM: mean absolute change of the row magnitudes.
    pub delta_m: f64,
    /// ΔD: mean of 1 − cosine between the rows of W' and W0.
    pub delta_d: f64,
}

/// A least-squares fit of ΔM against ΔD over a set of points.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    /// Points.
    pub points: usize,
    /// Pearson correlation of ΔD and ΔM; `None` with fewer than 2 points or no spread.
    pub correlation: Option<f64>,
    /// Slope of ΔM on ΔD (ΔM = slope·ΔD + intercept); `None` when ΔD has no spread.
    pub slope: Option<f64>,
    /// The intercept of that line.
    pub intercept: Option<f64>,
}

impl Fit {
    /// Fits `(ΔD, ΔM)` points.
    pub fn new(points: &[(f64, f64)]) -> Self {
        let n = points.len();
        let none = Self {
            points: n,
            correlation: None,
            slope: None,
            intercept: None,
        };
        if n < 2 {
            return none;
        }
        let nf = n as f64;
        let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
        let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
        let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let syy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        if sxx <= 0.0 {
            return none;
        }
        let slope = sxy / sxx;
        Self {
            points: n,
            correlation: (syy > 0.0).then(|| sxy / (sxx * syy).sqrt()),
            slope: Some(slope),
            intercept: Some(my - slope * mx),
        }
    }
}

/// One checkpoint: every module's ΔM and ΔD, the totals and the fit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointDelta {
    /// The adapter directory.
    pub path: String,
    /// The training step: the trailing number of the directory name (`checkpoint-120` →
    /// 120), else the checkpoint's position (1, 2, …) in its run.
    pub step: u64,
    /// `"DoRA"` or `"LoRA"`.
    pub method: String,
    /// Adapter rank(s), as in the config.
    pub rank: usize,
    /// Per module.
    pub modules: Vec<ModuleDelta>,
    /// ΔM over all rows of all modules (the row-weighted mean of the module values).
    pub total_delta_m: f64,
    /// ΔD over all rows of all modules.
    pub total_delta_d: f64,
    /// ΔM against ΔD across this checkpoint's modules.
    pub fit: Fit,
}

/// A sequence of checkpoints of one training run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    /// A label: the method of its checkpoints (`DoRA`, `LoRA`, or `mixed`).
    pub method: String,
    /// The checkpoints in the order given.
    pub checkpoints: Vec<CheckpointDelta>,
    /// ΔM against ΔD over every (module, checkpoint) point of the run (the paper's panels).
    pub fit: Fit,
}

/// The trailing decimal number of a directory name.
fn trailing_number(dir: &Path) -> Option<u64> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let digits: String = name
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits.parse().ok()
}

/// ΔM and ΔD of every module of one checkpoint against `base`, one base weight at a time.
/// `opts` settles what the files cannot (base tensor names, per-module layout), as for merge.
///
/// # Errors
/// The adapter does not load or does not fit the base (named).
pub fn analyze_checkpoint(
    base: &BaseModel,
    dir: &Path,
    position: usize,
    opts: &ApplyOptions,
) -> Result<CheckpointDelta> {
    let adapter = Adapter::load(dir)?;
    let model = AdaptedModel::with_options(base, &adapter, opts)
        .with_context(|| format!("adapter {} against the base", dir.display()))?;
    let mut modules = Vec::new();
    for name in adapter.modules.keys() {
        let layer = model.layer(name)?;
        let (_, d_out, _) = layer.dims().with_context(|| name.clone())?;
        let (dm, dd, _) = figure2(&layer).with_context(|| name.clone())?;
        modules.push(ModuleDelta {
            module: name.clone(),
            d_out,
            delta_m: dm,
            delta_d: dd,
        });
    }
    let rows: usize = modules.iter().map(|m| m.d_out).sum();
    let wmean = |f: fn(&ModuleDelta) -> f64| {
        modules.iter().map(|m| f(m) * m.d_out as f64).sum::<f64>() / rows.max(1) as f64
    };
    let points: Vec<(f64, f64)> = modules.iter().map(|m| (m.delta_d, m.delta_m)).collect();
    Ok(CheckpointDelta {
        path: dir.display().to_string(),
        step: trailing_number(dir).unwrap_or(position as u64),
        method: if adapter.is_dora() { "DoRA" } else { "LoRA" }.to_string(),
        rank: adapter.config.lora.r,
        total_delta_m: wmean(|m| m.delta_m),
        total_delta_d: wmean(|m| m.delta_d),
        fit: Fit::new(&points),
        modules,
    })
}

/// Analyzes one run's checkpoints, in the order given, each applied with `opts`.
///
/// # Errors
/// As [`analyze_checkpoint`], naming the checkpoint.
pub fn analyze_run(
    base: &BaseModel,
    dirs: &[impl AsRef<Path>],
    opts: &ApplyOptions,
) -> Result<Run> {
    let mut checkpoints = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        checkpoints.push(analyze_checkpoint(base, d.as_ref(), i + 1, opts)?);
    }
    let methods: std::collections::BTreeSet<&str> =
        checkpoints.iter().map(|c| c.method.as_str()).collect();
    let method = if methods.len() == 1 {
        methods.into_iter().next().unwrap_or("LoRA").to_string()
    } else {
        "mixed".to_string()
    };
    let points: Vec<(f64, f64)> = checkpoints
        .iter()
        .flat_map(|c| c.modules.iter().map(|m| (m.delta_d, m.delta_m)))
        .collect();
    Ok(Run {
        method,
        fit: Fit::new(&points),
        checkpoints,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_of_a_line_and_of_noise() {
        let f = Fit::new(&[(1.0, 3.0), (2.0, 1.0), (3.0, -1.0)]);
        assert_eq!(f.slope, Some(-2.0));
        assert_eq!(f.intercept, Some(5.0));
        assert!((f.correlation.unwrap() + 1.0).abs() < 1e-15);
        assert_eq!(Fit::new(&[(1.0, 1.0)]).slope, None);
        assert_eq!(Fit::new(&[(1.0, 1.0), (1.0, 2.0)]).correlation, None);
        // numpy: np.corrcoef([0,1,2,3],[1,3,2,5])[0,1] = 0.8315218406202999
        let f = Fit::new(&[(0.0, 1.0), (1.0, 3.0), (2.0, 2.0), (3.0, 5.0)]);
        assert!((f.correlation.unwrap() - 0.8315218406202999).abs() < 1e-15);
        assert!((f.slope.unwrap() - 1.1).abs() < 1e-15);
    }

    #[test]
    fn step_from_the_directory_name() {
        assert_eq!(
            trailing_number(Path::new("runs/dora/checkpoint-120")),
            Some(120)
        );
        assert_eq!(trailing_number(Path::new("step7")), Some(7));
        assert_eq!(trailing_number(Path::new("final")), None);
    }
}
