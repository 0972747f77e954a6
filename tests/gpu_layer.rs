//! Every kernel path on a real GPU against the float64 reference (`cpu::reference`): the host
//! entry points (`kernels::run` forward + detached and exact backward, `merged_weight`)
//! and the device-level API (`DoraLayer` inference forward with a cached g, supplied and
//! in-place base, adapter changes). Random inputs at sizes off every tile, every dtype, ranks
//! 1..=256, DoRA and plain LoRA, with and without bias, both weight layouts, and f32 adapters
//! beside 16-bit activations.
//!
//! Without a device these tests print "skipped: no CUDA device" and pass (the same paths run on
//! the emulator in tests/kernels_*.rs); with `DORAFUSE_REQUIRE_GPU=1` they fail instead.
//! `DORAFUSE_GPU_QUICK=1` (the sanitizer runs) keeps a few cases per test.

mod gpu_util;

use dorafuse::backend::{Backend, DeviceBuffer};
use dorafuse::cpu::reference;
use dorafuse::cuda::CudaBackend;
use dorafuse::kernels::{self, Base, DevTensor, DoraLayer, DoraWeights};
use dorafuse::{DType, GradMode, Layer, Tensor};
use gpu_util::{assert_close, backend, random_tensor, rng};
use rand::rngs::StdRng;
use rand::Rng;

fn quick() -> bool {
    std::env::var("DORAFUSE_GPU_QUICK").is_ok_and(|v| v == "1")
}

/// One layer configuration.
#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: DType,
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    dora: bool,
    bias: bool,
    fan_in_fan_out: bool,
    /// A and B in f32 beside 16-bit activations and W0 (PEFT's upcast adapters).
    adapter_f32: bool,
}

/// The cases: every dtype × DoRA/LoRA, sizes that are multiples of no tile (1, 7, 33, 129,
/// 4097 ...), ranks 1, 7, 16, 64, 256 and odd ones, and both layouts and bias settings spread
/// over them.
fn cases() -> Vec<Case> {
    let shapes: &[(usize, usize, usize, usize)] = if quick() {
        &[(7, 33, 65, 7), (33, 129, 47, 16)]
    } else {
        &[
            (1, 33, 129, 1),
            (7, 129, 65, 7),
            (33, 65, 129, 16),
            (17, 257, 97, 33),
            (129, 96, 160, 64),
            (5, 4097, 33, 16),
            (3, 31, 4097, 8),
            (65, 129, 257, 256),
            (2, 300, 70, 255),
        ]
    };
    let mut out = Vec::new();
    for (i, &(t, d_in, d_out, r)) in shapes.iter().enumerate() {
        for dtype in DType::ALL {
            for dora in [true, false] {
                out.push(Case {
                    dtype,
                    t,
                    d_in,
                    d_out,
                    r,
                    dora,
                    bias: (i + dora as usize) % 2 == 0,
                    fan_in_fan_out: i % 3 == 1,
                    adapter_f32: dtype != DType::F32 && (i + dora as usize) % 2 == 1,
                });
            }
        }
    }
    out
}

/// A random layer scaled like a real one (W0 ~ 1/√d_in, so n ~ 1 and g is of order 1), all
/// tensors in the case dtype except m and the bias, which are f32 as PEFT keeps them.
fn layer_for(r: &mut StdRng, c: &Case) -> Layer {
    let w_scale = 1.0 / (c.d_in as f32).sqrt();
    let wshape = if c.fan_in_fan_out {
        [c.d_in, c.d_out]
    } else {
        [c.d_out, c.d_in]
    };
    let adapter_dtype = if c.adapter_f32 { DType::F32 } else { c.dtype };
    Layer {
        weight: random_tensor(r, c.dtype, &wshape, w_scale * 1.7),
        bias: c
            .bias
            .then(|| random_tensor(r, DType::F32, &[c.d_out], 0.5)),
        lora_a: random_tensor(r, adapter_dtype, &[c.r, c.d_in], w_scale * 1.7),
        lora_b: random_tensor(r, adapter_dtype, &[c.d_out, c.r], 0.5),
        magnitude: c.dora.then(|| {
            let m: Vec<f32> = (0..c.d_out).map(|_| r.gen_range(0.5f32..1.5)).collect();
            Tensor::from_f32(DType::F32, vec![c.d_out], &m).unwrap()
        }),
        scaling: 2.0 / c.r as f64,
        fan_in_fan_out: c.fan_in_fan_out,
    }
}

fn name(c: &Case) -> String {
    format!(
        "{} {} T={} d_in={} d_out={} r={}{}{}{}",
        if c.dora { "DoRA" } else { "LoRA" },
        c.dtype.name(),
        c.t,
        c.d_in,
        c.d_out,
        c.r,
        if c.bias { " bias" } else { "" },
        if c.fan_in_fan_out {
            " fan_in_fan_out"
        } else {
            ""
        },
        if c.adapter_f32 { " f32-adapter" } else { "" }
    )
}

/// Forward and both backward modes through `kernels::run` on the GPU against
/// `cpu::reference::run_f64`, each output against the tolerance of its dtype.
#[test]
fn gpu_run_layer_matches_f64_reference() {
    let Some(b) = backend("gpu_run_layer_matches_f64_reference") else {
        return;
    };
    let mut r = rng(11);
    let all = cases();
    for (i, c) in all.iter().enumerate() {
        let layer = layer_for(&mut r, c);
        let x = random_tensor(&mut r, c.dtype, &[c.t, c.d_in], 1.0);
        let gy = random_tensor(&mut r, c.dtype, &[c.t, c.d_out], 1.0);
        // The exact gradient only differs for DoRA; run it on every other DoRA case.
        let modes: &[GradMode] = if c.dora && i % 2 == 0 {
            &[GradMode::Detached, GradMode::Exact]
        } else {
            &[GradMode::Detached]
        };
        for &mode in modes {
            let what = format!("{} {mode:?}", name(c));
            let got = kernels::run(&b, &layer, &x, Some(&gy), mode)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
            let tol = c.dtype.tolerance();
            assert_close(&format!("{what}: y"), &got.y.to_f64(), &want.y, tol);
            let g = got.grads.as_ref().expect("grad_y was given");
            assert_close(
                &format!("{what}: grad_x"),
                &g.grad_x.to_f64(),
                &want.grad_x,
                tol,
            );
            assert_close(
                &format!("{what}: grad_lora_A"),
                &g.grad_lora_a.to_f64(),
                &want.grad_lora_a,
                tol,
            );
            assert_close(
                &format!("{what}: grad_lora_B"),
                &g.grad_lora_b.to_f64(),
                &want.grad_lora_b,
                tol,
            );
            match (&g.grad_magnitude, &want.grad_magnitude) {
                (Some(gm), Some(wm)) => {
                    // m is f32, but its gradient sums dy ⊙ z over tokens computed in the case
                    // dtype: the case dtype's tolerance applies.
                    assert_close(&format!("{what}: grad_magnitude"), &gm.to_f64(), wm, tol)
                }
                (None, None) => assert!(!c.dora),
                (got_m, want_m) => panic!(
                    "{what}: grad_magnitude present on GPU {} vs reference {}",
                    got_m.is_some(),
                    want_m.is_some()
                ),
            }
        }
        // Forward only (no grad_y) must give the same y and no gradients.
        let fwd = kernels::run(&b, &layer, &x, None, GradMode::Detached).unwrap();
        assert!(fwd.grads.is_none());
        let want = reference::run_f64(&layer, &x, None, GradMode::Detached).unwrap();
        assert_close(
            &format!("{}: forward-only y", name(c)),
            &fwd.y.to_f64(),
            &want.y,
            c.dtype.tolerance(),
        );
    }
    println!("gpu_run_layer_matches_f64_reference: {} cases", all.len());
}

/// `kernels::merged_weight` (W' = diag(g)·(W0 + s·B·A)) on the GPU against the f64 merge.
#[test]
fn gpu_merged_weight_matches_f64() {
    let Some(b) = backend("gpu_merged_weight_matches_f64") else {
        return;
    };
    let mut r = rng(12);
    for c in cases() {
        let layer = layer_for(&mut r, &c);
        let got =
            kernels::merged_weight(&b, &layer).unwrap_or_else(|e| panic!("{}: {e:#}", name(&c)));
        let want = reference::merged_weight_f64(&layer).unwrap();
        let got: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("{}: merged weight", name(&c)),
            &got,
            &want,
            c.dtype.tolerance(),
        );
    }
}

/// Uploads `t` as is (dtype kept).
fn up(b: &CudaBackend, t: &Tensor) -> dorafuse::cuda::CudaBuffer {
    let mut buf = b.alloc_zeroed(t.as_bytes().len()).unwrap();
    b.upload(&mut buf, t.as_bytes()).unwrap();
    buf
}

fn down(
    b: &CudaBackend,
    buf: &dorafuse::cuda::CudaBuffer,
    dtype: DType,
    shape: &[usize],
) -> Vec<f64> {
    let mut bytes = vec![0u8; shape.iter().product::<usize>() * dtype.size()];
    b.download(buf, &mut bytes).unwrap();
    Tensor::from_bytes(dtype, shape.to_vec(), &bytes)
        .unwrap()
        .to_f64()
}

/// The device-level API an inference engine uses: `DoraLayer::forward` with the base computed
/// by cuBLAS, supplied by the caller, or already in y (in place) all give the reference y; g is
/// cached and equals the CPU's; after the magnitude changes in place and `invalidate`, the
/// next forward uses the new g; the second forward allocates no more workspace.
#[test]
fn gpu_device_api_inference_forward() {
    let Some(b) = backend("gpu_device_api_inference_forward") else {
        return;
    };
    let mut r = rng(13);
    let shapes: &[(usize, usize, usize, usize)] = if quick() {
        &[(7, 65, 33, 16)]
    } else {
        &[(1, 129, 65, 16), (33, 257, 129, 7), (4, 96, 4097, 64)]
    };
    for &(t, d_in, d_out, rank) in shapes {
        for dtype in DType::ALL {
            let c = Case {
                dtype,
                t,
                d_in,
                d_out,
                r: rank,
                dora: true,
                bias: true,
                fan_in_fan_out: false,
                adapter_f32: false,
            };
            let what = name(&c);
            let mut layer = layer_for(&mut r, &c);
            let x = random_tensor(&mut r, dtype, &[t, d_in], 1.0);
            let (w_buf, a_buf, b_buf) = (
                up(&b, &layer.weight),
                up(&b, &layer.lora_a),
                up(&b, &layer.lora_b),
            );
            let bias_buf = up(&b, layer.bias.as_ref().unwrap());
            let m_buf = up(&b, layer.magnitude.as_ref().unwrap());
            let x_buf = up(&b, &x);
            let weights = DoraWeights {
                weight: DevTensor::of(&w_buf, dtype),
                fan_in_fan_out: false,
                bias: Some(DevTensor::of(&bias_buf, DType::F32)),
                lora_a: DevTensor::of(&a_buf, dtype),
                lora_b: DevTensor::of(&b_buf, dtype),
                magnitude: Some(DevTensor::of(&m_buf, DType::F32)),
                scaling: layer.scaling as f32,
                d_in,
                d_out,
                r: rank,
            };
            let mut dl = DoraLayer::new(&b, weights).unwrap();
            let y_buf = b.alloc_zeroed(t * d_out * dtype.size()).unwrap();
            let xt = DevTensor::of(&x_buf, dtype);
            let yt = DevTensor::of(&y_buf, dtype);
            let tol = dtype.tolerance();
            let want = reference::run_f64(&layer, &x, None, GradMode::Detached)
                .unwrap()
                .y;

            dl.forward(&b, &xt, t, Base::Compute, &yt)
                .unwrap_or_else(|e| panic!("{what}: {e:#}"));
            assert_close(
                &format!("{what}: forward (base by cuBLAS)"),
                &down(&b, &y_buf, dtype, &[t, d_out]),
                &want,
                tol,
            );
            let ws = dl.workspace_bytes();

            // g from the device cache against the CPU path's.
            let g_ptr = dl.magnitude_scale(&b).unwrap().expect("DoRA has a g");
            assert_eq!(g_ptr.0 % 4, 0);
            let g_cpu: Vec<f64> = dorafuse::cpu::magnitude_scale(&layer)
                .unwrap()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let g_dev = {
                let out = b.alloc_zeroed(4 * d_out).unwrap();
                // SAFETY: g is d_out f32 in the layer's cache and `out` holds 4·d_out bytes,
                // both of this context; the copy is ordered on the backend's stream.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(
                        out.ptr().0,
                        g_ptr.0,
                        4 * d_out,
                        b.stream().cu_stream(),
                    )
                }
                .unwrap();
                down(&b, &out, DType::F32, &[d_out])
            };
            assert_close(&format!("{what}: cached g"), &g_dev, &g_cpu, 1e-5);

            // Base supplied by the caller: y = 0 first, base in its own buffer.
            let base_host = {
                let mut l0 = layer.clone();
                l0.lora_b =
                    Tensor::from_f32(dtype, vec![d_out, rank], &vec![0.0; d_out * rank]).unwrap();
                l0.magnitude = None;
                l0.bias = None;
                reference::run_f64(&l0, &x, None, GradMode::Detached)
                    .unwrap()
                    .y
            };
            let base_t = Tensor::from_f64(dtype, vec![t, d_out], &base_host).unwrap();
            let base_buf = up(&b, &base_t);
            let y2 = b.alloc_zeroed(t * d_out * dtype.size()).unwrap();
            dl.forward(
                &b,
                &xt,
                t,
                Base::Supplied(DevTensor::of(&base_buf, dtype)),
                &DevTensor::of(&y2, dtype),
            )
            .unwrap_or_else(|e| panic!("{what}: supplied base: {e:#}"));
            assert_close(
                &format!("{what}: forward (supplied base)"),
                &down(&b, &y2, dtype, &[t, d_out]),
                &want,
                tol,
            );

            // In place: y holds the base and is overwritten.
            let mut y3 = b.alloc_zeroed(t * d_out * dtype.size()).unwrap();
            b.upload(&mut y3, base_t.as_bytes()).unwrap();
            dl.forward(&b, &xt, t, Base::InPlace, &DevTensor::of(&y3, dtype))
                .unwrap_or_else(|e| panic!("{what}: in place: {e:#}"));
            assert_close(
                &format!("{what}: forward (in place)"),
                &down(&b, &y3, dtype, &[t, d_out]),
                &want,
                tol,
            );
            assert_eq!(
                dl.workspace_bytes(),
                ws,
                "{what}: the steady state allocated more workspace"
            );

            // The optimiser changes m in place; invalidate; the next forward uses the new g.
            let m2: Vec<f32> = (0..d_out).map(|_| r.gen_range(0.5f32..1.5)).collect();
            let m2t = Tensor::from_f32(DType::F32, vec![d_out], &m2).unwrap();
            // m_buf is borrowed by the layer's weights, as an engine's parameter would be: write
            // it the way an optimiser kernel would, through its address.
            // SAFETY: m_buf holds d_out f32; the copy is ordered on the backend's stream before
            // the next forward, and the host bytes are staged before the call returns.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    m_buf.ptr().0,
                    m2t.as_bytes(),
                    b.stream().cu_stream(),
                )
            }
            .unwrap();
            dl.invalidate();
            layer.magnitude = Some(m2t);
            let want2 = reference::run_f64(&layer, &x, None, GradMode::Detached)
                .unwrap()
                .y;
            dl.forward(&b, &xt, t, Base::Compute, &yt).unwrap();
            assert_close(
                &format!("{what}: forward after invalidate"),
                &down(&b, &y_buf, dtype, &[t, d_out]),
                &want2,
                tol,
            );
            b.synchronize().unwrap();
        }
    }
}
