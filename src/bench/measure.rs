//! The clocks and the timing loop: warm-up, then rounds that run every row of a group once
//! each (interleaved, so a load change on a shared machine hits all rows alike and their
//! ratios stay meaningful), cycling over input sets so the cache is not what is measured.

use super::stats::Stats;
use anyhow::{Context, Result};
use std::time::Instant;

/// Times one run of an operation.
///
/// A CPU clock reads `Instant` around the call; a device clock must make sure the measured
/// interval covers the device work (CUDA events recorded on the stream, or a synchronize on
/// both sides).
pub trait Clock {
    /// Runs `f` once and returns the seconds it took.
    ///
    /// # Errors
    /// Whatever `f` returns, or a device error while timing.
    fn time(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64>;

    /// Called before every timed run, outside the timed region: a device clock flushes the
    /// cache here. The default does nothing.
    ///
    /// # Errors
    /// A device error.
    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }

    /// What this clock measures, for the JSON `settings.clock` field.
    fn describe(&self) -> String;
}

/// Host wall clock around synchronous work (the CPU path).
#[derive(Debug, Default)]
pub struct HostClock;

impl Clock for HostClock {
    fn time(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let t0 = Instant::now();
        f()?;
        Ok(t0.elapsed().as_secs_f64())
    }

    fn describe(&self) -> String {
        "host wall clock (std::time::Instant) around synchronous calls".into()
    }
}

/// Host wall clock with a device synchronize before and after: right for any `Backend`,
/// including the emulator, whose launches run synchronously anyway.
pub struct SyncClock<'a> {
    sync: Box<dyn FnMut() -> Result<()> + 'a>,
}

impl<'a> SyncClock<'a> {
    /// A clock that calls `sync` (the backend's `synchronize`) around each timed run.
    pub fn new(sync: impl FnMut() -> Result<()> + 'a) -> Self {
        SyncClock {
            sync: Box::new(sync),
        }
    }
}

impl Clock for SyncClock<'_> {
    fn time(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        (self.sync)().context("synchronize before a timed run")?;
        let t0 = Instant::now();
        f()?;
        (self.sync)().context("synchronize after a timed run")?;
        Ok(t0.elapsed().as_secs_f64())
    }

    fn describe(&self) -> String {
        "host wall clock between device synchronizes".into()
    }
}

/// How many runs to make.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Untimed rounds first (module load, first-touch page faults, cuBLAS heuristics).
    pub warmup: usize,
    /// Fewest timed runs per row.
    pub min_reps: usize,
    /// Most timed runs per row.
    pub max_reps: usize,
    /// Rounds stop once each row's timed runs have taken this long on average and
    /// `min_reps` are done, seconds.
    pub budget_s: f64,
}

impl Plan {
    /// `warmup` untimed runs, then `min_reps` to `max_reps` timed runs within `budget_s`.
    pub const fn new(warmup: usize, min_reps: usize, max_reps: usize, budget_s: f64) -> Plan {
        Plan {
            warmup,
            min_reps,
            max_reps,
            budget_s,
        }
    }

    /// Exactly `reps` timed runs after `warmup`.
    pub fn fixed(warmup: usize, reps: usize) -> Plan {
        Plan {
            warmup,
            min_reps: reps.max(1),
            max_reps: reps.max(1),
            budget_s: f64::INFINITY,
        }
    }
}

/// Which part of a run [`measure`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Untimed work right before the timed call (e.g. the forward whose saved tensors a
    /// timed backward consumes).
    Setup,
    /// The timed call.
    Timed,
}

/// Times `n_ops` operations interleaved: each round calls `run(phase, k, i)` for every
/// operation `k`, first with [`Phase::Setup`] (untimed), then, after the clock's `prepare`,
/// with [`Phase::Timed`]; `i` is the input set, cycling over `sets`. Warm-up rounds are not
/// counted; timed rounds continue until `min_reps` are done and the average operation has
/// used `budget_s`, or `max_reps` rounds. Returns one summary per operation.
///
/// # Errors
/// The first error of `run` or of the clock, naming the operation and round.
pub fn measure(
    clock: &mut dyn Clock,
    plan: &Plan,
    sets: usize,
    n_ops: usize,
    mut run: impl FnMut(Phase, usize, usize) -> Result<()>,
) -> Result<Vec<Stats>> {
    let sets = sets.max(1);
    let mut samples = vec![Vec::with_capacity(plan.min_reps); n_ops];
    let (mut total, mut round) = (0.0, 0usize);
    while n_ops > 0 && round < plan.warmup + plan.max_reps {
        let timed = round.checked_sub(plan.warmup);
        if timed.is_some_and(|n| n >= plan.min_reps && total >= plan.budget_s) {
            break;
        }
        let what = timed.map_or(format!("warm-up round {round}"), |n| {
            format!("timed round {n}")
        });
        let i = round % sets;
        for (k, v) in samples.iter_mut().enumerate() {
            run(Phase::Setup, k, i).with_context(|| format!("operation {k}, set-up of {what}"))?;
            clock.prepare()?;
            let s = clock
                .time(&mut || run(Phase::Timed, k, i))
                .with_context(|| format!("operation {k}, {what}"))?;
            if timed.is_some() {
                v.push(s);
                total += s / n_ops as f64;
            }
        }
        round += 1;
    }
    samples.iter().map(|v| Stats::from_samples(v)).collect()
}

/// [`measure`] for operations with no untimed set-up: `run(k, i)` is the timed call of
/// operation `k` on input set `i`.
///
/// # Errors
/// As [`measure`].
pub fn measure_timed(
    clock: &mut dyn Clock,
    plan: &Plan,
    sets: usize,
    n_ops: usize,
    mut run: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Stats>> {
    measure(clock, plan, sets, n_ops, |p, k, i| match p {
        Phase::Setup => Ok(()),
        Phase::Timed => run(k, i),
    })
}

/// How a ceiling is measured: `work` (bytes or FLOPs) over the median of `reps` timed runs
/// of `f` after `warmup` untimed ones, per second.
///
/// # Errors
/// Whatever `f` or the clock returns.
pub fn rate(
    clock: &mut dyn Clock,
    (warmup, reps): (usize, usize),
    work: f64,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let st = measure_timed(clock, &Plan::fixed(warmup, reps), 1, 1, |_, _| f())?;
    Ok(work / st[0].median_s)
}

/// How many input sets to cycle so that together they exceed `rotate_bytes` (twice the
/// cache to keep out): `ceil(rotate_bytes / set_bytes)`, at least 1 and at most `max_sets`.
pub fn rotation_sets(set_bytes: usize, rotate_bytes: usize, max_sets: usize) -> usize {
    rotate_bytes
        .div_ceil(set_bytes.max(1))
        .clamp(1, max_sets.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that reports 1, 2, 3, ... seconds, so the bookkeeping is tested without timing.
    #[derive(Default)]
    struct Scripted {
        next: f64,
        prepared: usize,
    }

    impl Clock for Scripted {
        fn time(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
            f()?;
            self.next += 1.0;
            Ok(self.next)
        }
        fn prepare(&mut self) -> Result<()> {
            self.prepared += 1;
            Ok(())
        }
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    #[test]
    fn rounds_interleave_cycle_sets_and_skip_warmup() {
        let mut clock = Scripted::default();
        let mut seen = Vec::new();
        let st = measure(&mut clock, &Plan::fixed(1, 3), 2, 2, |p, k, i| {
            seen.push((p == Phase::Timed, k, i));
            Ok(())
        })
        .unwrap();
        let timed: Vec<_> = seen.iter().filter(|s| s.0).map(|s| (s.1, s.2)).collect();
        // A warm-up round on set 0, then three rounds on sets 1, 0, 1.
        let want = [
            (0, 0),
            (1, 0),
            (0, 1),
            (1, 1),
            (0, 0),
            (1, 0),
            (0, 1),
            (1, 1),
        ];
        assert_eq!(timed, want);
        assert_eq!(seen.len(), 16, "a set-up before every run");
        assert_eq!(clock.prepared, 8);
        // Op 0 got times 3, 5, 7; op 1 got 4, 6, 8 (the warm-up took 1 and 2).
        assert_eq!((st[0].median_s, st[1].median_s), (5.0, 6.0));
        assert_eq!(st[0].runs, 3);
    }

    #[test]
    fn budget_stops_after_min_reps_and_errors_name_the_round() {
        let plan = Plan {
            warmup: 0,
            min_reps: 2,
            max_reps: 100,
            budget_s: 5.0,
        };
        // One op taking 1, 2, 3: the total passes 5 after the third round.
        let st = measure(&mut Scripted::default(), &plan, 1, 1, |_, _, _| Ok(())).unwrap();
        assert_eq!(st[0].runs, 3);
        let e = measure(&mut HostClock, &Plan::fixed(1, 3), 1, 1, |p, _, _| {
            anyhow::ensure!(p == Phase::Setup, "kernel fault");
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("warm-up round 0"), "{e:#}");
    }

    #[test]
    fn rotation_covers_the_bytes() {
        assert_eq!(rotation_sets(10 << 20, 64 << 20, 16), 7);
        assert_eq!(rotation_sets(100 << 20, 64 << 20, 16), 1);
        assert_eq!(rotation_sets(1, 64 << 20, 16), 16);
        assert_eq!(rotation_sets(0, 0, 16), 1);
    }
}
