//! Access recording and the racecheck: the mutated kernels of kernels/emu/tests/racecheck.cu
//! (a removed barrier, a plain `+=` into shared memory, blocks writing one global address) are
//! reported under every schedule with both sites; their race-free controls are not; the
//! record of a known kernel has exactly the accesses its source makes.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::racecheck::{racecheck, HazardKind};
use dorafuse::emu::record::{LaunchRecord, Sites};
use dorafuse::emu::{EmuBackend, EmuBuffer, RecordOptions};

const SOURCE: &str = include_str!("../../kernels/emu/tests/racecheck.cu");

/// Schedules every test runs under, plus the one `DORAFUSE_EMU_SEED` pins.
fn seeds() -> Vec<u64> {
    vec![
        1,
        2,
        3,
        0xDEAD_BEEF,
        EmuBackend::from_env().expect("DORAFUSE_EMU_SEED").seed(),
    ]
}

/// The 1-based line of racecheck.cu holding `text` inside kernel `kernel` (its first
/// occurrence after the kernel's name).
fn line_of(kernel: &str, text: &str) -> usize {
    let start = SOURCE.find(&format!(" {kernel}(")).expect(kernel);
    let at = start + SOURCE[start..].find(text).expect(text);
    SOURCE[..at].lines().count()
}

/// Runs `kernel(x, out, n)` recorded; returns its record and `out`.
fn run(
    seed: u64,
    kernel: &str,
    n: usize,
    grid: u32,
    block: u32,
    outs: usize,
) -> (LaunchRecord, Vec<f32>) {
    let b = EmuBackend::new(seed).recording(RecordOptions::default());
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32 + 1.0).collect();
    let mut xb: EmuBuffer = b.alloc_zeroed(4 * n).unwrap();
    b.upload(&mut xb, bytemuck::cast_slice(&x)).unwrap();
    let ob = b.alloc_zeroed(4 * outs).unwrap();
    let dims = LaunchDims {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    };
    let args = [
        KernelArg::Ptr(xb.ptr()),
        KernelArg::Ptr(ob.ptr()),
        KernelArg::I32(n as i32),
    ];
    // SAFETY: x holds n f32, out holds `outs` f32, as each kernel reads and writes.
    unsafe { b.launch(kernel, dims, &args) }.unwrap();
    let mut out = vec![0f32; outs];
    b.download(&ob, bytemuck::cast_slice_mut(&mut out)).unwrap();
    let mut recs = b.take_records();
    assert_eq!(recs.len(), 1, "one launch, one record");
    (recs.remove(0), out)
}

#[test]
fn removed_barrier_is_reported_on_every_schedule() {
    let k = "emu_mut_no_barrier";
    let site = format!(
        "kernels/emu/tests/racecheck.cu:{}",
        line_of(k, "partial[threadIdx.x] += partial[threadIdx.x + s]")
    );
    for seed in seeds() {
        let (rec, _) = run(seed, k, 1000, 2, 128, 2);
        let hz = racecheck(&rec, &mut Sites::new());
        assert!(!hz.is_empty(), "seed {seed}: no hazard reported");
        assert!(hz.iter().all(|h| h.kind == HazardKind::Shared), "{hz:?}");
        let h = &hz[0];
        assert_eq!(h.first.site, site, "{h}");
        assert_eq!(h.second.site, site, "{h}");
        assert_eq!(h.first.what, "write");
        assert_ne!(h.first.thread, h.second.thread);
        assert_eq!(h.first.block, h.second.block);
        let text = h.to_string();
        assert!(
            text.starts_with("emu_mut_no_barrier: shared-memory race"),
            "{text}"
        );
    }
}

#[test]
fn plain_shared_accumulation_is_reported_and_the_atomic_one_is_not() {
    let k = "emu_mut_shared_accumulate";
    let site = format!(
        "kernels/emu/tests/racecheck.cu:{}",
        line_of(k, "total[0] += x[i]")
    );
    for seed in seeds() {
        let (rec, out) = run(seed, k, 300, 3, 128, 3);
        // The emulator's fibers do not interleave inside `+=`: the sums are right, the
        // racecheck is what sees the lost update.
        assert_eq!(out[0], (0..128).map(|i| (i % 7) as f32 + 1.0).sum::<f32>());
        let hz = racecheck(&rec, &mut Sites::new());
        assert_eq!(hz.len(), 1, "seed {seed}: {hz:?}");
        assert_eq!(hz[0].kind, HazardKind::Shared);
        assert_eq!(hz[0].first.site, site);
        assert_eq!(hz[0].second.site, site);

        let (rec, _) = run(seed, "emu_mut_shared_atomic", 300, 3, 128, 3);
        let atomics = rec.accesses.iter().filter(|a| a.is_atomic()).count();
        assert_eq!(atomics, 300, "one atomic per element");
        assert!(racecheck(&rec, &mut Sites::new()).is_empty());
    }
}

#[test]
fn blocks_writing_one_global_address_are_reported() {
    let k = "emu_mut_global_overlap";
    let site = format!(
        "kernels/emu/tests/racecheck.cu:{}",
        line_of(k, "out[0] = x[i]")
    );
    for seed in seeds() {
        let (rec, _) = run(seed, k, 256, 4, 64, 1);
        let hz = racecheck(&rec, &mut Sites::new());
        assert_eq!(hz.len(), 1, "seed {seed}: {hz:?}");
        assert_eq!(hz[0].kind, HazardKind::Global);
        assert_eq!(hz[0].first.site, site);
        assert_ne!(hz[0].first.block, hz[0].second.block);
    }
}

#[test]
fn warp_synchronised_and_barrier_synchronised_kernels_are_clean() {
    for seed in seeds() {
        let (rec, out) = run(seed, "emu_mut_syncwarp_tree", 70, 3, 32, 3);
        assert_eq!(out[2], (64..70).map(|i| (i % 7) as f32 + 1.0).sum::<f32>());
        assert!(racecheck(&rec, &mut Sites::new()).is_empty());
        let (rec, _) = run(seed, "emu_block_reduce_f32", 1000, 2, 128, 2);
        assert!(racecheck(&rec, &mut Sites::new()).is_empty());
    }
}

#[test]
fn the_record_holds_exactly_the_accesses_of_the_source() {
    // emu_block_reduce_f32 with n = 1000, 2 blocks of 128: each x[i] read once (4 bytes),
    // one 4-byte store per block to out, partial[t] written by each thread, then the tree.
    let (rec, out) = run(7, "emu_block_reduce_f32", 1000, 2, 128, 2);
    assert_eq!(rec.grid, [2, 1, 1]);
    assert_eq!(rec.block, [128, 1, 1]);
    assert_eq!(rec.static_shared, 4 * 1024);
    let global: Vec<_> = rec.accesses.iter().filter(|a| !a.is_shared()).collect();
    let reads = global.iter().filter(|a| !a.is_write()).count();
    let writes = global.iter().filter(|a| a.is_write()).count();
    assert_eq!(reads, 1000);
    assert_eq!(writes, 2);
    assert!(global.iter().all(|a| a.size == 4));
    // Shared: one store per thread, then per step s (64, 32, .., 1) threads t < s read two
    // values and write one.
    let steps: usize = (0..7).map(|k| 64usize >> k).sum();
    let shared = rec.accesses.iter().filter(|a| a.is_shared());
    let (sr, sw) = shared.fold(
        (0, 0),
        |(r, w), a| {
            if a.is_write() {
                (r, w + 1)
            } else {
                (r + 1, w)
            }
        },
    );
    assert_eq!(sw, 2 * (128 + steps));
    assert_eq!(sr, 2 * (2 * steps + 1));
    // Barrier intervals: the initial store before the first barrier, the last read after
    // the eighth.
    assert!(rec
        .accesses
        .iter()
        .filter(|a| a.is_shared() && a.is_write())
        .any(|a| a.barrier == 0));
    assert_eq!(rec.accesses.iter().map(|a| a.barrier).max(), Some(8));
    let expect: f32 = (0..512).map(|i| (i % 7) as f32 + 1.0).sum();
    assert_eq!(out[0], expect);
}

#[test]
fn a_backend_that_does_not_record_keeps_no_records() {
    let b = EmuBackend::new(1);
    let xb = b.alloc_zeroed(4 * 64).unwrap();
    let ob = b.alloc_zeroed(4).unwrap();
    let args = [
        KernelArg::Ptr(xb.ptr()),
        KernelArg::Ptr(ob.ptr()),
        KernelArg::I32(64),
    ];
    let dims = LaunchDims {
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: x holds 64 f32 and out one, as the kernel reads and writes.
    unsafe { b.launch("emu_block_reduce_f32", dims, &args) }.unwrap();
    assert!(b.take_records().is_empty());
}

#[test]
fn every_kernel_is_race_free_recorded_at_shapes_off_every_tile() {
    use dorafuse::kernels::KERNELS;
    use dorafuse::layer::Shape;
    use dorafuse::profile::{drive, NOT_LAUNCHED_BY_LIBRARY};
    // Off every tile of kernels/common.cuh (64, 32, 16 rows and columns; rank chunks 32 and
    // 16): tn_r16 serves r = 3, tn_r64 r = 37; the norm variants are each forced at r = 3.
    // d_in and d_out are one partial 64-wide tile past the first (5 and 3 left over: off the
    // 32 and 16 tiles and every vector width too), the least that crosses a tile edge and
    // gives the split kernels two chunks; each recorded access costs the racecheck, and
    // d_in·d_out sets the count of the weight passes.
    let shape = Shape {
        t: 21,
        d_in: 69,
        d_out: 67,
        r: 3,
    };
    // Each launch is checked as it returns (its record then dropped).
    type Found = (Vec<String>, std::collections::BTreeSet<String>, usize);
    let found = std::sync::Arc::new(std::sync::Mutex::new(Found::default()));
    let sink_found = std::sync::Arc::clone(&found);
    let mut sites = Sites::new();
    let b = EmuBackend::from_env().unwrap().recording_into(
        RecordOptions::default(),
        Box::new(move |rec: LaunchRecord| {
            let mut f = sink_found.lock().unwrap();
            assert_eq!(rec.recorded_blocks(), rec.blocks(), "every block recorded");
            if !rec.accesses.iter().any(|a| !a.is_shared()) {
                f.0.push(format!("{}: no global access recorded", rec.kernel));
            }
            for h in racecheck(&rec, &mut sites) {
                f.0.push(h.to_string());
            }
            f.1.insert(rec.kernel.clone());
            f.2 += 1;
        }),
        None,
    );
    drive(&b, shape, shape, 37, &|_| true, &|_, _, _| {}).unwrap();
    let f = found.lock().unwrap();
    assert!(f.0.is_empty(), "{}", f.0.join("\n"));
    assert!(f.2 >= KERNELS.len() - NOT_LAUNCHED_BY_LIBRARY.len());
    let seen = &f.1;
    for (_, name) in KERNELS {
        if NOT_LAUNCHED_BY_LIBRARY.contains(name) {
            assert!(
                !seen.contains(*name),
                "{name} is launched now: drop it from the list"
            );
        } else {
            assert!(seen.contains(*name), "{name} was not launched");
        }
    }
}
