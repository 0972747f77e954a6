//! The CUDA backend itself, against the host: the embedded module holds every entry point of
//! kernels/kernels.list, copies round-trip, cuBLAS GEMM matches an f64 product in every dtype,
//! transpose and stride, and errors say what went wrong. The tests that need a device are
//! `#[ignore = "needs a CUDA GPU"]` and named `cuda_*` (scripts/gpu-check.sh runs them with
//! `--ignored cuda`); the others check what any machine, with or without one, must see.

use crate::gpu_util;

use dorafuse::backend::{Backend, DevPtr, DeviceBuffer, GemmDesc, KernelArg, LaunchDims};
use dorafuse::cuda::{self, CudaBackend};
use dorafuse::{DType, Tensor};
use gpu_util::{assert_close, backend, random_tensor, rng};

/// The fatbin that build.rs embedded (when nvcc was there) names every entry point (build.rs
/// also checked each one against ptxas's report for every architecture); without nvcc at
/// build time there is no fatbin, and the reason says how to get one.
#[test]
fn fatbin_has_every_entry_point() {
    let entries = cuda::entry_points();
    assert!(!entries.is_empty(), "kernels/kernels.list lists no kernels");
    let fatbin = cuda::fatbin();
    assert_eq!(
        fatbin.is_some(),
        cuda::KERNELS_COMPILED,
        "an embedded fatbin exactly when build.rs compiled the kernels"
    );
    let Some(fatbin) = fatbin else {
        assert!(
            cuda::NOT_COMPILED_REASON.contains("kernels were not compiled"),
            "{}",
            cuda::NOT_COMPILED_REASON
        );
        return;
    };
    for (file, name) in entries {
        let needle = name.as_bytes();
        assert!(
            fatbin.windows(needle.len()).any(|w| w == needle),
            "entry point {name} (kernels/{file}.cu) is not in the embedded fatbin"
        );
    }
}

/// On a GPU: every listed entry point loads from the module by name.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_module_loads_every_entry_point() {
    let b = backend();
    assert_eq!(b.load_all_kernels().unwrap(), cuda::entry_points().len());
}

/// What a machine without a GPU must see: `device_available` answers without panicking and
/// `CudaBackend::new` fails with a message that says why and what to do.
#[test]
fn gpu_backend_errors_name_the_missing_piece() {
    if cuda::device_available() {
        let n = cuda::device_count().unwrap();
        let err = format!("{:#}", CudaBackend::new(n).unwrap_err());
        assert!(err.contains(&format!("no CUDA device {n}")), "{err}");
        return;
    }
    let err = format!("{:#}", CudaBackend::new(0).unwrap_err());
    assert!(
        err.contains("no CUDA driver found") || err.contains("no CUDA device"),
        "unexpected error without a device: {err}"
    );
    if !cuda::KERNELS_COMPILED {
        assert!(cuda::NOT_COMPILED_REASON.contains("scripts/install-nvcc.sh"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_upload_download_round_trip() {
    let b = backend();
    let mut r = rng(1);
    for n in [0usize, 1, 7, 33, 4097, (1 << 20) + 3] {
        let src: Vec<u8> = (0..n).map(|_| rand::Rng::gen(&mut r)).collect();
        let mut buf = b.alloc_zeroed(n + 5).unwrap();
        assert_eq!(buf.bytes(), n + 5);
        assert_eq!(buf.ptr().0 % 256, 0, "allocation not 256-byte aligned");
        b.upload(&mut buf, &src).unwrap();
        let mut back = vec![0xAAu8; n + 5];
        b.download(&buf, &mut back).unwrap();
        assert_eq!(&back[..n], &src[..], "{n} bytes did not round-trip");
        assert!(
            back[n..].iter().all(|&x| x == 0),
            "alloc_zeroed tail not zero at n = {n}"
        );
        assert!(
            b.upload(&mut buf, &vec![0u8; n + 6]).is_err(),
            "oversized upload accepted"
        );
        assert!(
            b.download(&buf, &mut vec![0u8; n + 6]).is_err(),
            "oversized download accepted"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_launch_errors_are_clear() {
    let b = backend();
    let dims = LaunchDims {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: both launches are refused before reaching the device (unknown name, empty grid).
    let err = unsafe { b.launch("no_such_kernel_f32", dims, &[KernelArg::I32(0)]) }.unwrap_err();
    assert!(format!("{err:#}").contains("no_such_kernel_f32"), "{err:#}");
    let (_, name) = cuda::entry_points()[0];
    let empty = LaunchDims {
        grid: [0, 1, 1],
        ..dims
    };
    let err = unsafe { b.launch(name, empty, &[]) }.unwrap_err();
    assert!(format!("{err:#}").contains("empty grid"), "{err:#}");
    b.synchronize().unwrap();
}

/// Host f64 product of the rounded operands: `alpha·op(A)·op(B) + beta·C` over the `[m, n]`
/// window of C with row stride `ldc`.
fn gemm_ref(g: &GemmDesc, a: &[f64], b: &[f64], c: &[f64], alpha: f64, beta: f64) -> Vec<f64> {
    let mut out = c.to_vec();
    for i in 0..g.m {
        for j in 0..g.n {
            let mut acc = 0.0;
            for p in 0..g.k {
                let av = if g.trans_a {
                    a[p * g.lda + i]
                } else {
                    a[i * g.lda + p]
                };
                let bv = if g.trans_b {
                    b[j * g.ldb + p]
                } else {
                    b[p * g.ldb + j]
                };
                acc += av * bv;
            }
            out[i * g.ldc + j] = alpha * acc + beta * c[i * g.ldc + j];
        }
    }
    out
}

/// cuBLAS through `Backend::gemm` in every dtype (and f32 output from f16/bf16), both
/// transposes, padded strides, alpha and beta, at sizes off every tile; the padding of C must
/// stay untouched.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_gemm_matches_f64() {
    let be = backend();
    let mut r = rng(2);
    // DORAFUSE_GPU_QUICK=1 (the compute-sanitizer runs): the two small shapes only.
    let quick = std::env::var("DORAFUSE_GPU_QUICK").is_ok_and(|v| v == "1");
    let all = [
        (1usize, 1usize, 1usize),
        (7, 33, 129),
        (129, 65, 257),
        (16, 4097, 8),
    ];
    let shapes = if quick { &all[..2] } else { &all[..] };
    let (alpha, beta) = (0.75f32, 0.5f32);
    for dt in DType::ALL {
        for c_dt in [dt, DType::F32] {
            for &(m, n, k) in shapes {
                for (trans_a, trans_b) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                    let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                    let (lda, ldb, ldc) = (a_cols + 3, b_cols + 1, n + 2);
                    let a = random_tensor(&mut r, dt, &[a_rows, lda], 1.0);
                    let bm = random_tensor(&mut r, dt, &[b_rows, ldb], 1.0);
                    let c = random_tensor(&mut r, c_dt, &[m, ldc], 1.0);
                    let up = |t: &Tensor| {
                        let mut buf = be.alloc_zeroed(t.as_bytes().len()).unwrap();
                        be.upload(&mut buf, t.as_bytes()).unwrap();
                        buf
                    };
                    let (da, db, dc) = (up(&a), up(&bm), up(&c));
                    let g = GemmDesc {
                        m,
                        n,
                        k,
                        a: da.ptr(),
                        a_dtype: dt,
                        lda,
                        trans_a,
                        b: db.ptr(),
                        b_dtype: dt,
                        ldb,
                        trans_b,
                        c: dc.ptr(),
                        c_dtype: c_dt,
                        ldc,
                        alpha,
                        beta,
                    };
                    // SAFETY: the three buffers hold [a_rows, lda], [b_rows, ldb] and [m, ldc]
                    // elements of their dtypes, which is what g describes.
                    unsafe { be.gemm(&g) }.unwrap();
                    let mut out = vec![0u8; c.as_bytes().len()];
                    be.download(&dc, &mut out).unwrap();
                    let got = Tensor::from_bytes(c_dt, vec![m, ldc], &out)
                        .unwrap()
                        .to_f64();
                    let want = gemm_ref(
                        &g,
                        &a.to_f64(),
                        &bm.to_f64(),
                        &c.to_f64(),
                        alpha as f64,
                        beta as f64,
                    );
                    let what = format!(
                        "gemm {}→{} m={m} n={n} k={k} trans_a={trans_a} trans_b={trans_b}",
                        dt.name(),
                        c_dt.name()
                    );
                    let c0 = c.to_f64();
                    for i in 0..m {
                        for j in n..ldc {
                            assert_eq!(
                                got[i * ldc + j],
                                c0[i * ldc + j],
                                "{what}: C padding [{i}, {j}] written"
                            );
                        }
                    }
                    // f32 accumulation: the output's rounding dominates (f32 out: ~1e-7·√k).
                    assert_close(&what, &got, &want, c_dt.tolerance());
                }
            }
        }
    }
    // Mixed input dtypes are refused with a message naming both.
    let buf = be.alloc_zeroed(64).unwrap();
    let g = GemmDesc {
        m: 1,
        n: 1,
        k: 1,
        a: buf.ptr(),
        a_dtype: DType::BF16,
        lda: 1,
        trans_a: false,
        b: buf.ptr(),
        b_dtype: DType::F16,
        ldb: 1,
        trans_b: false,
        c: DevPtr(buf.ptr().0 + 16),
        c_dtype: DType::F32,
        ldc: 1,
        alpha: 1.0,
        beta: 0.0,
    };
    // SAFETY: refused before any device access.
    let err = unsafe { be.gemm(&g) }.unwrap_err();
    assert!(
        format!("{err:#}").contains("bf16") && format!("{err:#}").contains("f16"),
        "{err:#}"
    );
}

/// The event timer reads a finite, non-negative time for real work (no assertion on speed).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_event_timer_reads_a_time() {
    let b = backend();
    let t = b.timer().unwrap();
    let mut buf = b.alloc_zeroed(1 << 20).unwrap();
    t.start().unwrap();
    b.upload(&mut buf, &vec![1u8; 1 << 20]).unwrap();
    t.stop().unwrap();
    let ms = t.elapsed_ms().unwrap();
    assert!(ms.is_finite() && ms >= 0.0, "elapsed {ms} ms");
}

/// A backend on the caller's stream queues there: work from two backends sharing one stream
/// is ordered without any synchronisation between them.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_from_stream_orders_on_the_callers_stream() {
    let b1 = backend();
    let b2 = CudaBackend::from_stream(b1.stream().clone()).unwrap();
    let data: Vec<u8> = (0..100_003u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut buf = b1.alloc_zeroed(data.len()).unwrap();
    b1.upload(&mut buf, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    b2.download(&buf, &mut back).unwrap();
    assert_eq!(back, data);
}
