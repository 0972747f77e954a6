//! The candle layers on CUDA tensors (feature `candle-cuda`): the kernels on candle's own
//! stream and buffers, against the float64 reference, and the example against PEFT's
//! embeddings. `#[ignore = "needs a CUDA GPU"]`, named `cuda`: scripts/gpu-check.sh runs them
//! (`--ignored cuda`); the same launch code runs in `cargo test` through the emulated route.

use crate::util::{candle, f64s, host, layer, values};
use candle_core::{Device, Module, Tensor, Var};
use dorafuse::candle::{DoraLinear, MultiDoraLinear};
use dorafuse::case_multi::AdapterWeights;
use dorafuse::cpu::reference::run_f64;
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, GradMode, Layer};
use rand::rngs::SmallRng;
use rand::SeedableRng;

/// d_in, d_out: off every tile (16, 32, 64, 256).
const D_IN: usize = 45;
const D_OUT: usize = 37;

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0")
}

fn on(t: &dorafuse::Tensor, dev: &Device) -> Tensor {
    candle(t).to_device(dev).unwrap()
}

fn truth(l: &Layer, x: &[f32], t: usize) -> Vec<f64> {
    let xh = host(l.weight.dtype(), &[t, D_IN], x);
    run_f64(l, &xh, None, GradMode::Detached).unwrap().y
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn single_adapter_on_cuda_tensors() {
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        for dora in [true, false] {
            let l = layer(7, D_IN, D_OUT, 5, dtype, dora);
            let lin = DoraLinear::new(
                &on(&l.weight, &dev),
                l.bias.as_ref().map(|b| on(b, &dev)).as_ref(),
                on(&l.lora_a, &dev),
                on(&l.lora_b, &dev),
                l.magnitude.as_ref().map(|m| on(m, &dev)),
                l.scaling,
            )
            .unwrap();
            let mut rng = SmallRng::seed_from_u64(3);
            let x = values(&mut rng, 2 * 7 * D_IN, 1.0);
            let xh = host(dtype, &[14, D_IN], &x);
            let xc = on(&xh, &dev).reshape((2, 7, D_IN)).unwrap();
            let y = lin.forward(&xc).unwrap();
            assert!(y.device().is_cuda(), "the output stays on the GPU");
            assert_eq!(y.dims(), [2, 7, D_OUT]);
            assert_eq!(y.dtype(), xc.dtype());
            let err = rel_l2(
                &f64s(&y.to_device(&Device::Cpu).unwrap()),
                &truth(&l, &xh.to_f32(), 14),
            );
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(err < tol, "{dtype:?} dora={dora}: rel L2 {err:.3e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn multi_adapter_on_cuda_tensors() {
    let dev = gpu();
    let d0 = layer(11, D_IN, D_OUT, 5, DType::F32, true);
    let l2 = Layer {
        weight: d0.weight.clone(),
        bias: d0.bias.clone(),
        ..layer(12, D_IN, D_OUT, 3, DType::F32, false)
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
    let xc = Tensor::from_vec(x.clone(), (t, D_IN), &dev).unwrap();
    let base = Layer {
        magnitude: None,
        lora_b: host(DType::F32, &[D_OUT, 5], &vec![0.0; D_OUT * 5]),
        ..d0.clone()
    };
    let multi = MultiDoraLinear::new(
        "test.linear",
        &on(&d0.weight, &dev),
        d0.bias.as_ref().map(|b| on(b, &dev)).as_ref(),
        vec![Some(slot(&d0)), None, Some(slot(&l2))],
    )
    .unwrap();
    let y = multi.with_index(&index).forward(&xc).unwrap();
    assert!(y.device().is_cuda());
    let y = f64s(&y.to_device(&Device::Cpu).unwrap());
    let (w0, w2, wb) = (truth(&d0, &x, t), truth(&l2, &x, t), truth(&base, &x, t));
    for (i, &k) in index.iter().enumerate() {
        let want = match k {
            0 => &w0,
            2 => &w2,
            _ => &wb,
        };
        let row = i * D_OUT..(i + 1) * D_OUT;
        let err = rel_l2(&y[row.clone()], &want[row]);
        assert!(err < 1e-5, "token {i} (slot {k}): rel L2 {err:.3e}");
    }
    // An index outside the slots: one line naming the layer and the token.
    let e = multi
        .with_index(&[0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .forward(&xc)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test.linear") && e.contains("adapter_index[1]") && !e.contains('\n'),
        "{e}"
    );
}

/// Training on CUDA tensors is refused in one line naming the layer (inference only there).
#[test]
#[ignore = "needs a CUDA GPU"]
fn training_on_cuda_tensors_is_refused() {
    let dev = gpu();
    let l = layer(8, D_IN, D_OUT, 4, DType::F32, true);
    let a = Var::from_tensor(&on(&l.lora_a, &dev)).unwrap();
    let lin = DoraLinear::new(
        &on(&l.weight, &dev),
        None,
        a.as_tensor().clone(),
        on(&l.lora_b, &dev),
        l.magnitude.as_ref().map(|m| on(m, &dev)),
        l.scaling,
    )
    .unwrap()
    .with_name("q_proj");
    let x = Tensor::zeros((3, D_IN), candle_core::DType::F32, &dev).unwrap();
    let e = lin.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("q_proj") && e.contains("training") && !e.contains('\n'),
        "{e}"
    );
}

/// The example with `--device cuda` against PEFT's embeddings (the fixture's mixed batch).
#[test]
#[ignore = "needs a CUDA GPU"]
fn example_matches_peft_on_cuda() {
    let err = crate::minilm::max_abs_vs_peft("cuda");
    assert!(err <= 1e-4, "max abs {err:.3e} against PEFT");
}
