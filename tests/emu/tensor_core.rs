//! The emulated tensor-core wrappers (kernels/tensor_core.cuh) against plain matrix products
//! and the PTX ISA's ldmatrix description, with index-valued inputs so that any fragment
//! layout mistake changes the result.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::EmuBackend;

fn seeds() -> Vec<u64> {
    vec![
        1,
        2,
        3,
        EmuBackend::from_env().expect("DORAFUSE_EMU_SEED").seed(),
    ]
}

fn warp() -> LaunchDims {
    LaunchDims {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
    }
}

#[derive(Clone, Copy, Debug)]
enum Ty {
    Bf16,
    F16,
}

fn bits(ty: Ty, v: f32) -> u16 {
    match ty {
        Ty::Bf16 => half::bf16::from_f32(v).to_bits(),
        Ty::F16 => half::f16::from_f32(v).to_bits(),
    }
}

/// A[i][k] = 16 i + k, B[k][n] = 8 k + n + 1 (bf16-exact up to 256), C[i][n] = 1000 + 8 i + n;
/// scaled for f16 so that values stay exact too. Returns (A, B, C, A·B + C in f64).
fn operands(ty: Ty) -> (Vec<u16>, Vec<u16>, Vec<f32>, Vec<f64>) {
    let s = match ty {
        Ty::Bf16 => 1.0,
        Ty::F16 => 0.5,
    };
    let a: Vec<f32> = (0..256).map(|i| i as f32 * s).collect();
    let b: Vec<f32> = (0..128).map(|i| (i + 1) as f32 * s).collect();
    let c: Vec<f32> = (0..128).map(|i| 1000.0 + i as f32).collect();
    let mut d = vec![0f64; 128];
    for i in 0..16 {
        for n in 0..8 {
            let mut acc = c[i * 8 + n] as f64;
            for k in 0..16 {
                acc += a[i * 16 + k] as f64 * b[k * 8 + n] as f64;
            }
            d[i * 8 + n] = acc;
        }
    }
    (
        a.iter().map(|&v| bits(ty, v)).collect(),
        b.iter().map(|&v| bits(ty, v)).collect(),
        c,
        d,
    )
}

fn run_mma(kernel: &str, ty: Ty, seed: u64) -> Vec<f32> {
    let be = EmuBackend::new(seed);
    let (a, b, c, _) = operands(ty);
    let mut ab = be.alloc_zeroed(512).unwrap();
    let mut bb = be.alloc_zeroed(256).unwrap();
    let mut cb = be.alloc_zeroed(512).unwrap();
    let db = be.alloc_zeroed(512).unwrap();
    be.upload(&mut ab, bytemuck::cast_slice(&a)).unwrap();
    be.upload(&mut bb, bytemuck::cast_slice(&b)).unwrap();
    be.upload(&mut cb, bytemuck::cast_slice(&c)).unwrap();
    // SAFETY: (A [16,16] u16, B [16,8] u16, C [16,8] f32, D [16,8] f32, int bf16).
    unsafe {
        be.launch(
            kernel,
            warp(),
            &[
                KernelArg::Ptr(ab.ptr()),
                KernelArg::Ptr(bb.ptr()),
                KernelArg::Ptr(cb.ptr()),
                KernelArg::Ptr(db.ptr()),
                KernelArg::I32(matches!(ty, Ty::Bf16) as i32),
            ],
        )
        .unwrap();
    }
    let mut d = vec![0f32; 128];
    be.download(&db, bytemuck::cast_slice_mut(&mut d)).unwrap();
    d
}

#[test]
fn mma_m16n8k16_fragments_match_the_product() {
    for ty in [Ty::Bf16, Ty::F16] {
        let (_, _, _, want) = operands(ty);
        for &seed in &seeds() {
            let got = run_mma("emu_mma_frag", ty, seed);
            for i in 0..128 {
                assert_eq!(
                    got[i] as f64,
                    want[i],
                    "{ty:?} seed {seed}: D[{}][{}]",
                    i / 8,
                    i % 8
                );
            }
        }
    }
}

#[test]
fn mma_with_ldmatrix_operands_matches_the_product() {
    for ty in [Ty::Bf16, Ty::F16] {
        let (_, _, c, want) = operands(ty);
        for &seed in &seeds() {
            let got = run_mma("emu_mma_ldmatrix", ty, seed);
            for i in 0..128 {
                // D = A·B + (A·B + C) = 2 (A·B + C) - C.
                let w = 2.0 * want[i] - c[i] as f64;
                assert_eq!(
                    got[i] as f64,
                    w,
                    "{ty:?} seed {seed}: D[{}][{}]",
                    i / 8,
                    i % 8
                );
            }
        }
    }
}

#[test]
fn ldmatrix_variants_follow_the_ptx_layout() {
    // M[m][r][c] = 256 m + 16 r + c + 1: every element distinct, none zero.
    let m: Vec<u16> = (0..256u16)
        .map(|i| (i / 64) * 256 + ((i / 8) % 8) * 16 + i % 8 + 1)
        .collect();
    let at = |mat: usize, r: usize, c: usize| m[mat * 64 + r * 8 + c] as u32;
    for &seed in &seeds() {
        let be = EmuBackend::new(seed);
        let mut mb = be.alloc_zeroed(512).unwrap();
        be.upload(&mut mb, bytemuck::cast_slice(&m)).unwrap();
        let ob = be.alloc_zeroed(5 * 32 * 4 * 4).unwrap();
        // SAFETY: (M [4,8,8] u16, out [5,32,4] u32).
        unsafe {
            be.launch(
                "emu_ldmatrix",
                warp(),
                &[KernelArg::Ptr(mb.ptr()), KernelArg::Ptr(ob.ptr())],
            )
            .unwrap();
        }
        let mut got = vec![0u32; 5 * 32 * 4];
        be.download(&ob, bytemuck::cast_slice_mut(&mut got))
            .unwrap();
        for (v, (num, trans)) in [(1, false), (2, false), (4, false), (2, true), (4, true)]
            .into_iter()
            .enumerate()
        {
            for lane in 0..32 {
                for reg in 0..num {
                    // PTX: lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix `reg`;
                    // with .trans, rows 2(l%4), 2(l%4)+1 of column l/4. Low half first.
                    let (q, t) = (lane / 4, lane % 4);
                    let (lo, hi) = if trans {
                        (at(reg, 2 * t, q), at(reg, 2 * t + 1, q))
                    } else {
                        (at(reg, q, 2 * t), at(reg, q, 2 * t + 1))
                    };
                    assert_eq!(
                        got[(v * 32 + lane) * 4 + reg],
                        lo | (hi << 16),
                        "seed {seed}: ldmatrix x{num}{} lane {lane} register {reg}",
                        if trans { ".trans" } else { "" }
                    );
                }
            }
        }
    }
}
