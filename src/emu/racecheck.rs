//! Racecheck over an access record, after compute-sanitizer's racecheck.
//!
//! Two hazards are reported:
//!
//! - **Shared memory, within a block**: two threads of one block touch one byte of shared
//!   memory in the same barrier interval (no `__syncthreads()` completed between them) and at
//!   least one of the accesses is a plain (non-atomic) write. Two lanes of one warp are
//!   also ordered by a warp collective both passed (`__syncwarp`, a shuffle, a vote): they
//!   conflict only when they had passed the same number of synchronisation points.
//! - **Global memory, across blocks**: one byte written plainly by two blocks, or written
//!   plainly by one block and read by another, in one launch (blocks of a launch are not
//!   ordered; atomics are exempt).
//!
//! The analysis looks at sets of accesses, never at the order the emulator's scheduler ran
//! them in, so a hazard is found on every schedule (seed), not by luck.

use super::record::{Access, LaunchRecord, Sites};
use std::collections::HashMap;

/// Which rule a [`Hazard`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HazardKind {
    /// Two threads of a block, one shared-memory byte, one barrier interval, a plain write.
    Shared,
    /// Two blocks, one global byte, a plain write by one of them.
    Global,
}

/// One side of a hazard: who accessed, where in the source, how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Block index (x, y, z).
    pub block: [u32; 3],
    /// Thread index (x, y, z).
    pub thread: [u32; 3],
    /// `file:line` of the access.
    pub site: String,
    /// "write", "read" or "atomic".
    pub what: &'static str,
}

/// A data race found in a launch record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hazard {
    /// The rule broken.
    pub kind: HazardKind,
    /// The kernel.
    pub kernel: String,
    /// Host address of the first conflicting byte.
    pub addr: u64,
    /// The (plain) write.
    pub first: Party,
    /// The other access.
    pub second: Party,
}

impl std::fmt::Display for Hazard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = |x: &Party| {
            format!(
                "{} at {} by thread ({},{},{}) of block ({},{},{})",
                x.what,
                x.site,
                x.thread[0],
                x.thread[1],
                x.thread[2],
                x.block[0],
                x.block[1],
                x.block[2]
            )
        };
        let kind = match self.kind {
            HazardKind::Shared => "shared-memory race within a block (no barrier between)",
            HazardKind::Global => "global-memory race between blocks",
        };
        write!(
            f,
            "{}: {kind}: {} and {}",
            self.kernel,
            p(&self.first),
            p(&self.second)
        )
    }
}

fn what(a: &Access) -> &'static str {
    if a.is_atomic() {
        "atomic"
    } else if a.is_write() {
        "write"
    } else {
        "read"
    }
}

fn party(rec: &LaunchRecord, sites: &mut Sites, a: &Access) -> Party {
    Party {
        block: rec.block_xyz(a.block),
        thread: rec.thread_xyz(a.thread),
        site: sites.site(a.pc),
        what: what(a),
    }
}

fn plain_write(a: &Access) -> bool {
    a.is_write() && !a.is_atomic()
}

/// Whether two shared-memory accesses of one block in one barrier interval may overlap in
/// time: different threads, and not ordered by a warp collective both lanes passed.
fn concurrent(a: &Access, b: &Access) -> bool {
    a.thread != b.thread && (a.warp() != b.warp() || a.epoch == b.epoch)
}

/// The hazards of `rec`: at most one per (kind, pair of sites), the first by address.
pub fn racecheck(rec: &LaunchRecord, sites: &mut Sites) -> Vec<Hazard> {
    let mut found: Vec<Hazard> = Vec::new();
    let mut seen: HashMap<(HazardKind, u64, u64), ()> = HashMap::new();
    let mut report = |kind: HazardKind, addr: u64, w: &Access, o: &Access, sites: &mut Sites| {
        if seen.insert((kind, w.pc, o.pc), ()).is_some() {
            return;
        }
        found.push(Hazard {
            kind,
            kernel: rec.kernel.clone(),
            addr,
            first: party(rec, sites, w),
            second: party(rec, sites, o),
        });
    };

    // Shared memory: per (block, barrier interval, byte), the accesses touching it.
    let mut shared: HashMap<(u32, u32, u64), Vec<u32>> = HashMap::new();
    for (i, a) in rec.accesses.iter().enumerate() {
        if a.is_shared() {
            for byte in a.addr..a.addr + a.size as u64 {
                shared
                    .entry((a.block, a.barrier, byte))
                    .or_default()
                    .push(i as u32);
            }
        }
    }
    let mut keys: Vec<_> = shared.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let list = &shared[&key];
        for &wi in list {
            let w = &rec.accesses[wi as usize];
            if !plain_write(w) {
                continue;
            }
            if let Some(&oi) = list
                .iter()
                .find(|&&oi| concurrent(w, &rec.accesses[oi as usize]))
            {
                report(
                    HazardKind::Shared,
                    key.2,
                    w,
                    &rec.accesses[oi as usize],
                    sites,
                );
                break;
            }
        }
    }

    // Global memory: per byte, the first two blocks writing plainly and the first two
    // blocks reading (any other block is a third, and the first two suffice to decide).
    #[derive(Default, Clone, Copy)]
    struct Byte {
        w: [Option<u32>; 2],
        r: [Option<u32>; 2],
    }
    fn note(slots: &mut [Option<u32>; 2], idx: u32, rec: &LaunchRecord) {
        let block = rec.accesses[idx as usize].block;
        match slots {
            [None, _] => slots[0] = Some(idx),
            [Some(a), None] if rec.accesses[*a as usize].block != block => slots[1] = Some(idx),
            _ => {}
        }
    }
    let mut global: HashMap<u64, Byte> = HashMap::new();
    for (i, a) in rec.accesses.iter().enumerate() {
        if a.is_shared() || a.is_atomic() {
            continue;
        }
        for byte in a.addr..a.addr + a.size as u64 {
            let e = global.entry(byte).or_default();
            if a.is_write() {
                note(&mut e.w, i as u32, rec);
            } else {
                note(&mut e.r, i as u32, rec);
            }
        }
    }
    let mut bytes: Vec<_> = global.into_iter().collect();
    bytes.sort_unstable_by_key(|(b, _)| *b);
    for (byte, e) in bytes {
        let Some(w0) = e.w[0] else { continue };
        let w = &rec.accesses[w0 as usize];
        let other = e.w[1].or_else(|| {
            e.r.iter()
                .flatten()
                .copied()
                .find(|&ri| rec.accesses[ri as usize].block != w.block)
        });
        if let Some(o) = other {
            report(
                HazardKind::Global,
                byte,
                w,
                &rec.accesses[o as usize],
                sites,
            );
        }
    }
    found
}
