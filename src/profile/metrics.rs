//! The memory figures of one launch, from its access record ([`crate::emu::record`]), as
//! Nsight Compute's memory tables define them.
//!
//! - **Vector accesses**: a 16- or 8-byte access the emulator's host build split into
//!   member-by-member pieces is joined back into one access first ([`vector_accesses`]).
//! - **Request**: the k-th access of each lane of a warp between two synchronisation points
//!   of that lane (a `__syncthreads()` or a warp collective), per kind (global load, global
//!   store, atomic, shared load, shared store): the accesses one warp-wide instruction makes.
//! - **Sectors** (global): the distinct 32-byte sectors a request touches. Efficiency = bytes
//!   requested (the lanes' access sizes summed, at most the sector bytes: a broadcast of one
//!   word to 32 lanes uses its sector fully) / bytes of the sectors touched, as nvprof's
//!   `gld_efficiency` and `gst_efficiency`.
//! - **Wavefronts** (shared): shared memory has 32 banks of 4 bytes; a request of `s`-byte
//!   accesses is split, as the hardware does, into phases of `128 / max(s, 4)` consecutive
//!   lanes (one phase for 4-byte accesses, 2 for 8-byte, 4 for 16-byte; an `ldmatrix` is
//!   recorded as 16-byte rows, one phase per 8 rows). A phase takes as many wavefronts as the
//!   largest number of distinct 4-byte words it addresses in one bank (same word: broadcast).
//! - **Unique global bytes**: the distinct 32-byte sectors the launch reads plus the distinct
//!   sectors it writes (a sector read and written counts twice, an atomic's both), × 32: what
//!   an ideal cache would move to and from DRAM (each sector filled once, written back once). When only some blocks were recorded, sectors touched by
//!   exactly one recorded block are scaled by blocks / recorded blocks (data private to a
//!   block), sectors touched by several recorded blocks are counted once (data every block
//!   reads, like the adapter): an estimate, exact when every block is recorded. Data shared
//!   by a group of blocks (one split's A columns) looks private to the one recorded block of
//!   the group, so the estimate is then bounded per array: the sectors read (or written)
//!   within an array of the launch are at most the sectors it spans.

use crate::emu::record::{Access, LaunchRecord, Sites};
use crate::profile::formula::Array;
use serde::Serialize;
use std::collections::HashMap;

/// Sector size of the L1/L2 caches, bytes.
pub const SECTOR: u64 = 32;

/// Counters of one kind of request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Warp-level requests.
    pub requests: u64,
    /// Global: 32-byte sectors touched, summed over requests. Shared: wavefronts.
    pub units: u64,
    /// Bytes the lanes used (per request the lanes' bytes, at most the sector bytes for
    /// global memory), summed over requests.
    pub bytes_used: u64,
    /// The fewest units the requests could take: global, sectors of the bytes requested;
    /// shared, one wavefront per phase with an active lane.
    pub ideal_units: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.requests += o.requests;
        self.units += o.units;
        self.bytes_used += o.bytes_used;
        self.ideal_units += o.ideal_units;
    }
    /// Sectors (or wavefronts) per request; 0 without requests.
    pub fn per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.units as f64 / self.requests as f64
        }
    }
    /// Bytes used / bytes of the sectors touched (global); `None` without requests.
    pub fn efficiency(&self) -> Option<f64> {
        (self.units > 0).then(|| self.bytes_used as f64 / (self.units * SECTOR) as f64)
    }
}

/// The figures of one source site.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SiteFigures {
    /// `file:line`.
    pub site: String,
    /// "global load", "global store", "atomic", "shared load" or "shared store".
    pub kind: &'static str,
    /// Requests, sectors (global) or wavefronts (shared), bytes used.
    pub counts: Counts,
    /// Global: sector bytes moved beyond the bytes used. Shared: wavefronts beyond one per
    /// phase (bank conflicts). What ranks the worst sites.
    pub excess: f64,
}

/// The memory figures of one launch (of its recorded blocks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// Global loads.
    pub global_load: Counts,
    /// Global stores.
    pub global_store: Counts,
    /// Atomics (global and shared).
    pub atomic: Counts,
    /// Shared loads (units: wavefronts).
    pub shared_load: Counts,
    /// Shared stores (units: wavefronts).
    pub shared_store: Counts,
    /// Distinct global sectors read plus distinct sectors written, × 32, over the launch
    /// (extrapolated when sampled; module doc).
    pub unique_global_bytes: f64,
    /// Sites, worst first.
    pub sites: Vec<SiteFigures>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    GlobalLoad,
    GlobalStore,
    Atomic,
    SharedLoad,
    SharedStore,
}

impl Kind {
    fn of(a: &Access) -> Kind {
        match (a.is_shared(), a.is_atomic(), a.is_write()) {
            (_, true, _) => Kind::Atomic,
            (false, _, false) => Kind::GlobalLoad,
            (false, _, true) => Kind::GlobalStore,
            (true, _, false) => Kind::SharedLoad,
            (true, _, true) => Kind::SharedStore,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::GlobalLoad => "global load",
            Kind::GlobalStore => "global store",
            Kind::Atomic => "atomic",
            Kind::SharedLoad => "shared load",
            Kind::SharedStore => "shared store",
        }
    }
    fn shared(self) -> bool {
        matches!(self, Kind::SharedLoad | Kind::SharedStore)
    }
}

/// (block, warp, epoch, kind, k): one warp-level request.
type ReqKey = (u32, u32, u32, Kind, u32);
/// A request's site (code address) and its lanes' accesses (lane, address, size).
type ReqLanes = (u64, Vec<(u32, u64, u32)>);

/// Distinct bytes covered by `spans` (address, size), sorted in place.
fn union_bytes(spans: &mut [(u64, u32)]) -> u64 {
    spans.sort_unstable();
    let (mut total, mut end) = (0u64, 0u64);
    for &(a, n) in spans.iter() {
        let e = a + n as u64;
        if e > end {
            total += e - a.max(end);
            end = e;
        }
    }
    total
}

/// Sectors touched by `spans`.
fn sectors(spans: &[(u64, u32)]) -> u64 {
    let mut s: Vec<u64> = spans
        .iter()
        .flat_map(|&(a, n)| (a / SECTOR)..=((a + n.max(1) as u64 - 1) / SECTOR))
        .collect();
    s.sort_unstable();
    s.dedup();
    s.len() as u64
}

/// Shared-memory wavefronts of one request, and its phases with an active lane: lanes as
/// (lane, address, size).
fn wavefronts(lanes: &mut [(u32, u64, u32)]) -> (u64, u64) {
    lanes.sort_unstable();
    let size = lanes.iter().map(|l| l.2).max().unwrap_or(4).max(4);
    let per_phase = (128 / size).max(1);
    let (mut total, mut phases) = (0u64, 0u64);
    let mut phase_words: HashMap<u32, Vec<u64>> = HashMap::new();
    for chunk in lanes.chunk_by(|a, b| a.0 / per_phase == b.0 / per_phase) {
        phase_words.clear();
        for &(_, addr, n) in chunk {
            for w in (addr / 4)..=((addr + n.max(1) as u64 - 1) / 4) {
                phase_words.entry((w % 32) as u32).or_default().push(w);
            }
        }
        let worst = phase_words
            .values_mut()
            .map(|v| {
                v.sort_unstable();
                v.dedup();
                v.len() as u64
            })
            .max()
            .unwrap_or(0);
        total += worst;
        phases += 1;
    }
    (total, phases)
}

/// The accesses with each vector access the host compiler split into its components put
/// back together: a thread's consecutive accesses of one kind, in one synchronisation epoch,
/// from one source line, to contiguous addresses, pieces of one size, that add up to 8 or 16
/// bytes starting at an address aligned to that total (a `uint4` or `float2` load or store
/// is one instruction on the GPU; the emulator's host build may copy it member by member).
/// Each thread's order is kept; threads' accesses may interleave differently.
pub fn vector_accesses(accesses: &[Access], sites: &mut Sites) -> Vec<Access> {
    fn flush(run: &mut Vec<Access>, out: &mut Vec<Access>) {
        let total: u32 = run.iter().map(|a| a.size).sum();
        if run.len() > 1 && matches!(total, 8 | 16) && run[0].addr % total as u64 == 0 {
            out.push(Access {
                size: total,
                ..run[0]
            });
        } else {
            out.append(run);
        }
        run.clear();
    }
    let mut out = Vec::with_capacity(accesses.len());
    let mut runs: HashMap<(u32, u32), Vec<Access>> = HashMap::new();
    for a in accesses {
        let run = runs.entry((a.block, a.thread)).or_default();
        let joins = run.last().is_some_and(|p| {
            let total: u32 = run.iter().map(|x| x.size).sum();
            p.flags == a.flags
                && p.epoch == a.epoch
                && p.barrier == a.barrier
                && p.size == a.size
                && a.size < 8
                && total + a.size <= 16
                && p.addr + p.size as u64 == a.addr
                && (p.pc == a.pc || sites.site(p.pc) == sites.site(a.pc))
        });
        if !joins {
            flush(run, &mut out);
        }
        run.push(*a);
    }
    for run in runs.values_mut() {
        flush(run, &mut out);
    }
    out
}

/// The figures of `rec`. `arrays` (the launch's arrays, [`crate::profile::formula::arrays`];
/// may be empty) bound the extrapolated unique bytes: the distinct sectors read (or written)
/// within one array are at most the sectors the array spans.
pub fn figures(rec: &LaunchRecord, sites: &mut Sites, arrays: &[Array]) -> Figures {
    // k: per (block, thread, kind), the running index within the thread's current epoch.
    let mut k_of: HashMap<(u32, u32, Kind), (u32, u32)> = HashMap::new();
    let mut reqs: HashMap<ReqKey, ReqLanes> = HashMap::new();
    let mut sector_blocks: HashMap<(u64, bool), (u32, bool)> = HashMap::new();
    for a in &vector_accesses(&rec.accesses, sites) {
        let kind = Kind::of(a);
        let e = k_of
            .entry((a.block, a.thread, kind))
            .or_insert((a.epoch, 0));
        if e.0 != a.epoch {
            *e = (a.epoch, 0);
        }
        let k = e.1;
        e.1 += 1;
        let r = reqs
            .entry((a.block, a.warp(), a.epoch, kind, k))
            .or_insert_with(|| (a.pc, Vec::new()));
        r.1.push((a.thread % 32, a.addr, a.size));
        if !a.is_shared() {
            // Read sectors and written sectors apart (an atomic is both): an ideal cache
            // fills each sector read once and writes back each sector written once.
            let dirs: &[bool] = match (a.is_atomic(), a.is_write()) {
                (true, _) => &[false, true],
                (false, w) => {
                    if w {
                        &[true]
                    } else {
                        &[false]
                    }
                }
            };
            for &w in dirs {
                for s in (a.addr / SECTOR)..=((a.addr + a.size.max(1) as u64 - 1) / SECTOR) {
                    let e = sector_blocks.entry((s, w)).or_insert((a.block, false));
                    if e.0 != a.block {
                        e.1 = true;
                    }
                }
            }
        }
    }
    let mut per_kind: HashMap<Kind, Counts> = HashMap::new();
    let mut per_site: HashMap<(u64, Kind), Counts> = HashMap::new();
    for ((_, _, _, kind, _), (pc, mut lanes)) in reqs {
        let requested: u64 = lanes.iter().map(|l| l.2 as u64).sum();
        let c = if kind.shared() {
            let (units, phases) = wavefronts(&mut lanes);
            Counts {
                requests: 1,
                units,
                bytes_used: requested,
                ideal_units: phases,
            }
        } else {
            let mut spans: Vec<(u64, u32)> = lanes.iter().map(|l| (l.1, l.2)).collect();
            let units = sectors(&spans);
            let distinct = union_bytes(&mut spans);
            Counts {
                requests: 1,
                units,
                bytes_used: requested.min(units * SECTOR),
                ideal_units: distinct.div_ceil(SECTOR),
            }
        };
        per_kind.entry(kind).or_default().add(c);
        per_site.entry((pc, kind)).or_default().add(c);
    }
    // Sites resolved by file:line (several code addresses may share one line).
    let mut by_line: HashMap<(String, Kind), Counts> = HashMap::new();
    for ((pc, kind), c) in per_site {
        by_line.entry((sites.site(pc), kind)).or_default().add(c);
    }
    let mut site_list: Vec<SiteFigures> = by_line
        .into_iter()
        .map(|((site, kind), counts)| {
            let excess = if kind.shared() {
                counts.units as f64 - counts.ideal_units as f64
            } else {
                (counts.units * SECTOR) as f64 - counts.bytes_used as f64
            };
            SiteFigures {
                site,
                kind: kind.name(),
                counts,
                excess,
            }
        })
        .collect();
    site_list.sort_by(|a, b| {
        b.excess
            .total_cmp(&a.excess)
            .then_with(|| a.site.cmp(&b.site))
            .then_with(|| a.kind.cmp(b.kind))
    });
    let scale = rec.blocks() as f64 / rec.recorded_blocks().max(1) as f64;
    // Sector ranges of the arrays (one per address: an in-place output shares its input's).
    let mut ranges: Vec<(u64, u64)> = arrays
        .iter()
        .filter(|a| a.extent >= 1.0)
        .map(|a| (a.addr / SECTOR, (a.addr + a.extent as u64 - 1) / SECTOR))
        .collect();
    ranges.sort_unstable();
    ranges.dedup_by(|b, a| {
        let same = a.0 == b.0;
        if same {
            a.1 = a.1.max(b.1);
        }
        same
    });
    // Per (array, direction) the extrapolated sectors; `None`: outside every array.
    let mut per_array: HashMap<(Option<usize>, bool), f64> = HashMap::new();
    for (&(sector, write), &(_, shared)) in &sector_blocks {
        let i = ranges.partition_point(|r| r.0 <= sector);
        let arr = match i.checked_sub(1) {
            Some(k) if sector <= ranges[k].1 => Some(k),
            _ => None,
        };
        *per_array.entry((arr, write)).or_default() += if shared { 1.0 } else { scale };
    }
    let unique: f64 = per_array
        .iter()
        .map(|(&(arr, _), &n)| match arr {
            Some(i) => n.min((ranges[i].1 - ranges[i].0 + 1) as f64),
            None => n,
        })
        .sum::<f64>()
        * SECTOR as f64;
    let get = |k: Kind| per_kind.get(&k).copied().unwrap_or_default();
    Figures {
        global_load: get(Kind::GlobalLoad),
        global_store: get(Kind::GlobalStore),
        atomic: get(Kind::Atomic),
        shared_load: get(Kind::SharedLoad),
        shared_store: get(Kind::SharedStore),
        unique_global_bytes: unique,
        sites: site_list,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_and_bytes_of_coalesced_and_strided_requests() {
        // 32 lanes × 4 bytes, consecutive and 128-byte aligned: 4 sectors, all bytes used.
        let mut v: Vec<(u64, u32)> = (0..32).map(|l| (1024 + 4 * l, 4)).collect();
        assert_eq!(sectors(&v), 4);
        assert_eq!(union_bytes(&mut v), 128);
        // Stride of 64 bytes: one sector per lane, 4 of 32 bytes used.
        let v: Vec<(u64, u32)> = (0..32).map(|l| (1024 + 64 * l, 4)).collect();
        assert_eq!(sectors(&v), 32);
        // Misaligned by 4 bytes: 5 sectors.
        let v: Vec<(u64, u32)> = (0..32).map(|l| (1028 + 4 * l, 4)).collect();
        assert_eq!(sectors(&v), 5);
        // Broadcast: every lane reads one word: one sector, 4 bytes used.
        let mut v: Vec<(u64, u32)> = (0..32).map(|_| (2048, 4)).collect();
        assert_eq!(sectors(&v), 1);
        assert_eq!(union_bytes(&mut v), 4);
    }

    #[test]
    fn vector_accesses_split_by_the_host_compiler_are_joined() {
        let acc = |thread: u32, addr: u64, size: u32, pc: u64| Access {
            addr,
            pc,
            size,
            block: 0,
            thread,
            barrier: 0,
            epoch: 0,
            flags: 0,
        };
        let mut sites = Sites::new();
        // A 16-byte load as four 4-byte pieces (one pc: no site lookup needed), interleaved
        // with another thread's; a scalar 4-byte pair at an 8-byte-misaligned address stays
        // two accesses; a fifth piece past 16 bytes starts a new access.
        let v = vec![
            acc(0, 1024, 4, 7),
            acc(1, 4096, 4, 7),
            acc(0, 1028, 4, 7),
            acc(0, 1032, 4, 7),
            acc(1, 4100, 4, 7),
            acc(0, 1036, 4, 7),
            acc(0, 1040, 4, 7),
            acc(2, 2052, 4, 7),
            acc(2, 2056, 4, 7),
        ];
        let mut got: Vec<(u32, u64, u32)> = vector_accesses(&v, &mut sites)
            .iter()
            .map(|a| (a.thread, a.addr, a.size))
            .collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![
                (0, 1024, 16),
                (0, 1040, 4),
                (1, 4096, 8),
                (2, 2052, 4),
                (2, 2056, 4)
            ]
        );
    }

    #[test]
    fn bank_conflicts_count_distinct_words_per_bank() {
        // Consecutive words: 1 wavefront; stride of 2 words: 2-way conflict; stride of 32
        // words (a column of a 32-wide float tile): 32-way.
        for (stride, want) in [(4u64, 1u64), (8, 2), (128, 32)] {
            let mut l: Vec<(u32, u64, u32)> = (0..32).map(|i| (i, i as u64 * stride, 4)).collect();
            assert_eq!(wavefronts(&mut l), (want, 1), "stride {stride}");
        }
        // Broadcast of one word: 1.
        let mut l: Vec<(u32, u64, u32)> = (0..32).map(|i| (i, 64, 4)).collect();
        assert_eq!(wavefronts(&mut l), (1, 1));
        // 16-byte accesses, consecutive: 4 phases of 8 lanes, 1 wavefront each.
        let mut l: Vec<(u32, u64, u32)> = (0..32).map(|i| (i, i as u64 * 16, 16)).collect();
        assert_eq!(wavefronts(&mut l), (4, 4));
        // ldmatrix x4 rows with a 128-byte row pitch (unswizzled): the 8 rows of a phase all
        // start in bank 0: 8-way conflict per phase.
        let mut l: Vec<(u32, u64, u32)> = (0..32).map(|i| (i, i as u64 * 128, 16)).collect();
        assert_eq!(wavefronts(&mut l), (32, 4));
    }
}
