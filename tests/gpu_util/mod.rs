//! Shared by the GPU tests (`tests/gpu_*.rs`): the skip rule, random inputs and comparisons.
//!
//! Skip rule: without a CUDA device a GPU test prints "skipped: no CUDA device" and passes;
//! with `DORAFUSE_REQUIRE_GPU=1` (set by scripts/gpu-check.sh) it fails instead, so a GPU run
//! can never pass by skipping. With a device, a backend that fails to start fails the test.
#![allow(dead_code)]

use dorafuse::cuda::{self, CudaBackend};
use dorafuse::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The backend on device 0, or `None` (after printing why) when the test must skip.
pub fn backend(test: &str) -> Option<CudaBackend> {
    if !cuda::device_available() {
        let why = cuda::device_count()
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        if std::env::var("DORAFUSE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("{test}: DORAFUSE_REQUIRE_GPU=1 but there is no CUDA device ({why})");
        }
        println!("{test}: skipped: no CUDA device ({why})");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(b) => {
            println!("{test}: on {}", b.device_description().unwrap_or_default());
            Some(b)
        }
        Err(e) => panic!("{test}: a CUDA device is present but the backend failed: {e:#}"),
    }
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
