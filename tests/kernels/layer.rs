//! Every fused kernel against the float64 reference (`cpu::reference`), written once over
//! [`TestBackend`]: on the CPU emulator (the very `.cu` sources) under several seeds (thread
//! schedules and shared-memory garbage), and on a GPU (the `::cuda` instances, ignored unless
//! asked for), at sizes off every tile, ranks 1, 7, 16, 64, 256, every dtype, fan_in_fan_out,
//! bias / no bias, LoRA, the exact gradient, the in-place and supplied-base forwards and the
//! cached-g inference forward. On a GPU the tests add larger shapes (4097 wide, ranks up to
//! 256, 129 tokens) that the emulator is too slow for.
//!
//! Tolerances: `DType::tolerance()` (rel-L2 vs f64: f32 1e-5, f16 1e-3, bf16 8e-3). NaN never
//! passes. Emulator sizes are small on purpose: it runs each thread as a fiber.

use crate::device::{test_device, TestBackend};
use dorafuse::backend::{Backend, DeviceBuffer};
use dorafuse::cpu::reference;
use dorafuse::kernels::{self, spec, Base, DevTensor, DoraLayer, DoraWeights, GradTargets};
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, GradMode, Layer, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// What a case varies.
#[derive(Clone, Copy, Debug)]
struct Case {
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    dtype: DType,
    dora: bool,
    bias: bool,
    fifo: bool,
    /// lora_A / lora_B stored in f32 beside 16-bit W0 and x (PEFT's default mix).
    a32: bool,
}

fn normal(rng: &mut impl Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let v: f64 = StandardNormal.sample(rng);
            v * scale
        })
        .collect()
}

/// A random layer and input: distinct values everywhere, a magnitude not equal to the norm
/// (so g ≠ 1), a non-trivial scaling.
fn make(c: Case, seed: u64) -> (Layer, Tensor, Tensor) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 7919 + c.r as u64);
    let dt = c.dtype;
    let adt = if c.a32 { DType::F32 } else { dt };
    let w = normal(&mut rng, c.d_out * c.d_in, 1.0 / (c.d_in as f64).sqrt());
    let wshape = if c.fifo {
        vec![c.d_in, c.d_out]
    } else {
        vec![c.d_out, c.d_in]
    };
    let layer = Layer {
        weight: Tensor::from_f64(dt, wshape, &w).unwrap(),
        bias: c
            .bias
            .then(|| Tensor::from_f64(dt, vec![c.d_out], &normal(&mut rng, c.d_out, 0.5)).unwrap()),
        lora_a: Tensor::from_f64(
            adt,
            vec![c.r, c.d_in],
            &normal(&mut rng, c.r * c.d_in, 1.0 / (c.d_in as f64).sqrt()),
        )
        .unwrap(),
        lora_b: Tensor::from_f64(
            adt,
            vec![c.d_out, c.r],
            &normal(&mut rng, c.d_out * c.r, 0.3),
        )
        .unwrap(),
        magnitude: c.dora.then(|| {
            let m: Vec<f64> = (0..c.d_out).map(|_| rng.gen_range(0.5..1.5)).collect();
            Tensor::from_f64(DType::F32, vec![c.d_out], &m).unwrap()
        }),
        scaling: 2.0 / (c.r as f64).sqrt(),
        fan_in_fan_out: c.fifo,
    };
    let x = Tensor::from_f64(dt, vec![c.t, c.d_in], &normal(&mut rng, c.t * c.d_in, 1.0)).unwrap();
    let gy = Tensor::from_f64(
        dt,
        vec![c.t, c.d_out],
        &normal(&mut rng, c.t * c.d_out, 1.0),
    )
    .unwrap();
    (layer, x, gy)
}

/// Fails with the first few mismatches when `got` is not within `tol` of `want`.
fn check(what: &str, c: &Case, seed: u64, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let e = rel_l2(got, want);
    if e.is_nan() || e > tol {
        let bad: Vec<String> = got
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(_, (g, w))| g.is_nan() || (*g - *w).abs() > tol * (1.0 + w.abs()))
            .take(5)
            .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!("{what} {c:?} seed {seed}: rel-L2 {e:e} > {tol:e}; first mismatches: {bad:?}");
    }
}

fn run_case<B: TestBackend>(c: Case, mode: GradMode) {
    for &seed in B::SEEDS {
        let dev = B::with_seed(seed);
        let (layer, x, gy) = make(c, seed);
        let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
        let got = kernels::run(&dev, &layer, &x, Some(&gy), mode)
            .unwrap_or_else(|e| panic!("{c:?} seed {seed}: {e:#}"));
        let tol = c.dtype.tolerance();
        check("y", &c, seed, &got.y.to_f64(), &want.y, tol);
        let g = got.grads.expect("grads");
        check("grad_x", &c, seed, &g.grad_x.to_f64(), &want.grad_x, tol);
        check(
            "grad_lora_A",
            &c,
            seed,
            &g.grad_lora_a.to_f64(),
            &want.grad_lora_a,
            tol,
        );
        check(
            "grad_lora_B",
            &c,
            seed,
            &g.grad_lora_b.to_f64(),
            &want.grad_lora_b,
            tol,
        );
        match (&g.grad_magnitude, &want.grad_magnitude) {
            (Some(gm), Some(wm)) => check("grad_magnitude", &c, seed, &gm.to_f64(), wm, tol),
            (None, None) => assert!(!c.dora),
            other => panic!("grad_magnitude presence differs: {other:?}"),
        }
    }
}

/// Shapes off every tile (16-row, 64-column, 32-chunk tiles), one per rank of the ladder.
const SHAPES: [(usize, usize, usize, usize); 5] = [
    (1, 7, 33, 1),
    (33, 70, 65, 7),
    (17, 129, 33, 16),
    (7, 65, 70, 64),
    (5, 33, 17, 256),
];

fn case(i: usize, dtype: DType, dora: bool) -> Case {
    let (t, d_in, d_out, r) = SHAPES[i];
    Case {
        t,
        d_in,
        d_out,
        r,
        dtype,
        dora,
        bias: i % 2 == 0,
        fifo: i % 3 == 1,
        a32: false,
    }
}

fn dora_detached_every_dtype_and_rank<B: TestBackend>() {
    for dt in DType::ALL {
        for i in 0..SHAPES.len() {
            run_case::<B>(case(i, dt, true), GradMode::Detached);
        }
    }
}
test_device!(dora_detached_every_dtype_and_rank);

fn dora_exact_gradient<B: TestBackend>() {
    for dt in DType::ALL {
        for i in [0, 2, 3] {
            run_case::<B>(case(i, dt, true), GradMode::Exact);
        }
    }
}
test_device!(dora_exact_gradient);

/// f32 lora_A / lora_B beside f16/bf16 W0 and x: the `_a32` kernels read the adapters as
/// stored, so the adapter gradients keep f32 accuracy (PEFT computes that branch in f32).
fn f32_adapters_beside_16_bit_activations<B: TestBackend>() {
    for dt in [DType::F16, DType::BF16] {
        for i in [0, 2, 3, 4] {
            for dora in [true, false] {
                let c = Case {
                    a32: true,
                    ..case(i, dt, dora)
                };
                run_case::<B>(c, GradMode::Detached);
            }
        }
        run_case::<B>(
            Case {
                a32: true,
                ..case(1, dt, true)
            },
            GradMode::Exact,
        );
    }
}
test_device!(f32_adapters_beside_16_bit_activations);

fn lora_through_the_same_kernels<B: TestBackend>() {
    for dt in DType::ALL {
        for i in [1, 2, 4] {
            run_case::<B>(case(i, dt, false), GradMode::Detached);
        }
    }
}
test_device!(lora_through_the_same_kernels);

fn fan_in_fan_out_and_bias_every_combination<B: TestBackend>() {
    for fifo in [false, true] {
        for bias in [false, true] {
            let c = Case {
                fifo,
                bias,
                ..case(1, DType::BF16, true)
            };
            run_case::<B>(c, GradMode::Detached);
        }
    }
}
test_device!(fan_in_fan_out_and_bias_every_combination);

fn norm_every_variant_against_f64<B: TestBackend>() {
    for dt in DType::ALL {
        for (i, &(_, d_in, d_out, r)) in SHAPES.iter().enumerate() {
            for (fifo, a32) in [
                (false, false),
                (true, false),
                (i % 2 == 0, dt != DType::F32),
            ] {
                let c = Case {
                    fifo,
                    a32,
                    d_out: d_out + 64 * (i % 2), // also cross the 64-row tile of v2
                    ..case(i, dt, true)
                };
                let (layer, _, _) = make(c, 11);
                let want_n = reference::norm_f64(&layer).unwrap();
                let m = layer.magnitude.as_ref().unwrap().to_f64();
                let want_g: Vec<f64> = m
                    .iter()
                    .zip(&want_n)
                    .map(|(m, n)| m / n.max(dorafuse::layer::NORM_EPS))
                    .collect();
                let adt = layer.lora_a.dtype();
                let variants = spec::candidates(spec::Op::Norm, dt, adt, r);
                assert!(!variants.is_empty());
                for v in variants {
                    for &seed in B::SEEDS {
                        let dev = B::with_seed(seed);
                        let (n, g) = kernels::norm(&dev, &layer, Some(v))
                            .unwrap_or_else(|e| panic!("{} {c:?}: {e:#}", v.prefix));
                        let n: Vec<f64> = n.iter().map(|&v| v as f64).collect();
                        let g: Vec<f64> = g.unwrap().iter().map(|&v| v as f64).collect();
                        // n and g are f32 outputs: the error left is the dtype's (inputs
                        // exact), far inside the f32 bar for f32 and the dtype bar otherwise.
                        let tol = 1e-5;
                        check(&format!("n ({})", v.prefix), &c, seed, &n, &want_n, tol);
                        check(&format!("g ({})", v.prefix), &c, seed, &g, &want_g, tol);
                    }
                }
                let _ = d_in;
            }
        }
    }
}
test_device!(norm_every_variant_against_f64);

/// Largest relative error of `got` against `want` over the rows.
fn max_rel(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).abs() / w.abs().max(1e-30))
        .fold(0.0, f64::max)
}

/// f32 adapters beside f16/bf16 W0 on tensor cores (`dora_norm_v2_*_a32`, each f32 split into
/// three bf16 terms; bound ≈ 4·2⁻²⁴ per product, kernels/norm.cu) keep f32 accuracy against
/// the f32 CUDA-core path (`dora_norm_v1_*_a32`): per row, n's relative error to the f64
/// reference is within twice v1's, or within the tensor-core bound when that is larger. The
/// tensor cores do not round their f32 sums to nearest: each mma aligns its addends to the
/// largest and truncates (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor
/// cores", PeerJ Comput. Sci. 7:e330, 2021), up to one f32 ulp (2·2⁻²⁴) per mma, one-sided. An
/// element of B·A takes 6·⌈r/16⌉ mma, so the bound is (4 + 12·⌈r/16⌉)·2⁻²⁴: 1.7e-6 at r = 17,
/// 5.2e-6 at r = 112. Dropping a term of the split (≈ 2⁻¹⁶ = 1.5e-5) or splitting into two
/// terms (≈ 3·2⁻¹⁶) still fails it. The emulator rounds each mma's sums to nearest, and there
/// v2 is held within twice v1 (or 2·2⁻²⁴). With W0 = 0 the norm is that of s·B·A alone,
/// where any loss shows. Sizes off every tile (d_out off 64 rows, d_in off the 64-column
/// chunk, ranks off 16 and off the 32-rank chunk, up to the largest v2 takes with f32
/// adapters), both layouts, d_in a multiple of 8 (16-byte loads) and not (scalar). Each
/// case's two errors are printed (`--nocapture`).
fn norm_v2_a32_as_accurate_as_the_f32_cuda_core_path<B: TestBackend>() {
    let v1 = spec::VARIANTS
        .iter()
        .find(|v| v.op == spec::Op::Norm && v.version == 1)
        .unwrap();
    let v2 = spec::VARIANTS
        .iter()
        .find(|v| v.op == spec::Op::Norm && v.version == 2)
        .unwrap();
    let shapes = [
        (65, 129, 17),
        (130, 200, 40),
        (33, 72, spec::NORM_V2_A32_MAX_RANK),
    ];
    for dt in [DType::BF16, DType::F16] {
        for (i, &(d_out, d_in, r)) in shapes.iter().enumerate() {
            for fifo in [false, true] {
                for zero_w0 in [true, false] {
                    let c = Case {
                        fifo,
                        a32: true,
                        d_out,
                        d_in,
                        r,
                        ..case(1, dt, true)
                    };
                    let (mut layer, _, _) = make(c, 23 + i as u64);
                    if zero_w0 {
                        let shape = layer.weight.shape().to_vec();
                        let zeros = vec![0.0; layer.weight.len()];
                        layer.weight = Tensor::from_f64(dt, shape, &zeros).unwrap();
                    }
                    let want = reference::norm_f64(&layer).unwrap();
                    assert!(v2.supports(dt, DType::F32, r), "{c:?}");
                    assert_eq!(
                        spec::select(spec::Op::Norm, dt, DType::F32, r).map(|v| v.version),
                        Some(2),
                        "{c:?}: the dispatcher sends f32 adapters to tensor cores"
                    );
                    for &seed in B::SEEDS {
                        let dev = B::with_seed(seed);
                        let (n1, _) = kernels::norm(&dev, &layer, Some(v1)).unwrap();
                        let (n2, _) = kernels::norm(&dev, &layer, Some(v2)).unwrap();
                        let (e1, e2) = (max_rel(&n1, &want), max_rel(&n2, &want));
                        let mma = 6 * r.div_ceil(16);
                        let floor = if B::MMA_ROUNDS_TO_NEAREST {
                            2.0 // f32::EPSILON
                        } else {
                            (4 + 2 * mma) as f64
                        } * 2f64.powi(-24);
                        let bound = (2.0 * e1).max(floor);
                        eprintln!(
                            "a32 {dt:?} d_out {d_out} d_in {d_in} r {r} fifo {fifo} W0 = 0: \
                             {zero_w0}: v1 {e1:.3e}, v2 {e2:.3e} ({:.2} ulp of 2^-24), bound \
                             {bound:.3e}",
                            e2 / 2f64.powi(-24)
                        );
                        assert!(
                            e2 <= bound,
                            "{c:?} W0 = 0: {zero_w0}, seed {seed}: v2 a32 max row error {e2:e} \
                             > {bound:e} (v1 a32: {e1:e})"
                        );
                    }
                }
            }
        }
    }
}
test_device!(norm_v2_a32_as_accurate_as_the_f32_cuda_core_path);

/// A zero row of V (W0 row and B row zero) has n = 0 and a finite g = m / ε (not NaN);
/// its output is then just the bias, as in the f64 reference.
fn zero_rows_give_finite_scale_not_nan<B: TestBackend>() {
    let c = case(2, DType::BF16, true);
    let (mut layer, x, gy) = make(c, 5);
    let mut w = layer.weight.to_f32();
    for k in 0..c.d_in {
        w[3 * c.d_in + k] = 0.0;
    }
    layer.weight = Tensor::from_f32(c.dtype, vec![c.d_out, c.d_in], &w).unwrap();
    let mut b = layer.lora_b.to_f32();
    for i in 0..c.r {
        b[3 * c.r + i] = 0.0;
    }
    layer.lora_b = Tensor::from_f32(c.dtype, vec![c.d_out, c.r], &b).unwrap();
    let m3 = layer.magnitude.as_ref().unwrap().to_f32()[3];
    let eps = dorafuse::layer::NORM_EPS as f32;
    for v in spec::candidates(spec::Op::Norm, c.dtype, c.dtype, c.r) {
        let (n, g) = kernels::norm(&B::with_seed(1), &layer, Some(v)).unwrap();
        assert_eq!(n[3], 0.0, "{}", v.prefix);
        let g3 = g.unwrap()[3];
        assert!(
            g3.is_finite() && (g3 - m3 / eps).abs() <= 1e-6 * (m3 / eps),
            "{}: g[3] = {g3}, expected m/ε = {}",
            v.prefix,
            m3 / eps
        );
    }
    for mode in [GradMode::Detached, GradMode::Exact] {
        let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
        let got = kernels::run(&B::with_seed(2), &layer, &x, Some(&gy), mode).unwrap();
        let tol = c.dtype.tolerance();
        check("y (zero row)", &c, 2, &got.y.to_f64(), &want.y, tol);
        let g = got.grads.unwrap();
        check(
            "grad_x (zero row)",
            &c,
            2,
            &g.grad_x.to_f64(),
            &want.grad_x,
            tol,
        );
        check(
            "grad_lora_A (zero row)",
            &c,
            2,
            &g.grad_lora_a.to_f64(),
            &want.grad_lora_a,
            tol,
        );
        check(
            "grad_lora_B (zero row)",
            &c,
            2,
            &g.grad_lora_b.to_f64(),
            &want.grad_lora_b,
            tol,
        );
    }
}
test_device!(zero_rows_give_finite_scale_not_nan);

fn merged_weight_matches_f64<B: TestBackend>() {
    for dt in DType::ALL {
        for i in [0, 1, 4] {
            for dora in [true, false] {
                let c = case(i, dt, dora);
                let (layer, _, _) = make(c, 3);
                let want = reference::merged_weight_f64(&layer).unwrap();
                for &seed in B::SEEDS {
                    let got: Vec<f64> = kernels::merged_weight(&B::with_seed(seed), &layer)
                        .unwrap()
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    check("merged weight", &c, seed, &got, &want, 1e-5);
                }
            }
        }
    }
}
test_device!(merged_weight_matches_f64);

/// Uploads host bytes into a fresh buffer.
fn up<B: Backend>(b: &B, t: &Tensor) -> B::Buffer {
    let mut buf = b.alloc_zeroed(t.as_bytes().len()).unwrap();
    b.upload(&mut buf, t.as_bytes()).unwrap();
    buf
}

fn down<B: Backend>(b: &B, buf: &B::Buffer, dt: DType, n: usize) -> Vec<f64> {
    let mut bytes = vec![0u8; n * dt.size()];
    b.download(buf, &mut bytes).unwrap();
    Tensor::from_bytes(dt, vec![n], &bytes).unwrap().to_f64()
}

/// The device API an inference engine uses: computed, supplied and in-place bases agree; the
/// cached g is reused until the adapter changes, and then recomputed; workspaces stop growing.
/// On a GPU also at decode, mid-size and 4097-wide shapes in every dtype.
fn device_layer_inference_cache_and_bases<B: TestBackend>() {
    let mut cases: Vec<Case> = [DType::BF16, DType::F32]
        .map(|dt| Case {
            bias: true,
            ..case(3, dt, true)
        })
        .to_vec();
    if B::large() {
        for (t, d_in, d_out, r) in [(1, 129, 65, 16), (33, 257, 129, 7), (4, 96, 4097, 64)] {
            for dtype in DType::ALL {
                let (dora, bias, fifo, a32) = (true, true, false, false);
                cases.push(Case {
                    t,
                    d_in,
                    d_out,
                    r,
                    dtype,
                    dora,
                    bias,
                    fifo,
                    a32,
                });
            }
        }
    }
    for c in cases {
        let dt = c.dtype;
        let dev = B::with_seed(2);
        let (layer, x, _) = make(c, 9);
        let want = reference::run_f64(&layer, &x, None, GradMode::Detached)
            .unwrap()
            .y;
        let wb = up(&dev, &layer.weight);
        let ab = up(&dev, &layer.lora_a);
        let bb = up(&dev, &layer.lora_b);
        let mb = up(&dev, layer.magnitude.as_ref().unwrap());
        let biasb = up(&dev, &layer.bias.as_ref().unwrap().cast(DType::F32));
        let xb = up(&dev, &x);
        let weights = DoraWeights {
            weight: DevTensor::of(&wb, dt),
            fan_in_fan_out: c.fifo,
            bias: Some(DevTensor::of(&biasb, DType::F32)),
            lora_a: DevTensor::of(&ab, dt),
            lora_b: DevTensor::of(&bb, dt),
            // A raw view: the test rewrites m in place later, as an optimiser would.
            // SAFETY: `mb` is a buffer of the backend, of this size, that outlives `dl`.
            magnitude: Some(unsafe { DevTensor::from_raw(mb.ptr(), mb.bytes(), DType::F32) }),
            scaling: layer.scaling as f32,
            d_in: c.d_in,
            d_out: c.d_out,
            r: c.r,
        };
        let mut dl = DoraLayer::new(&dev, weights).unwrap();
        let xt = DevTensor::of(&xb, dt);
        let n_out = c.t * c.d_out;
        let y1 = dev.alloc_zeroed(n_out * dt.size()).unwrap();
        dl.forward(&dev, &xt, c.t, Base::Compute, &DevTensor::of(&y1, dt))
            .unwrap();
        let got1 = down(&dev, &y1, dt, n_out);
        check(
            "forward (computed base)",
            &c,
            2,
            &got1,
            &want,
            dt.tolerance(),
        );
        let v0 = dl.adapter_version();
        let ws0 = dl.workspace_bytes();

        // Supplied base: x·W0ᵀ from the f64 reference rounded to dt.
        let refl = reference::RefLayer::from_layer(&layer).unwrap();
        let mut plain = refl.clone();
        plain.lora_b.iter_mut().for_each(|v| *v = 0.0);
        plain.magnitude = None;
        plain.bias = None;
        let base = plain.forward(&x.to_f64(), c.t, None);
        let base_t = Tensor::from_f64(dt, vec![c.t, c.d_out], &base).unwrap();
        let baseb = up(&dev, &base_t);
        let y2 = dev.alloc_zeroed(n_out * dt.size()).unwrap();
        dl.forward(
            &dev,
            &xt,
            c.t,
            Base::Supplied(DevTensor::of(&baseb, dt)),
            &DevTensor::of(&y2, dt),
        )
        .unwrap();
        check(
            "forward (supplied base)",
            &c,
            2,
            &down(&dev, &y2, dt, n_out),
            &want,
            dt.tolerance(),
        );

        // In place: y starts as base and is overwritten.
        let y3 = up(&dev, &base_t);
        dl.forward(&dev, &xt, c.t, Base::InPlace, &DevTensor::of(&y3, dt))
            .unwrap();
        check(
            "forward (in place)",
            &c,
            2,
            &down(&dev, &y3, dt, n_out),
            &want,
            dt.tolerance(),
        );
        assert_eq!(
            dl.adapter_version(),
            v0,
            "no adapter change, no new version"
        );
        assert_eq!(dl.workspace_bytes(), ws0, "steady state allocates nothing");

        // The cache really is used: poison m on the device; without invalidation the
        // result must not change, after invalidation it must follow the new m.
        let m2: Vec<f32> = layer
            .magnitude
            .as_ref()
            .unwrap()
            .to_f32()
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        let mut mb = mb;
        dev.upload(&mut mb, bytemuck_f32(&m2)).unwrap();
        let y4 = dev.alloc_zeroed(n_out * dt.size()).unwrap();
        dl.forward(&dev, &xt, c.t, Base::Compute, &DevTensor::of(&y4, dt))
            .unwrap();
        assert_eq!(
            down(&dev, &y4, dt, n_out),
            got1,
            "cached g reused while the adapter is unchanged"
        );
        dl.invalidate();
        dl.forward(&dev, &xt, c.t, Base::Compute, &DevTensor::of(&y4, dt))
            .unwrap();
        let mut l2 = layer.clone();
        l2.magnitude = Some(Tensor::from_f32(DType::F32, vec![c.d_out], &m2).unwrap());
        let want2 = reference::run_f64(&l2, &x, None, GradMode::Detached)
            .unwrap()
            .y;
        check(
            "forward after invalidate",
            &c,
            2,
            &down(&dev, &y4, dt, n_out),
            &want2,
            dt.tolerance(),
        );
        drop(dl);
        drop(mb);
    }
}
test_device!(device_layer_inference_cache_and_bases);

fn bytemuck_f32(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of it is a valid u8 sequence.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The training pair on the device API, twice in a row: the second step reuses the
/// workspaces, and the results are bit-identical (deterministic reductions).
fn device_layer_training_is_deterministic_and_allocation_free<B: TestBackend>() {
    let c = case(1, DType::F16, true);
    let dev = B::with_seed(3);
    let (layer, x, gy) = make(c, 4);
    let dt = c.dtype;
    let wb = up(&dev, &layer.weight);
    let ab = up(&dev, &layer.lora_a);
    let bb = up(&dev, &layer.lora_b);
    let mb = up(&dev, layer.magnitude.as_ref().unwrap());
    let xb = up(&dev, &x);
    let gyb = up(&dev, &gy);
    let weights = DoraWeights {
        weight: DevTensor::of(&wb, dt),
        fan_in_fan_out: c.fifo,
        bias: None,
        lora_a: DevTensor::of(&ab, dt),
        lora_b: DevTensor::of(&bb, dt),
        magnitude: Some(DevTensor::of(&mb, DType::F32)),
        scaling: layer.scaling as f32,
        d_in: c.d_in,
        d_out: c.d_out,
        r: c.r,
    };
    let mut dl = DoraLayer::new(&dev, weights).unwrap();
    let y = dev.alloc_zeroed(c.t * c.d_out * dt.size()).unwrap();
    let gx = dev.alloc_zeroed(c.t * c.d_in * dt.size()).unwrap();
    let ga = dev.alloc_zeroed(4 * c.r * c.d_in).unwrap();
    let gb = dev.alloc_zeroed(4 * c.d_out * c.r).unwrap();
    let gm = dev.alloc_zeroed(4 * c.d_out).unwrap();
    let targets = GradTargets {
        grad_x: DevTensor::of(&gx, dt),
        grad_lora_a: DevTensor::of(&ga, DType::F32),
        grad_lora_b: DevTensor::of(&gb, DType::F32),
        grad_magnitude: Some(DevTensor::of(&gm, DType::F32)),
    };
    let xt = DevTensor::of(&xb, dt);
    let mut results = Vec::new();
    let mut ws = Vec::new();
    for _ in 0..2 {
        dl.forward_train(&dev, &xt, c.t, Base::Compute, &DevTensor::of(&y, dt))
            .unwrap();
        dl.backward(
            &dev,
            &xt,
            &DevTensor::of(&gyb, dt),
            &targets,
            GradMode::Exact,
        )
        .unwrap();
        results.push((
            down(&dev, &gx, dt, c.t * c.d_in),
            down(&dev, &ga, DType::F32, c.r * c.d_in),
            down(&dev, &gb, DType::F32, c.d_out * c.r),
            down(&dev, &gm, DType::F32, c.d_out),
        ));
        ws.push(dl.workspace_bytes());
        dl.invalidate(); // an optimiser step would go here
    }
    assert_eq!(
        results[0], results[1],
        "two identical steps give identical bits"
    );
    assert_eq!(ws[0], ws[1], "the second step allocates nothing");
    // backward without a matching forward_train is refused
    let e = dl
        .backward(
            &dev,
            &xt,
            &DevTensor::of(&gyb, dt),
            &targets,
            GradMode::Detached,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("no forward_train"), "{e}");
    let want = reference::run_f64(&layer, &x, Some(&gy), GradMode::Exact).unwrap();
    check(
        "grad_lora_A (device API)",
        &c,
        3,
        &results[0].1,
        &want.grad_lora_a,
        dt.tolerance(),
    );
    check(
        "grad_magnitude (device API)",
        &c,
        3,
        &results[0].3,
        want.grad_magnitude.as_ref().unwrap(),
        dt.tolerance(),
    );
}
test_device!(device_layer_training_is_deterministic_and_allocation_free);

fn device_api_rejects_bad_buffers_naming_them<B: TestBackend>() {
    let dev = B::with_seed(1);
    let c = case(0, DType::BF16, true);
    let (layer, _, _) = make(c, 1);
    let wb = up(&dev, &layer.weight);
    let ab = up(&dev, &layer.lora_a);
    let bb = up(&dev, &layer.lora_b);
    let small = dev.alloc_zeroed(4).unwrap();
    let mk = |m: DevTensor<'_>| {
        DoraWeights {
            weight: DevTensor::of(&wb, DType::BF16),
            fan_in_fan_out: false,
            bias: None,
            lora_a: DevTensor::of(&ab, DType::BF16),
            lora_b: DevTensor::of(&bb, DType::BF16),
            magnitude: Some(m),
            scaling: 1.0,
            d_in: c.d_in,
            d_out: c.d_out,
            r: c.r,
        }
        .validate()
        .unwrap_err()
        .to_string()
    };
    let e = mk(DevTensor::of(&small, DType::F32));
    assert!(
        e.starts_with("magnitude:") && e.contains("too small"),
        "{e}"
    );
    let e = mk(DevTensor::of(&small, DType::BF16));
    assert!(e.starts_with("magnitude: dtype bf16"), "{e}");
    let _ = small.bytes();
}
test_device!(device_api_rejects_bad_buffers_naming_them);

/// The PEFT-generated layer cases (tests/fixtures/cases) through the fused kernels, against
/// float64 truth, held to the replay bar: f32 1e-5; otherwise twice
/// PyTorch's own error on the same case (metadata `peft_rel_err.<output>`), capped at the
/// dtype tolerance and floored at the output dtype's unit roundoff (the exact gradient, which
/// PEFT does not compute, is held to the dtype tolerance).
fn peft_fixture_cases<B: TestBackend>() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cases");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "fixtures missing from {dir}");
    for p in paths {
        let case = dorafuse::case::LayerCase::read(&p).unwrap();
        let gy = case.grad_y.as_ref();
        for mode in [GradMode::Detached, GradMode::Exact] {
            if mode == GradMode::Exact && (!case.layer.is_dora() || gy.is_none()) {
                continue;
            }
            let want = reference::run_f64(&case.layer, &case.x, gy, mode).unwrap();
            let got = kernels::run(&B::with_seed(7), &case.layer, &case.x, gy, mode)
                .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            let comp = case.x.dtype();
            let bar = |name: &str| {
                if comp == DType::F32 {
                    return DType::F32.tolerance();
                }
                let cap = comp.tolerance();
                if mode == GradMode::Exact {
                    return cap; // PEFT has no exact gradient: its recorded errors do not apply
                }
                match case.peft_rel_err(name) {
                    Some(e) => (2.0 * e)
                        .min(cap)
                        .max(case.output_dtype(name).unit_roundoff()),
                    None => cap,
                }
            };
            let mut outs: Vec<(&str, Vec<f64>, &[f64])> = vec![("y", got.y.to_f64(), &want.y)];
            if let Some(g) = &got.grads {
                outs.push(("grad_x", g.grad_x.to_f64(), &want.grad_x));
                outs.push(("grad_lora_A", g.grad_lora_a.to_f64(), &want.grad_lora_a));
                outs.push(("grad_lora_B", g.grad_lora_b.to_f64(), &want.grad_lora_b));
                if let (Some(gm), Some(wm)) = (&g.grad_magnitude, &want.grad_magnitude) {
                    outs.push(("grad_magnitude", gm.to_f64(), wm));
                }
            }
            for (name, got, want) in outs {
                let e = rel_l2(&got, want);
                let b = bar(name);
                assert!(
                    e <= b,
                    "{} ({mode:?}) {name}: rel-L2 {e:e} over the bar {b:e}",
                    p.file_name().unwrap().to_string_lossy()
                );
            }
        }
    }
}
test_device!(peft_fixture_cases);

/// Decode (T = 1, long d_in): shrink splits d_in across blocks and compose sums the slabs;
/// and the engine case of a fused QKV output finished in place: y is the middle column
/// slice of a `[T, 3·d_out]` buffer, the other columns must stay untouched.
fn device_layer_decode_split_k_and_fused_qkv_slice<B: TestBackend>() {
    for (dt, t) in [(DType::BF16, 1), (DType::F32, 1), (DType::F16, 3)] {
        let c = Case {
            t,
            d_in: 1000,
            d_out: 65,
            r: 16,
            dtype: dt,
            dora: true,
            bias: true,
            fifo: false,
            a32: dt != DType::F32,
        };
        let dev = B::with_seed(5);
        let (layer, x, _) = make(c, 21);
        let want = reference::run_f64(&layer, &x, None, GradMode::Detached)
            .unwrap()
            .y;
        let adt = layer.lora_a.dtype();
        let wb = up(&dev, &layer.weight);
        let ab = up(&dev, &layer.lora_a);
        let bb = up(&dev, &layer.lora_b);
        let mb = up(&dev, layer.magnitude.as_ref().unwrap());
        let biasb = up(&dev, &layer.bias.as_ref().unwrap().cast(DType::F32));
        let xb = up(&dev, &x);
        let weights = DoraWeights {
            weight: DevTensor::of(&wb, dt),
            fan_in_fan_out: false,
            bias: Some(DevTensor::of(&biasb, DType::F32)),
            lora_a: DevTensor::of(&ab, adt),
            lora_b: DevTensor::of(&bb, adt),
            magnitude: Some(DevTensor::of(&mb, DType::F32)),
            scaling: layer.scaling as f32,
            d_in: c.d_in,
            d_out: c.d_out,
            r: c.r,
        };
        let mut dl = DoraLayer::new(&dev, weights).unwrap();
        let xt = DevTensor::of(&xb, dt);
        // The base slice: x·W0ᵀ from the f64 reference; the q and v slices: distinct values.
        let refl = reference::RefLayer::from_layer(&layer).unwrap();
        let mut plain = refl.clone();
        plain.lora_b.iter_mut().for_each(|v| *v = 0.0);
        plain.magnitude = None;
        plain.bias = None;
        let base = plain.forward(&x.to_f64(), c.t, None);
        let ld = 3 * c.d_out;
        let mut fused = vec![0.0f64; c.t * ld];
        for tt in 0..c.t {
            for j in 0..ld {
                fused[tt * ld + j] = if (c.d_out..2 * c.d_out).contains(&j) {
                    base[tt * c.d_out + j - c.d_out]
                } else {
                    (tt * ld + j) as f64 * 0.25 - 7.0
                };
            }
        }
        let fused_t = Tensor::from_f64(dt, vec![c.t, ld], &fused).unwrap();
        let before = fused_t.to_f64();
        let fb = up(&dev, &fused_t);
        let view = DevTensor::of(&fb, dt)
            .slice(c.d_out, (c.t - 1) * ld + c.d_out)
            .unwrap();
        dl.forward_rows(&dev, &xt, c.t, Base::InPlace, &view, ld)
            .unwrap();
        let after = down(&dev, &fb, dt, c.t * ld);
        let mut got = Vec::new();
        for tt in 0..c.t {
            for j in 0..ld {
                let k = tt * ld + j;
                if (c.d_out..2 * c.d_out).contains(&j) {
                    got.push(after[k]);
                } else {
                    assert_eq!(
                        after[k], before[k],
                        "{dt}: column {j} of row {tt} was touched"
                    );
                }
            }
        }
        check(
            "fused QKV slice (in place)",
            &c,
            5,
            &got,
            &want,
            dt.tolerance(),
        );
        // The same through a computed base into a contiguous y (the split-K shrink again).
        let y = dev.alloc_zeroed(c.t * c.d_out * dt.size()).unwrap();
        dl.forward(&dev, &xt, c.t, Base::Compute, &DevTensor::of(&y, dt))
            .unwrap();
        check(
            "decode (computed base)",
            &c,
            5,
            &down(&dev, &y, dt, c.t * c.d_out),
            &want,
            dt.tolerance(),
        );
    }
}
test_device!(device_layer_decode_split_k_and_fused_qkv_slice);

/// One larger case per dtype: several tiles in every direction at once (two rank tiles of
/// shrink and tn r64, four rank chunks of compose, v2's rank padding at r = 100, multi-split
/// reductions over 129 tokens, bwd_dz walking five column chunks), DoRA detached and exact.
fn larger_case_crosses_every_tile_at_once<B: TestBackend>() {
    for dt in DType::ALL {
        for (mode, fifo) in [(GradMode::Detached, false), (GradMode::Exact, true)] {
            let c = Case {
                t: 129,
                d_in: 257,
                d_out: 131,
                r: 100,
                dtype: dt,
                dora: true,
                bias: true,
                fifo,
                a32: false,
            };
            run_case::<B>(c, mode);
        }
    }
}
test_device!(larger_case_crosses_every_tile_at_once);

/// Many more schedules at one shape that runs every kernel (norm v2, shrink, compose,
/// bwd_dz, mag_reduce, tn r16 with several splits, sum_partials, merged_weight, scale_rows):
/// a race that two or three schedules miss shows up as a moving error here. On a GPU, twelve
/// runs of the same launches: the reductions are deterministic, so the bits must not move.
fn twelve_schedules_one_shape<B: TestBackend>() {
    let c = case(2, DType::BF16, true);
    let (layer, x, gy) = make(c, 99);
    let mut first: Option<Vec<f64>> = None;
    for seed in 1..=12u64 {
        let got =
            kernels::run(&B::with_seed(seed), &layer, &x, Some(&gy), GradMode::Exact).unwrap();
        let g = got.grads.unwrap();
        let mut all = got.y.to_f64();
        all.extend(g.grad_x.to_f64());
        all.extend(g.grad_lora_a.to_f64());
        all.extend(g.grad_lora_b.to_f64());
        all.extend(g.grad_magnitude.unwrap().to_f64());
        // Deterministic reductions: every schedule gives the same bits.
        match &first {
            None => first = Some(all),
            Some(f) => assert!(
                f.iter().zip(&all).all(|(a, b)| a.to_bits() == b.to_bits()),
                "seed {seed} changed the result: a schedule-dependent kernel"
            ),
        }
    }
}
test_device!(twelve_schedules_one_shape);

/// The sweep of layer shapes: on a GPU every dtype × DoRA/LoRA at sizes that are multiples of
/// no tile (1, 7, 33, 129, 4097 ...), ranks 1, 7, 16, 33, 64, 255, 256, both layouts and bias
/// settings and f32 adapters spread over them; on the emulator (or with `DORAFUSE_GPU_QUICK=1`)
/// the first two shapes.
fn sweep<B: TestBackend>() -> Vec<Case> {
    let shapes: &[(usize, usize, usize, usize)] = &[
        (7, 33, 65, 7),
        (33, 129, 47, 16),
        (1, 33, 129, 1),
        (17, 257, 97, 33),
        (129, 96, 160, 64),
        (5, 4097, 33, 16),
        (3, 31, 4097, 8),
        (65, 129, 257, 256),
        (2, 300, 70, 255),
    ];
    let n = if B::large() { shapes.len() } else { 2 };
    let mut out = Vec::new();
    for (i, &(t, d_in, d_out, r)) in shapes[..n].iter().enumerate() {
        for dtype in DType::ALL {
            for dora in [true, false] {
                out.push(Case {
                    t,
                    d_in,
                    d_out,
                    r,
                    dtype,
                    dora,
                    bias: (i + dora as usize) % 2 == 0,
                    fifo: i % 3 == 1,
                    a32: dtype != DType::F32 && (i + dora as usize) % 2 == 1,
                });
            }
        }
    }
    out
}

/// Forward, detached backward (and the exact one on every other DoRA case) over the sweep,
/// and a forward without grad_y that gives the same y and no gradients.
fn sweep_run_matches_f64<B: TestBackend>() {
    let dev = B::with_seed(11);
    for (i, c) in sweep::<B>().into_iter().enumerate() {
        let (layer, x, gy) = make(c, 11);
        let modes: &[GradMode] = if c.dora && i % 2 == 0 {
            &[GradMode::Detached, GradMode::Exact]
        } else {
            &[GradMode::Detached]
        };
        let tol = c.dtype.tolerance();
        for &mode in modes {
            let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
            let got = kernels::run(&dev, &layer, &x, Some(&gy), mode)
                .unwrap_or_else(|e| panic!("{c:?} {mode:?}: {e:#}"));
            check("y", &c, 11, &got.y.to_f64(), &want.y, tol);
            let g = got.grads.expect("grad_y was given");
            check("grad_x", &c, 11, &g.grad_x.to_f64(), &want.grad_x, tol);
            let (ga, gb) = (g.grad_lora_a.to_f64(), g.grad_lora_b.to_f64());
            check("grad_lora_A", &c, 11, &ga, &want.grad_lora_a, tol);
            check("grad_lora_B", &c, 11, &gb, &want.grad_lora_b, tol);
            match (&g.grad_magnitude, &want.grad_magnitude) {
                (Some(gm), Some(wm)) => check("grad_magnitude", &c, 11, &gm.to_f64(), wm, tol),
                (None, None) => assert!(!c.dora),
                other => panic!("{c:?}: grad_magnitude presence differs: {other:?}"),
            }
        }
        let fwd = kernels::run(&dev, &layer, &x, None, GradMode::Detached).unwrap();
        assert!(fwd.grads.is_none(), "{c:?}: gradients without grad_y");
        let want = reference::run_f64(&layer, &x, None, GradMode::Detached).unwrap();
        check("forward-only y", &c, 11, &fwd.y.to_f64(), &want.y, tol);
    }
}
test_device!(sweep_run_matches_f64);

/// `kernels::merged_weight` (W' = diag(g)·(W0 + s·B·A), f32) over the sweep.
fn sweep_merged_weight_matches_f64<B: TestBackend>() {
    let dev = B::with_seed(12);
    for c in sweep::<B>() {
        let (layer, _, _) = make(c, 12);
        let want = reference::merged_weight_f64(&layer).unwrap();
        let got: Vec<f64> = kernels::merged_weight(&dev, &layer)
            .unwrap_or_else(|e| panic!("{c:?}: {e:#}"))
            .iter()
            .map(|&v| v as f64)
            .collect();
        check("merged weight", &c, 12, &got, &want, c.dtype.tolerance());
    }
}
test_device!(sweep_merged_weight_matches_f64);

// ---- the two launch configurations (spec::Tuning) --------------------------------------

/// Shapes whose rows are a whole number of 16-byte groups in every dtype (d_in % 8 == 0), so
/// the tuned configuration takes its 16-byte loads for row-major W0, still off every tile
/// (64-row, 16-row, 64-column, 32-chunk), and wide enough in d_in and d_out that the tuned
/// norm and bwd_dz split them (several 64-column chunks, several 32-column chunks).
const VEC_SHAPES: [(usize, usize, usize, usize); 3] =
    [(33, 136, 130, 16), (17, 200, 97, 7), (5, 72, 33, 64)];

/// The whole layer (forward, detached and exact backward, DoRA and LoRA, f32 adapters
/// beside 16-bit ones) under both launch configurations, against float64 truth, at shapes
/// where the tuned one splits and loads 16 bytes at a time; each configuration twice,
/// bit-identical (the splits sum in a fixed order).
fn both_tunings_match_f64<B: TestBackend>() {
    for tuning in spec::Tuning::ALL {
        spec::with_tuning(tuning, || {
            for dt in DType::ALL {
                for (i, &(t, d_in, d_out, r)) in VEC_SHAPES.iter().enumerate() {
                    let c = Case {
                        t,
                        d_in,
                        d_out,
                        r,
                        dtype: dt,
                        dora: i != 1 || dt != DType::F16,
                        bias: i % 2 == 0,
                        fifo: i == 2,
                        a32: dt != DType::F32 && i == 1,
                    };
                    let mode = if i == 0 {
                        GradMode::Exact
                    } else {
                        GradMode::Detached
                    };
                    run_case::<B>(c, mode);
                    let dev = B::with_seed(B::SEEDS[0]);
                    let (layer, x, gy) = make(c, 5);
                    let once = kernels::run(&dev, &layer, &x, Some(&gy), mode).unwrap();
                    let twice = kernels::run(&dev, &layer, &x, Some(&gy), mode).unwrap();
                    let g1 = once.grads.unwrap();
                    let g2 = twice.grads.unwrap();
                    for (what, a, b) in [
                        ("y", &once.y, &twice.y),
                        ("grad_x", &g1.grad_x, &g2.grad_x),
                        ("grad_lora_A", &g1.grad_lora_a, &g2.grad_lora_a),
                        ("grad_lora_B", &g1.grad_lora_b, &g2.grad_lora_b),
                    ] {
                        assert_eq!(
                            a.to_f64(),
                            b.to_f64(),
                            "{what} {c:?} {}: two runs differ",
                            tuning.name()
                        );
                    }
                }
            }
        });
    }
}
test_device!(both_tunings_match_f64);

/// Every norm variant under both launch configurations, both layouts and f32 adapters, at
/// the 16-byte-aligned shapes, against float64 truth; the tuned n bit-identical run to run.
fn norm_both_tunings_every_variant<B: TestBackend>() {
    for tuning in spec::Tuning::ALL {
        spec::with_tuning(tuning, || {
            for dt in DType::ALL {
                for &(_, d_in, d_out, r) in &VEC_SHAPES {
                    for (fifo, a32) in [(false, false), (true, false), (false, dt != DType::F32)] {
                        let c = Case {
                            t: 1,
                            d_in,
                            d_out,
                            r,
                            dtype: dt,
                            dora: true,
                            bias: false,
                            fifo,
                            a32,
                        };
                        let (layer, _, _) = make(c, 13);
                        let want_n = reference::norm_f64(&layer).unwrap();
                        let adt = layer.lora_a.dtype();
                        for v in spec::candidates(spec::Op::Norm, dt, adt, r) {
                            let mut first: Option<Vec<f32>> = None;
                            for &seed in B::SEEDS {
                                let dev = B::with_seed(seed);
                                let (n, _) =
                                    kernels::norm(&dev, &layer, Some(v)).unwrap_or_else(|e| {
                                        panic!("{} {c:?} {}: {e:#}", v.prefix, tuning.name())
                                    });
                                let n64: Vec<f64> = n.iter().map(|&v| v as f64).collect();
                                let what = format!("n ({}, {})", v.prefix, tuning.name());
                                check(&what, &c, seed, &n64, &want_n, 1e-5);
                                match &first {
                                    None => first = Some(n),
                                    Some(f) => assert_eq!(f, &n, "{what} {c:?}: runs differ"),
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}
test_device!(norm_both_tunings_every_variant);

/// The tuned launch configuration timed against the previous one in the same process, on
/// the device API: the norm (g recomputed after `invalidate`), the inference forward with
/// cached g (base GEMM, shrink, compose) and the detached backward (bwd_dz, tn, sum_partials,
/// the grad_x GEMM and compose). On a GPU at the reference shape (T = 512, 4096×4096, r = 16;
/// bf16, and bf16 with f32 adapters), printing the mean time of each
/// (`scripts/gpu-check.sh` runs it with `--nocapture`); on the emulator at a small shape,
/// once. Either way the two configurations must agree: n and g to f32 rounding, y and the
/// gradients to the dtype's tolerance.
fn tuned_against_previous_timed<B: TestBackend>() {
    let (t, d_in, d_out, r, iters) = if B::large() {
        (512, 4096, 4096, 16, 20)
    } else {
        (33, 136, 130, 16, 1)
    };
    for a32 in [false, true] {
        let c = Case {
            t,
            d_in,
            d_out,
            r,
            dtype: DType::BF16,
            dora: true,
            bias: false,
            fifo: false,
            a32,
        };
        let dev = B::with_seed(B::SEEDS[0]);
        let (layer, x, gy) = make(c, 21);
        let (dt, adt) = (c.dtype, layer.lora_a.dtype());
        let wb = up(&dev, &layer.weight);
        let ab = up(&dev, &layer.lora_a);
        let bb = up(&dev, &layer.lora_b);
        let mb = up(&dev, layer.magnitude.as_ref().unwrap());
        let xb = up(&dev, &x);
        let gyb = up(&dev, &gy);
        let weights = DoraWeights {
            weight: DevTensor::of(&wb, dt),
            fan_in_fan_out: false,
            bias: None,
            lora_a: DevTensor::of(&ab, adt),
            lora_b: DevTensor::of(&bb, adt),
            magnitude: Some(DevTensor::of(&mb, DType::F32)),
            scaling: layer.scaling as f32,
            d_in,
            d_out,
            r,
        };
        let y = dev.alloc_zeroed(t * d_out * dt.size()).unwrap();
        let gx = dev.alloc_zeroed(t * d_in * dt.size()).unwrap();
        let ga = dev.alloc_zeroed(4 * r * d_in).unwrap();
        let gb = dev.alloc_zeroed(4 * d_out * r).unwrap();
        let gm = dev.alloc_zeroed(4 * d_out).unwrap();
        let targets = GradTargets {
            grad_x: DevTensor::of(&gx, dt),
            grad_lora_a: DevTensor::of(&ga, DType::F32),
            grad_lora_b: DevTensor::of(&gb, DType::F32),
            grad_magnitude: Some(DevTensor::of(&gm, DType::F32)),
        };
        let xt = DevTensor::of(&xb, dt);
        let mut outs = Vec::new();
        for tuning in spec::Tuning::ALL {
            spec::with_tuning(tuning, || {
                let mut dl = DoraLayer::new(&dev, weights).unwrap();
                dl.magnitude_scale(&dev).unwrap(); // warm-up
                dev.synchronize().unwrap();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    dl.invalidate();
                    dl.magnitude_scale(&dev).unwrap();
                }
                dev.synchronize().unwrap();
                let norm_us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
                // The inference forward (cached g): base GEMM, shrink, compose.
                let yt = DevTensor::of(&y, dt);
                dl.forward(&dev, &xt, t, Base::Compute, &yt).unwrap(); // warm-up
                dev.synchronize().unwrap();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    dl.forward(&dev, &xt, t, Base::Compute, &yt).unwrap();
                }
                dev.synchronize().unwrap();
                let fwd_us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
                let y_inference = down(&dev, &y, dt, t * d_out);
                dl.forward_train(&dev, &xt, t, Base::Compute, &yt).unwrap();
                let back = |dl: &mut DoraLayer<B>| {
                    dl.backward(
                        &dev,
                        &xt,
                        &DevTensor::of(&gyb, dt),
                        &targets,
                        GradMode::Detached,
                    )
                    .unwrap()
                };
                back(&mut dl); // warm-up
                dev.synchronize().unwrap();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    back(&mut dl);
                }
                dev.synchronize().unwrap();
                let back_us = start.elapsed().as_secs_f64() * 1e6 / iters as f64;
                println!(
                    "tuning {:8} bf16{} T={t} {d_out}x{d_in} r={r}: norm {norm_us:9.1} us, \
                     forward {fwd_us:9.1} us, backward {back_us:9.1} us (mean of {iters})",
                    tuning.name(),
                    if a32 { " (f32 adapters)" } else { "" },
                );
                outs.push((
                    down(&dev, &gm, DType::F32, d_out),
                    down(&dev, &gx, dt, t * d_in),
                    down(&dev, &ga, DType::F32, r * d_in),
                    down(&dev, &gb, DType::F32, d_out * r),
                    y_inference,
                ));
            });
        }
        let (p, q) = (&outs[0], &outs[1]);
        let tol = dt.tolerance();
        check("grad_magnitude (tuned vs previous)", &c, 0, &q.0, &p.0, tol);
        check("grad_x (tuned vs previous)", &c, 0, &q.1, &p.1, tol);
        check("grad_lora_A (tuned vs previous)", &c, 0, &q.2, &p.2, tol);
        check("grad_lora_B (tuned vs previous)", &c, 0, &q.3, &p.3, tol);
        check("y (tuned vs previous)", &c, 0, &q.4, &p.4, tol);
    }
}
test_device!(tuned_against_previous_timed);
