//! The timing loop: warm-up, then many timed runs cycling over several input sets, each run
//! timed on its own so a cache flush can sit between runs outside the timed region.

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
    /// Untimed runs first (module load, first-touch page faults, cuBLAS heuristics).
    pub warmup: usize,
    /// Fewest timed runs.
    pub min_reps: usize,
    /// Most timed runs.
    pub max_reps: usize,
    /// Timed runs stop once they have taken this long in total and `min_reps` are done.
    pub budget_s: f64,
}

impl Plan {
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

/// Times `op` under `plan`: `op(i)` runs on input set `i % sets`, cycling so that consecutive
/// runs touch different memory (the cache is not what is measured).
///
/// # Errors
/// The first error of `op` or of the clock, with the run number.
pub fn measure(
    clock: &mut dyn Clock,
    plan: &Plan,
    sets: usize,
    op: impl FnMut(usize) -> Result<()>,
) -> Result<Stats> {
    measure_with_setup(clock, plan, sets, |_| Ok(()), op)
}

/// [`measure`] with an untimed `setup(i)` before every run of `op(i)` (e.g. the forward
/// whose saved tensors a timed backward consumes).
///
/// # Errors
/// The first error of `setup`, `op` or the clock, with the run number.
pub fn measure_with_setup(
    clock: &mut dyn Clock,
    plan: &Plan,
    sets: usize,
    mut setup: impl FnMut(usize) -> Result<()>,
    mut op: impl FnMut(usize) -> Result<()>,
) -> Result<Stats> {
    let sets = sets.max(1);
    let mut run = 0usize;
    for _ in 0..plan.warmup {
        setup(run % sets).with_context(|| format!("set-up of warm-up run {run}"))?;
        clock.prepare()?;
        let i = run % sets;
        clock
            .time(&mut || op(i))
            .with_context(|| format!("warm-up run {run}"))?;
        run += 1;
    }
    let mut samples = Vec::with_capacity(plan.min_reps);
    let mut total = 0.0;
    while samples.len() < plan.max_reps && (samples.len() < plan.min_reps || total < plan.budget_s)
    {
        setup(run % sets).with_context(|| format!("set-up of timed run {}", samples.len()))?;
        clock.prepare()?;
        let i = run % sets;
        let s = clock
            .time(&mut || op(i))
            .with_context(|| format!("timed run {}", samples.len()))?;
        total += s;
        samples.push(s);
        run += 1;
    }
    Stats::from_samples(&samples)
}

/// Times `n_ops` operations interleaved: each round runs every operation once (`op(k, i)`
/// for operation `k` on input set `i`), so a load change on a shared machine hits all of them
/// alike and their ratios stay meaningful. Rounds continue until every operation has
/// `min_reps` samples and the round time has passed `budget_s` (or `max_reps` rounds).
/// Returns one summary per operation.
///
/// # Errors
/// The first error of `op` or of the clock, naming the operation and round.
pub fn measure_interleaved(
    clock: &mut dyn Clock,
    plan: &Plan,
    sets: usize,
    n_ops: usize,
    mut op: impl FnMut(usize, usize) -> Result<()>,
) -> Result<Vec<Stats>> {
    let sets = sets.max(1);
    if n_ops == 0 {
        return Ok(Vec::new());
    }
    for w in 0..plan.warmup {
        for k in 0..n_ops {
            clock.prepare()?;
            clock
                .time(&mut || op(k, w % sets))
                .with_context(|| format!("operation {k}, warm-up round {w}"))?;
        }
    }
    let mut samples = vec![Vec::with_capacity(plan.min_reps); n_ops];
    let mut total = 0.0;
    let mut round = 0usize;
    while round < plan.max_reps && (round < plan.min_reps || total < plan.budget_s) {
        for (k, v) in samples.iter_mut().enumerate() {
            clock.prepare()?;
            let i = (plan.warmup + round) % sets;
            let s = clock
                .time(&mut || op(k, i))
                .with_context(|| format!("operation {k}, timed round {round}"))?;
            v.push(s);
            total += s / n_ops.max(1) as f64;
        }
        round += 1;
    }
    samples.iter().map(|v| Stats::from_samples(v)).collect()
}

/// How many input sets to cycle so that together they exceed twice the last-level cache:
/// `ceil(2·cache / set_bytes)`, at least 1 and at most `max_sets`.
pub fn rotation_sets(set_bytes: usize, cache_bytes: usize, max_sets: usize) -> usize {
    if set_bytes == 0 {
        return 1;
    }
    (2 * cache_bytes)
        .div_ceil(set_bytes)
        .clamp(1, max_sets.max(1))
}

/// The host's last-level cache in bytes, from sysfs (the largest `cache/index*/size` of
/// cpu0), or 32 MiB when unknown.
pub fn host_llc_bytes() -> usize {
    let mut best = 0usize;
    for idx in 0..8 {
        let p = format!("/sys/devices/system/cpu/cpu0/cache/index{idx}/size");
        if let Ok(s) = std::fs::read_to_string(&p) {
            let s = s.trim();
            let (num, mul) = match s.strip_suffix('K') {
                Some(n) => (n, 1024),
                None => match s.strip_suffix('M') {
                    Some(n) => (n, 1024 * 1024),
                    None => (s, 1),
                },
            };
            if let Ok(v) = num.parse::<usize>() {
                best = best.max(v * mul);
            }
        }
    }
    if best == 0 {
        32 << 20
    } else {
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that reports a scripted time per run, so the loop's bookkeeping is tested
    /// without timing anything.
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
    fn warmup_is_not_counted_and_sets_cycle() {
        let mut clock = Scripted {
            next: 0.0,
            prepared: 0,
        };
        let mut seen = Vec::new();
        let s = measure(&mut clock, &Plan::fixed(2, 5), 3, |i| {
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(s.runs, 5);
        // Timed runs got 3, 4, 5, 6, 7 (the warm-up took 1 and 2).
        assert_eq!(s.min_s, 3.0);
        assert_eq!(s.median_s, 5.0);
        assert_eq!(clock.prepared, 7);
    }

    #[test]
    fn budget_stops_after_min_reps() {
        let mut clock = Scripted {
            next: 0.0,
            prepared: 0,
        };
        let plan = Plan {
            warmup: 0,
            min_reps: 2,
            max_reps: 100,
            budget_s: 5.0,
        };
        // Runs take 1, 2, 3: the total passes 5 after the third.
        let s = measure(&mut clock, &plan, 1, |_| Ok(())).unwrap();
        assert_eq!(s.runs, 3);
    }

    #[test]
    fn errors_name_the_run() {
        let mut clock = HostClock;
        let e = measure(&mut clock, &Plan::fixed(1, 3), 1, |_| {
            anyhow::bail!("kernel fault")
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("warm-up run 0"), "{e:#}");
    }

    #[test]
    fn interleaved_runs_every_op_each_round() {
        let mut clock = Scripted {
            next: 0.0,
            prepared: 0,
        };
        let mut seen = Vec::new();
        let st = measure_interleaved(&mut clock, &Plan::fixed(1, 3), 2, 2, |k, i| {
            seen.push((k, i));
            Ok(())
        })
        .unwrap();
        // Warm-up round on set 0, then three rounds on sets 1, 0, 1.
        assert_eq!(
            seen,
            vec![
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1),
                (0, 0),
                (1, 0),
                (0, 1),
                (1, 1)
            ]
        );
        assert_eq!(st.len(), 2);
        // Op 0 got times 3, 5, 7; op 1 got 4, 6, 8.
        assert_eq!((st[0].median_s, st[1].median_s), (5.0, 6.0));
        assert_eq!(st[0].runs, 3);
    }

    #[test]
    fn rotation_covers_twice_the_cache() {
        assert_eq!(rotation_sets(10 << 20, 32 << 20, 16), 7);
        assert_eq!(rotation_sets(100 << 20, 32 << 20, 16), 1);
        assert_eq!(rotation_sets(1, 32 << 20, 16), 16);
        assert_eq!(rotation_sets(0, 32 << 20, 16), 1);
        assert!(host_llc_bytes() >= 1 << 16);
    }
}
