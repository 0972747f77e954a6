//! The emulator runs reductions (shared-memory tree, warp shuffles, ballots, barrier
//! reductions) correctly under several thread schedules.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::{EmuBackend, EmuBuffer};

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

fn upload<T: bytemuck::Pod>(b: &EmuBackend, v: &[T]) -> EmuBuffer {
    let bytes: &[u8] = bytemuck::cast_slice(v);
    let mut buf = b.alloc_zeroed(bytes.len()).unwrap();
    b.upload(&mut buf, bytes).unwrap();
    buf
}

fn download<T: bytemuck::Pod + Default + Clone>(
    b: &EmuBackend,
    buf: &EmuBuffer,
    n: usize,
) -> Vec<T> {
    let mut v = vec![T::default(); n];
    b.download(buf, bytemuck::cast_slice_mut(&mut v)).unwrap();
    v
}

fn dims(grid: u32, block: u32) -> LaunchDims {
    LaunchDims {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

/// Per-block sums of `x` in chunks of 4 * block, in f64.
fn chunk_sums(x: &[f32], block: usize) -> Vec<f64> {
    x.chunks(4 * block)
        .map(|c| c.iter().map(|&v| v as f64).sum())
        .collect()
}

fn check_reduction(kernel: &str) {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        for &(n, block) in &[
            (1usize, 32u32),
            (7, 64),
            (129, 128),
            (4097, 256),
            (1000, 1024),
        ] {
            // Distinct values: an element summed twice or dropped changes the result.
            let x: Vec<f32> = (0..n).map(|i| (i as f32) * 0.25 - 3.0).collect();
            let grid = n.div_ceil(4 * block as usize) as u32;
            let xb = upload(&b, &x);
            let ob = b.alloc_zeroed(grid as usize * 4).unwrap();
            // SAFETY: (x [n] f32, out [grid] f32, n) as the .cu signature; buffers sized so.
            unsafe {
                b.launch(
                    kernel,
                    dims(grid, block),
                    &[
                        KernelArg::Ptr(xb.ptr()),
                        KernelArg::Ptr(ob.ptr()),
                        KernelArg::I32(n as i32),
                    ],
                )
                .unwrap();
            }
            let got: Vec<f32> = download(&b, &ob, grid as usize);
            let want = chunk_sums(&x, block as usize);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    ((*g as f64) - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{kernel} seed {seed} n {n} block {block}: block {i} sum {g}, want {w}"
                );
            }
        }
    }
}

#[test]
fn block_reduction_in_shared_memory() {
    check_reduction("emu_block_reduce_f32");
}

#[test]
fn warp_shuffle_reduction() {
    check_reduction("emu_warp_reduce_f32");
}

#[test]
fn ballot_any_all() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let n: i32 = 256;
        // Warp w has w positive elements at scattered lanes (w = 0..7), warp 7 all 32.
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let (w, l) = (i / 32, i % 32);
                if w == 7 || (l * 7) % 32 < w {
                    1.0
                } else {
                    -1.0
                }
            })
            .collect();
        let want: Vec<i32> = (0..8).map(|w| if w == 7 { 32 } else { w }).collect();
        let xb = upload(&b, &x);
        let ob = b.alloc_zeroed(8 * 4).unwrap();
        // SAFETY: (x [n] f32, out [n/32] i32, n).
        unsafe {
            b.launch(
                "emu_ballot_count",
                dims(2, 128),
                &[
                    KernelArg::Ptr(xb.ptr()),
                    KernelArg::Ptr(ob.ptr()),
                    KernelArg::I32(n),
                ],
            )
            .unwrap();
        }
        assert_eq!(download::<i32>(&b, &ob, 8), want, "seed {seed}");
    }
}

#[test]
fn shuffle_modes_follow_cuda_semantics() {
    let v = |l: i32| 100 + l;
    let mut want = vec![0i32; 7 * 32];
    for l in 0..32i32 {
        want[l as usize] = v((l + 3) % 32);
        want[32 + l as usize] = v((l & !7) + ((l + 3) & 7));
        want[64 + l as usize] = if l % 16 >= 2 { v(l - 2) } else { v(l) };
        want[96 + l as usize] = if l % 16 + 3 < 16 { v(l + 3) } else { v(l) };
        want[128 + l as usize] = v(l ^ 5);
        // Width 4: lanes may read earlier groups, but reading a later group returns their own.
        want[160 + l as usize] = if (l ^ 4) < (l / 4) * 4 + 4 {
            v(l ^ 4)
        } else {
            v(l)
        };
        want[192 + l as usize] = if l % 2 == 0 { v((l + 2) % 32) } else { v(1) };
    }
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let ob = b.alloc_zeroed(7 * 32 * 4).unwrap();
        // SAFETY: (out [7*32] i32).
        unsafe {
            b.launch("emu_shfl_modes", dims(1, 32), &[KernelArg::Ptr(ob.ptr())])
                .unwrap()
        };
        let got: Vec<i32> = download(&b, &ob, 7 * 32);
        for (mode, (g, w)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
            assert_eq!(g, w, "seed {seed}: shuffle mode {mode}");
        }
    }
}

#[test]
fn barrier_and_warp_reductions() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let t = 96usize;
        let ob = b.alloc_zeroed(t * 5 * 4).unwrap();
        // SAFETY: (out [blockDim.x * 5] i32).
        unsafe {
            b.launch(
                "emu_sync_reductions",
                dims(1, t as u32),
                &[KernelArg::Ptr(ob.ptr())],
            )
            .unwrap()
        };
        let got: Vec<i32> = download(&b, &ob, t * 5);
        let count = (0..t).filter(|i| i % 3 == 0).count() as i32;
        for i in 0..t {
            let w = i / 32;
            let lane_sum: i32 = (w * 32..w * 32 + 32).map(|x| x as i32).sum();
            let want = [count, 1, 1, lane_sum, -((w * 32) as i32)];
            assert_eq!(&got[i * 5..i * 5 + 5], &want, "seed {seed}: thread {i}");
        }
    }
}
