//! `DoraLinear` and `MultiDoraLinear` against the CPU path and the float64 reference, on both
//! CPU routes (the CPU path, the emulated kernels), at sizes off every tile, in f32 and bf16,
//! DoRA and plain LoRA; and their one-line refusals.

use crate::util::{candle, candle_layer, f64s, host, layer, values};
use candle_core::{Device, Module, Tensor};
use dorafuse::candle::{CpuRoute, MultiDoraLinear};
use dorafuse::case_multi::AdapterWeights;
use dorafuse::cpu::reference::run_f64;
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, GradMode, Layer};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const ROUTES: [CpuRoute; 2] = [CpuRoute::CpuPath, CpuRoute::EmulatedKernels];
/// d_in, d_out, r: none a multiple of any tile (16, 32, 64).
const D_IN: usize = 45;
const D_OUT: usize = 37;

/// The f64 truth of `layer` on `x` `[T, d_in]` (values as the layer's dtype holds them).
fn truth(l: &Layer, x: &[f32], t: usize) -> Vec<f64> {
    let xh = host(l.weight.dtype(), &[t, D_IN], x);
    run_f64(l, &xh, None, GradMode::Detached).unwrap().y
}

/// The error an output in `dtype` may carry: f32 arithmetic, then the output's rounding.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

#[test]
fn single_adapter_matches_reference() {
    for dtype in [DType::F32, DType::BF16] {
        for dora in [true, false] {
            for route in ROUTES {
                let l = layer(7, D_IN, D_OUT, 5, dtype, dora);
                let lin = candle_layer(&l).with_route(route);
                let mut rng = SmallRng::seed_from_u64(3);
                let x = values(&mut rng, 2 * 7 * D_IN, 1.0);
                let xh = host(dtype, &[14, D_IN], &x);
                // [2, 7, d_in]: leading dimensions are flattened to tokens and restored.
                let xc = candle(&xh).reshape((2, 7, D_IN)).unwrap();
                let y = lin.forward(&xc).unwrap();
                assert_eq!(y.dims(), [2, 7, D_OUT]);
                assert_eq!(y.dtype(), xc.dtype());
                let want = truth(&l, &xh.to_f32(), 14);
                let err = rel_l2(&f64s(&y), &want);
                let case = format!("{dtype:?} dora={dora} {route:?}");
                assert!(err < tolerance(dtype), "{case}: rel L2 {err:.3e}");
                // The adapter shows: the base layer alone is far from y.
                let base = Layer {
                    lora_b: host(dtype, &[D_OUT, 5], &vec![0.0; D_OUT * 5]),
                    magnitude: None,
                    ..l.clone()
                };
                let off = rel_l2(&f64s(&y), &truth(&base, &xh.to_f32(), 14));
                assert!(
                    off > 0.05,
                    "{case}: the adapter changes y by only {off:.3e}"
                );
            }
        }
    }
}

#[test]
fn g_is_computed_once_at_construction() {
    let l = layer(8, D_IN, D_OUT, 4, DType::F32, true);
    let lin = candle_layer(&l);
    let g = lin.magnitude_scale().expect("a DoRA layer has g");
    let want = dorafuse::cpu::magnitude_scale(&l).unwrap().unwrap();
    assert_eq!(g, want.as_slice());
    assert!(candle_layer(&layer(8, D_IN, D_OUT, 4, DType::F32, false))
        .magnitude_scale()
        .is_none());
}

#[test]
fn merged_weight_gives_the_same_output() {
    let l = layer(9, D_IN, D_OUT, 6, DType::F32, true);
    let lin = candle_layer(&l);
    let w = lin.merged_weight(&Device::Cpu).unwrap();
    let mut rng = SmallRng::seed_from_u64(4);
    let x = values(&mut rng, 5 * D_IN, 1.0);
    let xc = Tensor::from_vec(x.clone(), (5, D_IN), &Device::Cpu).unwrap();
    let merged = candle_nn::Linear::new(w, Some(candle(l.bias.as_ref().unwrap())));
    let err = rel_l2(&f64s(&merged.forward(&xc).unwrap()), &truth(&l, &x, 5));
    assert!(err < 1e-5, "merged: rel L2 {err:.3e}");
}

/// Three slots: DoRA r=5, empty (that adapter leaves the module alone), LoRA r=3; tokens on
/// each slot and on none, in an order that interleaves them.
#[test]
fn multi_adapter_matches_reference_per_token() {
    let dtype = DType::F32;
    let d0 = layer(11, D_IN, D_OUT, 5, dtype, true);
    let l2 = Layer {
        weight: d0.weight.clone(),
        bias: d0.bias.clone(),
        ..layer(12, D_IN, D_OUT, 3, dtype, false)
    };
    let slot = |l: &Layer| AdapterWeights {
        lora_a: l.lora_a.clone(),
        lora_b: l.lora_b.clone(),
        magnitude: l.magnitude.clone(),
        scaling: l.scaling,
    };
    let index = [0, -1, 2, 1, 0, 0, 2, -1, 1, 2, 0];
    let t = index.len();
    let mut rng = SmallRng::seed_from_u64(5);
    let x = values(&mut rng, t * D_IN, 1.0);
    let xc = Tensor::from_vec(x.clone(), (t, D_IN), &Device::Cpu).unwrap();
    let base = Layer {
        lora_b: host(dtype, &[D_OUT, 5], &vec![0.0; D_OUT * 5]),
        magnitude: None,
        ..d0.clone()
    };
    let (want0, want2, want_base) = (truth(&d0, &x, t), truth(&l2, &x, t), truth(&base, &x, t));
    for route in ROUTES {
        let multi = MultiDoraLinear::new(
            "test.linear",
            &candle(&d0.weight),
            d0.bias.as_ref().map(candle).as_ref(),
            vec![Some(slot(&d0)), None, Some(slot(&l2))],
        )
        .unwrap()
        .with_route(route);
        assert_eq!((multi.slots(), multi.adapters()), (3, 2));
        let y = f64s(&multi.with_index(&index).forward(&xc).unwrap());
        for (i, &k) in index.iter().enumerate() {
            let want = match k {
                0 => &want0,
                2 => &want2,
                _ => &want_base,
            };
            let row = i * D_OUT..(i + 1) * D_OUT;
            let err = rel_l2(&y[row.clone()], &want[row]);
            assert!(
                err < 1e-5,
                "{route:?} token {i} (slot {k}): rel L2 {err:.3e}"
            );
        }
    }
}

fn one_line(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    assert!(!s.contains('\n'), "not one line: {s}");
    s
}

#[test]
fn refusals_are_one_line_and_name_the_culprit() {
    let l = layer(13, D_IN, D_OUT, 4, DType::F32, true);
    let lin = candle_layer(&l).with_name("encoder.layer.0.attention.self.query");
    let bad = Tensor::zeros((3, D_IN + 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = one_line(lin.forward(&bad).unwrap_err());
    assert!(
        e.contains("encoder.layer.0.attention.self.query") && e.contains("expected [..., 45]"),
        "{e}"
    );
    let ints = Tensor::zeros((3, D_IN), candle_core::DType::U32, &Device::Cpu).unwrap();
    let e = one_line(lin.forward(&ints).unwrap_err());
    assert!(e.contains("x is U32"), "{e}");

    // lora_B of another rank than lora_A.
    let e = dorafuse::candle::DoraLinear::new(
        &candle(&l.weight),
        None,
        candle(&l.lora_a),
        Tensor::zeros((D_OUT, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        None,
        1.0,
    )
    .unwrap_err();
    let e = one_line(format!("{e:#}"));
    assert!(e.contains("lora_B") && e.contains("rank"), "{e}");

    let multi = MultiDoraLinear::new(
        "encoder.layer.1.output.dense",
        &candle(&l.weight),
        None,
        vec![None, None],
    )
    .unwrap();
    let x = Tensor::zeros((3, D_IN), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = one_line(multi.forward_indexed(&x, &[0, 2, -1]).unwrap_err());
    assert!(
        e.contains("encoder.layer.1.output.dense") && e.contains("adapter_index[1] is 2"),
        "{e}"
    );
    let e = one_line(multi.forward_indexed(&x, &[0, 1]).unwrap_err());
    assert!(e.contains("adapter_index has 2 entries"), "{e}");
    // No adapter on the module: the base layer.
    let y = multi.forward_indexed(&x, &[0, 1, -1]).unwrap();
    assert_eq!(y.dims(), [3, D_OUT]);
}
