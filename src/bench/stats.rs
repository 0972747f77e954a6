//! Summary statistics of repeated timings: the median and the spread around it.
//!
//! The median, not the mean: one preempted run on a shared machine must not move the
//! figure. The spread is given two ways, both robust: the 10th and 90th percentiles, and
//! the median absolute deviation (MAD). A difference between two rows smaller than their
//! spread is noise.

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// The summary of `runs` timed repetitions of one operation, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Median time.
    pub median_s: f64,
    /// 10th percentile (linear interpolation between order statistics).
    pub p10_s: f64,
    /// 90th percentile.
    pub p90_s: f64,
    /// Median absolute deviation from the median.
    pub mad_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Number of timed runs (after warm-up).
    pub runs: usize,
}

/// The `q`-quantile (0 ≤ q ≤ 1) of sorted samples, interpolating linearly between
/// neighbours (numpy's default "linear" method).
fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

impl Stats {
    /// Summarises timed samples (seconds).
    ///
    /// # Errors
    /// No samples, or a sample that is negative or not finite (a broken clock).
    pub fn from_samples(samples: &[f64]) -> Result<Stats> {
        ensure!(!samples.is_empty(), "no timed runs to summarise");
        ensure!(
            samples.iter().all(|s| s.is_finite() && *s >= 0.0),
            "a timed run gave a negative or non-finite time: {samples:?}"
        );
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let median = quantile_sorted(&sorted, 0.5);
        let mut dev: Vec<f64> = sorted.iter().map(|s| (s - median).abs()).collect();
        dev.sort_by(f64::total_cmp);
        Ok(Stats {
            median_s: median,
            p10_s: quantile_sorted(&sorted, 0.1),
            p90_s: quantile_sorted(&sorted, 0.9),
            mad_s: quantile_sorted(&dev, 0.5),
            min_s: sorted[0],
            runs: sorted.len(),
        })
    }

    /// The spread as a fraction of the median: (p90 − p10) / median.
    pub fn rel_spread(&self) -> f64 {
        if self.median_s > 0.0 {
            (self.p90_s - self.p10_s) / self.median_s
        } else {
            0.0
        }
    }
}

/// Formats seconds with a unit that keeps three significant digits (`12.3 µs`, `4.56 ms`).
pub fn fmt_time(s: f64) -> String {
    let (v, unit) = if s >= 1.0 {
        (s, "s")
    } else if s >= 1e-3 {
        (s * 1e3, "ms")
    } else if s >= 1e-6 {
        (s * 1e6, "µs")
    } else {
        (s * 1e9, "ns")
    };
    if v >= 100.0 {
        format!("{v:.0} {unit}")
    } else if v >= 10.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_quantiles_and_mad() {
        // Out of order on purpose: the summary must sort.
        let s = Stats::from_samples(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(s.median_s, 3.0);
        assert_eq!(s.min_s, 1.0);
        assert!((s.p10_s - 1.4).abs() < 1e-12, "{}", s.p10_s);
        assert!((s.p90_s - 4.6).abs() < 1e-12, "{}", s.p90_s);
        // Deviations 2,2,1,1,0 → median 1.
        assert_eq!(s.mad_s, 1.0);
        assert_eq!(s.runs, 5);
        assert!((s.rel_spread() - 3.2 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn one_outlier_does_not_move_the_median() {
        let s = Stats::from_samples(&[1.0, 1.0, 1.0, 1.0, 1000.0]).unwrap();
        assert_eq!(s.median_s, 1.0);
        assert_eq!(s.mad_s, 0.0);
    }

    #[test]
    fn even_count_interpolates() {
        let s = Stats::from_samples(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median_s, 2.5);
    }

    #[test]
    fn rejects_empty_and_broken_samples() {
        assert!(Stats::from_samples(&[]).is_err());
        assert!(Stats::from_samples(&[1.0, f64::NAN]).is_err());
        assert!(Stats::from_samples(&[-1.0]).is_err());
    }

    #[test]
    fn time_units() {
        assert_eq!(fmt_time(1.5), "1.50 s");
        assert_eq!(fmt_time(0.0123), "12.3 ms");
        assert_eq!(fmt_time(0.000_456), "456 µs");
        assert_eq!(fmt_time(2e-9), "2.00 ns");
    }
}
