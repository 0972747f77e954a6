//! The f32 CPU path against the float64 reference, in every dtype and dtype mix, at sizes off
//! every tile, with and without bias, fan_in_fan_out, plain LoRA, detached and exact
//! gradients; plus the invariants DoRA = LoRA when m = n and the zero-row rule.
//!
//! Both paths see the same (already rounded) inputs, so the only differences are f32
//! accumulation and the rounding of each output to its dtype: each output is held to its own
//! dtype's tolerance (f32 1e-5, f16 1e-3, bf16 8e-3, docs/design.md §4).

use dorafuse::cpu;
use dorafuse::cpu::reference;
use dorafuse::dtype::DType;
use dorafuse::layer::{GradMode, Layer, Outputs};
use dorafuse::tensor::{rel_l2, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

struct Gen(rand::rngs::StdRng);

impl Gen {
    fn new(seed: u64) -> Self {
        Self(rand::rngs::StdRng::seed_from_u64(seed))
    }
    fn tensor(&mut self, dtype: DType, shape: &[usize], std: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| self.0.sample::<f64, _>(StandardNormal) * std)
            .collect();
        Tensor::from_f64(dtype, shape.to_vec(), &v).unwrap()
    }
}

/// Dtypes of one layer: x/weight/bias/grad_y, and lora_A/lora_B/magnitude.
#[derive(Clone, Copy, Debug)]
struct Mix {
    base: DType,
    adapter: DType,
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    t: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    mix: Mix,
    bias: bool,
    fifo: bool,
    dora: bool,
}

fn build(c: Cfg, seed: u64) -> (Layer, Tensor, Tensor) {
    let mut g = Gen::new(seed);
    let Mix { base, adapter } = c.mix;
    let wshape = if c.fifo {
        [c.d_in, c.d_out]
    } else {
        [c.d_out, c.d_in]
    };
    let s = 2.0;
    let weight = g.tensor(base, &wshape, 1.0 / (c.d_in as f64).sqrt());
    let lora_a = g.tensor(adapter, &[c.r, c.d_in], 1.0 / (c.d_in as f64).sqrt());
    let lora_b = g.tensor(adapter, &[c.d_out, c.r], 0.3 / (s * (c.r as f64).sqrt()));
    let mut layer = Layer {
        weight,
        bias: c.bias.then(|| g.tensor(base, &[c.d_out], 0.5)),
        lora_a,
        lora_b,
        magnitude: None,
        scaling: s,
        fan_in_fan_out: c.fifo,
    };
    if c.dora {
        // m = n · (random factor in [0.5, 1.5)), so that g ≠ 1.
        let n = reference::norm_f64(&layer).unwrap();
        let m: Vec<f64> = n.iter().map(|n| n * (0.5 + g.0.gen::<f64>())).collect();
        layer.magnitude = Some(Tensor::from_f64(adapter, vec![c.d_out], &m).unwrap());
    }
    let x = g.tensor(base, &[c.t, c.d_in], 1.0);
    let gy = g.tensor(base, &[c.t, c.d_out], 1.0);
    (layer, x, gy)
}

fn assert_close(what: &str, got: &Tensor, want: &[f64], dtype: DType) {
    assert_close_scaled(what, got, want, dtype, 0.0);
}

/// Relative L2 error, with the denominator at least `scale` (see the exact-gradient note).
fn assert_close_scaled(what: &str, got: &Tensor, want: &[f64], dtype: DType, scale: f64) {
    assert_eq!(got.dtype(), dtype, "{what}: output dtype");
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    let diff: Vec<f64> = got.to_f64().iter().zip(want).map(|(a, b)| a - b).collect();
    let e = diff.iter().map(|v| v * v).sum::<f64>().sqrt() / norm.max(scale);
    assert!(
        e <= dtype.tolerance(),
        "{what}: rel L2 {e:.3e} > {:.0e} ({dtype})",
        dtype.tolerance()
    );
}

fn check(c: Cfg, seed: u64, mode: GradMode) {
    let (layer, x, gy) = build(c, seed);
    let what = format!("{c:?} {mode:?}");
    let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
    let Outputs { y, grads } = cpu::run(&layer, &x, Some(&gy), mode).unwrap();
    let grads = grads.expect("backward was asked for");
    let (base, adapter) = (c.mix.base, c.mix.adapter);
    assert_close(&format!("{what} y"), &y, &want.y, base);
    assert_close(&format!("{what} grad_x"), &grads.grad_x, &want.grad_x, base);
    // The exact gradient of A and B is the detached one minus the norm's term, and the two
    // can cancel completely (with d_in = 1, g·V_j = m_j·sign(V_j) does not depend on A or B
    // at all): measure its error against the size of the terms, i.e. at least the detached
    // gradient's norm.
    let det = reference::run_f64(&layer, &x, Some(&gy), GradMode::Detached).unwrap();
    let l2 = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    assert_close_scaled(
        &format!("{what} grad_lora_A"),
        &grads.grad_lora_a,
        &want.grad_lora_a,
        adapter,
        l2(&det.grad_lora_a),
    );
    assert_close_scaled(
        &format!("{what} grad_lora_B"),
        &grads.grad_lora_b,
        &want.grad_lora_b,
        adapter,
        l2(&det.grad_lora_b),
    );
    match (&grads.grad_magnitude, &want.grad_magnitude) {
        (Some(got), Some(want)) => {
            assert_close(&format!("{what} grad_magnitude"), got, want, adapter)
        }
        (None, None) => assert!(!c.dora),
        _ => panic!("{what}: grad_magnitude presence differs"),
    }
    // Forward alone gives the same y as run.
    let y2 = cpu::forward(&layer, &x).unwrap();
    assert_eq!(y2, y, "{what}: forward and run disagree");
}

const MIXES: [Mix; 5] = [
    Mix {
        base: DType::F32,
        adapter: DType::F32,
    },
    Mix {
        base: DType::F16,
        adapter: DType::F16,
    },
    Mix {
        base: DType::BF16,
        adapter: DType::BF16,
    },
    Mix {
        base: DType::BF16,
        adapter: DType::F32,
    },
    Mix {
        base: DType::F16,
        adapter: DType::F32,
    },
];

#[test]
fn every_dtype_mix_at_odd_sizes() {
    let mut seed = 10;
    for mix in MIXES {
        // No output here is a single element: a lone value that is a cancelling sum (e.g.
        // grad_lora_A with d_in = r = 1, a sum over tokens) has an unbounded relative error
        // in any finite precision, which would test the seed rather than the code.
        for &(t, d_in, d_out, r) in &[
            (1, 129, 67, 1),
            (7, 67, 129, 16),
            (33, 1, 67, 7),
            (7, 129, 1, 7),
        ] {
            for (bias, fifo) in [(true, false), (false, true), (true, true)] {
                for dora in [true, false] {
                    let c = Cfg {
                        t,
                        d_in,
                        d_out,
                        r,
                        mix,
                        bias,
                        fifo,
                        dora,
                    };
                    seed += 1;
                    check(c, seed, GradMode::Detached);
                    if dora {
                        check(c, seed, GradMode::Exact);
                    }
                }
            }
        }
    }
}

#[test]
fn larger_than_the_cache_blocks() {
    // T = 33: d_out spans several of the norm's row blocks, d_in several GEMM panels.
    // T = 5 (decode-sized, the fused pass over W0): with d_in = 257 a block is 1,024 rows,
    // so on two cores each thread takes a whole block and a partial one (the splits for
    // any thread count and block size are unit-tested in `cpu::tests`). T = 1 with
    // d_in·d_out past 2²⁰: the backward's dz·W0 is a single row split over the cores.
    for (t, d_in, d_out) in [(33, 1031, 517), (5, 257, 2600), (1, 1031, 1030)] {
        for fifo in [false, true] {
            let c = Cfg {
                t,
                d_in,
                d_out,
                r: 16,
                mix: MIXES[0],
                bias: true,
                fifo,
                dora: true,
            };
            check(c, 99, GradMode::Exact);
            check(c, 99, GradMode::Detached);
        }
    }
}

#[test]
fn norm_scale_and_merged_weight() {
    for (i, mix) in MIXES.iter().enumerate() {
        for fifo in [false, true] {
            let c = Cfg {
                t: 7,
                d_in: 1031,
                d_out: 67,
                r: 7,
                mix: *mix,
                bias: true,
                fifo,
                dora: true,
            };
            let (layer, x, _) = build(c, 200 + i as u64);
            let n_ref = reference::norm_f64(&layer).unwrap();
            let n = cpu::norm(&layer).unwrap();
            let n64: Vec<f64> = n.iter().map(|&v| v as f64).collect();
            let e = rel_l2(&n64, &n_ref);
            assert!(e < 1e-6, "{c:?}: norm rel err {e:.2e}");

            let g = cpu::magnitude_scale(&layer).unwrap().expect("DoRA has g");
            let m = layer.magnitude.as_ref().unwrap().to_f64();
            let g_ref: Vec<f64> = m.iter().zip(&n_ref).map(|(m, n)| m / n).collect();
            let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
            assert!(rel_l2(&g64, &g_ref) < 1e-6, "{c:?}: g");

            // forward with a cached g is the forward: the same values up to the output's
            // rounding and the order of the f32 sums (the decode-sized forward takes x·W0ᵀ
            // and the norm's W0·Aᵀ from one fused pass, the cached-g forward from a plain
            // product; a dot product of d_in terms differs by about √d_in·u between orders).
            let y = cpu::forward(&layer, &x).unwrap();
            let y2 = cpu::forward_with_scale(&layer, &x, Some(&g)).unwrap();
            let e = rel_l2(&y2.to_f64(), &y.to_f64());
            let sum_orders = (c.d_in as f64).sqrt() * DType::F32.unit_roundoff();
            assert!(
                e <= mix.base.unit_roundoff() * 2.0 + sum_orders,
                "{c:?}: cached-g forward {e:.2e}"
            );

            let w = cpu::merged_weight(&layer).unwrap();
            let w_ref = reference::merged_weight_f64(&layer).unwrap();
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let e = rel_l2(&w64, &w_ref);
            assert!(e < 1e-6, "{c:?}: merged weight rel err {e:.2e}");
        }
    }
}

#[test]
fn cached_scale_is_checked() {
    let c = Cfg {
        t: 3,
        d_in: 9,
        d_out: 5,
        r: 2,
        mix: MIXES[0],
        bias: false,
        fifo: false,
        dora: true,
    };
    let (layer, x, _) = build(c, 5);
    let e = cpu::forward_with_scale(&layer, &x, Some(&[1.0; 4])).unwrap_err();
    assert!(e.to_string().contains("d_out = 5"), "{e}");
    assert!(cpu::forward_with_scale(&layer, &x, None).is_err());
    let mut lora = layer.clone();
    lora.magnitude = None;
    assert!(cpu::forward_with_scale(&lora, &x, Some(&[1.0; 5])).is_err());
    assert!(cpu::magnitude_scale(&lora).unwrap().is_none());
}

#[test]
fn dora_equals_lora_when_m_is_the_norm() {
    for fifo in [false, true] {
        let c = Cfg {
            t: 7,
            d_in: 129,
            d_out: 67,
            r: 7,
            mix: MIXES[0],
            bias: true,
            fifo,
            dora: false,
        };
        let (mut layer, x, gy) = build(c, 300);
        let lora = cpu::run(&layer, &x, Some(&gy), GradMode::Detached).unwrap();
        let n = reference::norm_f64(&layer).unwrap();
        layer.magnitude = Some(Tensor::from_f64(DType::F32, vec![67], &n).unwrap());
        let dora = cpu::run(&layer, &x, Some(&gy), GradMode::Detached).unwrap();
        let (lg, dg) = (lora.grads.unwrap(), dora.grads.unwrap());
        for (what, a, b) in [
            ("y", &lora.y, &dora.y),
            ("grad_x", &lg.grad_x, &dg.grad_x),
            ("grad_lora_A", &lg.grad_lora_a, &dg.grad_lora_a),
            ("grad_lora_B", &lg.grad_lora_b, &dg.grad_lora_b),
        ] {
            let e = rel_l2(&b.to_f64(), &a.to_f64());
            assert!(
                e < 1e-6,
                "fifo={fifo}: DoRA with m = n vs LoRA, {what}: {e:.2e}"
            );
        }
    }
}

#[test]
fn zero_rows_give_bias_and_finite_gradients() {
    let zero = [0usize, 5, 66];
    for fifo in [false, true] {
        let c = Cfg {
            t: 7,
            d_in: 129,
            d_out: 67,
            r: 7,
            mix: MIXES[0],
            bias: true,
            fifo,
            dora: true,
        };
        let (mut layer, x, gy) = build(c, 400);
        let mut w = layer.weight.to_f32();
        let mut b = layer.lora_b.to_f32();
        let mut m = layer.magnitude.as_ref().unwrap().to_f32();
        for &j in &zero {
            for i in 0..c.d_in {
                let idx = if fifo {
                    i * c.d_out + j
                } else {
                    j * c.d_in + i
                };
                w[idx] = 0.0;
            }
            b[j * c.r..(j + 1) * c.r].iter_mut().for_each(|v| *v = 0.0);
            m[j] = 0.0;
        }
        layer.weight = Tensor::from_f32(DType::F32, layer.weight.shape().to_vec(), &w).unwrap();
        layer.lora_b = Tensor::from_f32(DType::F32, vec![c.d_out, c.r], &b).unwrap();
        layer.magnitude = Some(Tensor::from_f32(DType::F32, vec![c.d_out], &m).unwrap());
        let bias = layer.bias.as_ref().unwrap().to_f32();
        for mode in [GradMode::Detached, GradMode::Exact] {
            let out = cpu::run(&layer, &x, Some(&gy), mode).unwrap();
            let y = out.y.to_f32();
            for t in 0..c.t {
                for &j in &zero {
                    assert_eq!(y[t * c.d_out + j], bias[j], "y[{t},{j}] must be the bias");
                }
            }
            let g = out.grads.as_ref().unwrap();
            for (what, tns) in [
                ("grad_x", &g.grad_x),
                ("grad_lora_A", &g.grad_lora_a),
                ("grad_lora_B", &g.grad_lora_b),
                ("grad_magnitude", g.grad_magnitude.as_ref().unwrap()),
            ] {
                assert!(
                    tns.first_non_finite().is_none(),
                    "{mode:?}: {what} not finite"
                );
            }
            let gm = g.grad_magnitude.as_ref().unwrap().to_f32();
            for &j in &zero {
                assert_eq!(gm[j], 0.0, "grad_magnitude[{j}]");
            }
            let want = reference::run_f64(&layer, &x, Some(&gy), mode).unwrap();
            assert_close("zero rows y", &out.y, &want.y, DType::F32);
            assert_close(
                "zero rows grad_lora_A",
                &g.grad_lora_a,
                &want.grad_lora_a,
                DType::F32,
            );
            assert_close(
                "zero rows grad_lora_B",
                &g.grad_lora_b,
                &want.grad_lora_b,
                DType::F32,
            );
            let ng = cpu::norm(&layer).unwrap();
            for &j in &zero {
                assert_eq!(ng[j], 0.0, "norm of a zero row");
            }
        }
    }
}

#[test]
fn shape_errors_name_the_tensor() {
    let c = Cfg {
        t: 3,
        d_in: 9,
        d_out: 5,
        r: 2,
        mix: MIXES[0],
        bias: true,
        fifo: false,
        dora: true,
    };
    let (layer, x, _) = build(c, 6);
    let bad_gy = Tensor::from_f32(DType::F32, vec![3, 4], &[0.0; 12]).unwrap();
    let e = cpu::run(&layer, &x, Some(&bad_gy), GradMode::Detached).unwrap_err();
    assert!(e.to_string().starts_with("grad_y is [3, 4]"), "{e}");
    let bad_x = Tensor::from_f32(DType::F32, vec![3, 8], &[0.0; 24]).unwrap();
    let e = cpu::forward(&layer, &bad_x).unwrap_err();
    assert!(e.to_string().starts_with("x is [3, 8]"), "{e}");
}

#[test]
fn near_cancelling_rows_keep_their_digits() {
    // Rows where s·B_j·A ≈ −W0_j (n_j ~ 1e-3·‖W0_j‖): the expansion of n² would lose about
    // six digits there; the path must notice and still match the f64 norm row by row.
    let (d_in, d_out, r) = (129, 67, 7);
    for fifo in [false, true] {
        let c = Cfg {
            t: 3,
            d_in,
            d_out,
            r,
            mix: MIXES[0],
            bias: false,
            fifo,
            dora: false,
        };
        let (mut layer, _, _) = build(c, 500);
        let a = layer.lora_a.to_f64();
        let b = layer.lora_b.to_f64();
        let mut w = layer.weight.to_f64();
        let mut g = Gen::new(501);
        let delta = g.tensor(DType::F32, &[d_out, d_in], 1e-3).to_f64();
        for j in (0..d_out).step_by(3) {
            for i in 0..d_in {
                let sba: f64 = (0..r).map(|k| b[j * r + k] * a[k * d_in + i]).sum::<f64>() * 2.0;
                let idx = if fifo { i * d_out + j } else { j * d_in + i };
                w[idx] = -sba + delta[j * d_in + i];
            }
        }
        layer.weight = Tensor::from_f64(DType::F32, layer.weight.shape().to_vec(), &w).unwrap();
        let want = reference::norm_f64(&layer).unwrap();
        let got = cpu::norm(&layer).unwrap();
        for j in 0..d_out {
            let e = (got[j] as f64 - want[j]).abs() / want[j];
            assert!(
                e < 1e-5,
                "fifo={fifo} row {j}: n {} vs f64 {} ({e:.1e})",
                got[j],
                want[j]
            );
        }
    }
}
