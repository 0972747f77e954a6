//! Shared by the CUDA tests (`tests/kernels/`): the backend on GPU 0, random inputs and
//! comparisons.
//!
//! Those tests are `#[ignore = "needs a CUDA GPU"]` and are run by scripts/gpu-check.sh with
//! `--ignored cuda`; without a device they fail, saying why (no test passes by skipping).
#![allow(dead_code)]

use dorafuse::cuda::{self, CudaBackend};
use dorafuse::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The backend on device 0; panics, saying why, when there is none or it fails to start.
pub fn backend() -> CudaBackend {
    if !cuda::device_available() {
        let why = cuda::device_count()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        panic!("this test needs a CUDA GPU and there is none ({why})");
    }
    CudaBackend::new(0)
        .unwrap_or_else(|e| panic!("a CUDA device is present but the backend failed: {e:#}"))
}

/// A deterministic generator per test and case.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in [-1, 1), distinct with probability ~1 (catches transposed indexing).
pub fn uniform(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A random tensor of `dtype` and `shape`, values uniform in [-scale, scale).
pub fn random_tensor(rng: &mut StdRng, dtype: DType, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = uniform(rng, n).into_iter().map(|x| x * scale).collect();
    Tensor::from_f32(dtype, shape.to_vec(), &v).unwrap()
}

/// Asserts `rel_l2(got, want) < tol` and no NaN; on failure prints the first mismatches.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: length {} vs {}",
        got.len(),
        want.len()
    );
    let err = dorafuse::tensor::rel_l2(got, want);
    if err < tol && got.iter().all(|v| v.is_finite()) {
        return;
    }
    let norm = (want.iter().map(|w| w * w).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut shown = 0;
    let mut msg = format!("{what}: rel L2 error {err:.3e} (tolerance {tol:.1e})\n");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if !g.is_finite() || (g - w).abs() > tol * norm.max(1e-30) * 4.0 {
            msg.push_str(&format!("  [{i}] got {g:.6e} want {w:.6e}\n"));
            shown += 1;
            if shown == 8 {
                break;
            }
        }
    }
    panic!("{msg}");
}
