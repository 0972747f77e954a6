//! EmuBackend as a `Backend`: buffers, copies, the GEMM in every dtype and transpose, the
//! registry of compiled kernels, and the emulator's speed (printed, not asserted).

use dorafuse::backend::{Backend, DevPtr, DeviceBuffer, GemmDesc, KernelArg, LaunchDims};
use dorafuse::dtype::DType;
use dorafuse::emu::{self, EmuBackend};

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));

#[test]
fn buffers_are_zeroed_aligned_and_bounds_checked() {
    let b = EmuBackend::new(1);
    for bytes in [0usize, 1, 7, 4096, 1 << 20] {
        let buf = b.alloc_zeroed(bytes).unwrap();
        assert_eq!(buf.ptr().0 % 256, 0, "{bytes} bytes");
        assert_eq!(buf.bytes(), bytes);
        assert!(buf.as_slice().iter().all(|&x| x == 0));
    }
    let mut buf = b.alloc_zeroed(8).unwrap();
    b.upload(&mut buf, &[1, 2, 3]).unwrap();
    let mut back = [0u8; 8];
    b.download(&buf, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 0, 0, 0, 0, 0]);
    assert!(b.upload(&mut buf, &[0; 9]).is_err());
    assert!(b.download(&buf, &mut [0; 9]).is_err());
    assert_eq!(b.name(), "emu");
    b.synchronize().unwrap();
}

#[test]
fn every_listed_kernel_is_compiled_into_the_emulator() {
    let compiled = emu::kernels();
    for (file, name) in KERNELS {
        let k = compiled.iter().find(|k| k.name == *name);
        let k = k.unwrap_or_else(|| panic!("{file}.cu: {name} is listed but not in the emulator"));
        assert!(
            !k.signature.contains('?'),
            "{name}: parameter type KernelArg cannot pass ({})",
            k.signature
        );
    }
    assert!(compiled
        .iter()
        .any(|k| k.name == "emu_block_reduce_f32" && k.signature == "ppi"));
}

#[test]
fn seeds_parse_and_pin() {
    assert_eq!(emu::parse_seed("42"), Some(42));
    assert_eq!(emu::parse_seed("0x2A"), Some(42));
    assert_eq!(emu::parse_seed("nope"), None);
    assert_eq!(EmuBackend::new(9).seed(), 9);
}

fn to_bytes(dtype: DType, v: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(v).to_vec(),
        DType::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DType::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

fn from_bytes(dtype: DType, b: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::cast_slice::<u8, f32>(b).to_vec(),
        DType::F16 => b
            .chunks(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => b
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

/// Rounds through `dtype` (what storing the input in that dtype does).
fn round(dtype: DType, v: &[f32]) -> Vec<f32> {
    from_bytes(dtype, &to_bytes(dtype, v))
}

#[test]
fn gemm_matches_a_plain_product_in_every_dtype_and_transpose() {
    let b = EmuBackend::new(1);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(m, n, k) in &[(1usize, 1usize, 1usize), (7, 33, 5), (33, 7, 129)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let (lda, ldb, ldc) = (
                    if ta { m } else { k } + 3,
                    if tb { k } else { n } + 1,
                    n + 2,
                );
                let a_rows = if ta { k } else { m };
                let b_rows = if tb { n } else { k };
                let av: Vec<f32> = (0..a_rows * lda)
                    .map(|i| ((i * 7) % 13) as f32 * 0.25 - 1.5)
                    .collect();
                let bv: Vec<f32> = (0..b_rows * ldb)
                    .map(|i| ((i * 5) % 11) as f32 * 0.5 - 2.0)
                    .collect();
                let cv: Vec<f32> = (0..m * ldc).map(|i| (i % 9) as f32 - 4.0).collect();
                let (ar, br, cr) = (round(dtype, &av), round(dtype, &bv), round(dtype, &cv));
                let up = |v: &[f32]| {
                    let bytes = to_bytes(dtype, v);
                    let mut buf = b.alloc_zeroed(bytes.len()).unwrap();
                    b.upload(&mut buf, &bytes).unwrap();
                    buf
                };
                let (abuf, bbuf, cbuf) = (up(&av), up(&bv), up(&cv));
                let (alpha, beta) = (0.5f32, -1.0f32);
                let g = GemmDesc {
                    m,
                    n,
                    k,
                    a: abuf.ptr(),
                    a_dtype: dtype,
                    lda,
                    trans_a: ta,
                    b: bbuf.ptr(),
                    b_dtype: dtype,
                    ldb,
                    trans_b: tb,
                    c: cbuf.ptr(),
                    c_dtype: dtype,
                    ldc,
                    alpha,
                    beta,
                };
                // SAFETY: each buffer holds its matrix with the strides in `g`.
                unsafe { b.gemm(&g).unwrap() };
                let mut out = vec![0u8; cbuf.bytes()];
                b.download(&cbuf, &mut out).unwrap();
                let got = from_bytes(dtype, &out);
                for i in 0..m {
                    for j in 0..ldc {
                        let idx = i * ldc + j;
                        if j >= n {
                            assert_eq!(got[idx], cr[idx], "{dtype:?}: padding C[{i}][{j}] changed");
                            continue;
                        }
                        let mut acc = 0f64;
                        for p in 0..k {
                            let a = if ta { ar[p * lda + i] } else { ar[i * lda + p] };
                            let bb = if tb { br[j * ldb + p] } else { br[p * ldb + j] };
                            acc += a as f64 * bb as f64;
                        }
                        let want = alpha as f64 * acc + beta as f64 * cr[idx] as f64;
                        let tol = match dtype {
                            DType::F32 => 1e-5,
                            DType::F16 => 1e-3,
                            DType::BF16 => 8e-3,
                        } * want.abs().max(1.0);
                        assert!(
                            ((got[idx] as f64) - want).abs() <= tol,
                            "{dtype:?} {m}x{n}x{k} ta {ta} tb {tb}: C[{i}][{j}] = {}, want {want}",
                            got[idx]
                        );
                    }
                }
            }
        }
    }
    // beta = 0 never reads C (it may hold NaN).
    let nan = b.alloc_zeroed(4).unwrap();
    let mut cbuf = b.alloc_zeroed(4).unwrap();
    b.upload(&mut cbuf, bytemuck::cast_slice(&[f32::NAN]))
        .unwrap();
    let mut one = b.alloc_zeroed(4).unwrap();
    b.upload(&mut one, bytemuck::cast_slice(&[2.0f32])).unwrap();
    let g = GemmDesc {
        m: 1,
        n: 1,
        k: 1,
        a: one.ptr(),
        a_dtype: DType::F32,
        lda: 1,
        trans_a: false,
        b: one.ptr(),
        b_dtype: DType::F32,
        ldb: 1,
        trans_b: false,
        c: cbuf.ptr(),
        c_dtype: DType::F32,
        ldc: 1,
        alpha: 1.0,
        beta: 0.0,
    };
    // SAFETY: 1x1 matrices in 4-byte buffers.
    unsafe { b.gemm(&g).unwrap() };
    let mut r = [0f32; 1];
    b.download(&cbuf, bytemuck::cast_slice_mut(&mut r)).unwrap();
    assert_eq!(r[0], 4.0);
    let _ = (nan, DevPtr(0));
}

#[test]
fn emulator_speed_is_reported() {
    // 64 blocks x 256 threads x 20 rounds of (barrier + 5 shuffles): prints the switch rate.
    let b = EmuBackend::new(1);
    let (grid, block, iters) = (64u32, 256u32, 20i32);
    let out = b.alloc_zeroed((grid * block) as usize * 4).unwrap();
    let s0 = emu::switch_count();
    let t0 = std::time::Instant::now();
    // SAFETY: (float* out [grid * block], int iters).
    unsafe {
        b.launch(
            "emu_switch_bench",
            LaunchDims {
                grid: [grid, 1, 1],
                block: [block, 1, 1],
                shared_bytes: 0,
            },
            &[KernelArg::Ptr(out.ptr()), KernelArg::I32(iters)],
        )
        .unwrap();
    }
    let dt = t0.elapsed().as_secs_f64();
    let switches = emu::switch_count() - s0;
    let mut v = vec![0f32; (grid * block) as usize];
    b.download(&out, bytemuck::cast_slice_mut(&mut v)).unwrap();
    // Each warp's lane values 0..31 sum to 496 per round.
    assert!(v.iter().all(|&x| x == 496.0 * iters as f32));
    println!(
        "emulator: {switches} context switches in {dt:.3} s ({:.1} M/s), {} thread-barriers",
        switches as f64 / dt / 1e6,
        grid as i64 * block as i64 * iters as i64
    );
}
