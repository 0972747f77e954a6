//! Training through candle's autograd: `DoraLinear` on `Var`s runs as a custom op whose
//! backward is dorafuse's. The gradients for x, A, B and m are held against the CPU path's
//! backward (`cpu::run`) and the float64 reference, in f32, detached and exact norm
//! gradients, on both CPU routes.

use crate::util::{candle, f64s, host, layer, values};
use candle_core::{Device, Module, Tensor, Var};
use dorafuse::candle::{CpuRoute, DoraLinear};
use dorafuse::cpu::reference::run_f64;
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, GradMode};
use rand::rngs::SmallRng;
use rand::SeedableRng;

const T: usize = 9;
const D_IN: usize = 45;
const D_OUT: usize = 37;
const R: usize = 5;

fn check(dora: bool, mode: GradMode, route: CpuRoute) {
    let case = format!("dora={dora} {mode:?} {route:?}");
    let l = layer(21, D_IN, D_OUT, R, DType::F32, dora);
    let mut rng = SmallRng::seed_from_u64(22);
    let x = values(&mut rng, T * D_IN, 1.0);
    let gy = values(&mut rng, T * D_OUT, 1.0);
    let (xh, gyh) = (
        host(DType::F32, &[T, D_IN], &x),
        host(DType::F32, &[T, D_OUT], &gy),
    );

    let x0 = Var::from_tensor(&candle(&xh)).unwrap();
    let a = Var::from_tensor(&candle(&l.lora_a)).unwrap();
    let b = Var::from_tensor(&candle(&l.lora_b)).unwrap();
    let m = l
        .magnitude
        .as_ref()
        .map(|m| Var::from_tensor(&candle(m)).unwrap());
    let lin = DoraLinear::new(
        &candle(&l.weight),
        l.bias.as_ref().map(candle).as_ref(),
        a.as_tensor().clone(),
        b.as_tensor().clone(),
        m.as_ref().map(|m| m.as_tensor().clone()),
        l.scaling,
    )
    .unwrap()
    .with_route(route)
    .with_grad_mode(mode);
    // x reaches the layer through a candle op, so its gradient goes through candle's chain
    // rule too: d(loss)/d(x0) = 2·grad_x.
    let xin = (x0.as_tensor() * 2.0).unwrap();
    let y = lin.forward(&xin).unwrap();
    let gyc = Tensor::from_vec(gy.clone(), (T, D_OUT), &Device::Cpu).unwrap();
    let loss = (&y * &gyc).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grad = |v: &Var| f64s(grads.get(v.as_tensor()).expect("a gradient for every Var"));

    let x2 = host(
        DType::F32,
        &[T, D_IN],
        &x.iter().map(|v| 2.0 * v).collect::<Vec<_>>(),
    );
    let cpu = dorafuse::cpu::run(&l, &x2, Some(&gyh), mode).unwrap();
    let cg = cpu.grads.unwrap();
    let truth = run_f64(&l, &x2, Some(&gyh), mode).unwrap();
    let f = |t: &dorafuse::Tensor| t.to_f64();
    let got_x: Vec<f64> = grad(&x0).iter().map(|v| v / 2.0).collect();
    let mut pairs = vec![
        ("y", f64s(&y), f(&cpu.y), truth.y.clone()),
        ("grad_x", got_x, f(&cg.grad_x), truth.grad_x.clone()),
        (
            "grad_lora_A",
            grad(&a),
            f(&cg.grad_lora_a),
            truth.grad_lora_a.clone(),
        ),
        (
            "grad_lora_B",
            grad(&b),
            f(&cg.grad_lora_b),
            truth.grad_lora_b.clone(),
        ),
    ];
    if let Some(m) = &m {
        pairs.push((
            "grad_magnitude",
            grad(m),
            f(cg.grad_magnitude.as_ref().unwrap()),
            truth.grad_magnitude.clone().unwrap(),
        ));
    }
    for (name, got, cpu, truth) in pairs {
        let e_cpu = rel_l2(&got, &cpu);
        let e_truth = rel_l2(&got, &truth);
        assert!(
            e_cpu <= 1e-5,
            "{case}: {name} vs the CPU backward: rel L2 {e_cpu:.3e}"
        );
        assert!(
            e_truth <= 1e-5,
            "{case}: {name} vs float64: rel L2 {e_truth:.3e}"
        );
        assert!(got.iter().any(|v| *v != 0.0), "{case}: {name} is all zero");
    }
}

#[test]
fn gradients_match_the_cpu_backward() {
    for mode in [GradMode::Detached, GradMode::Exact] {
        for dora in [true, false] {
            check(dora, mode, CpuRoute::CpuPath);
        }
    }
}

#[test]
fn gradients_on_the_emulated_kernels() {
    for mode in [GradMode::Detached, GradMode::Exact] {
        check(true, mode, CpuRoute::EmulatedKernels);
    }
}

/// The detached and exact gradients differ (the test above would not tell them apart if the
/// mode were ignored).
#[test]
fn grad_mode_is_honoured() {
    let l = layer(23, D_IN, D_OUT, R, DType::F32, true);
    let mut rng = SmallRng::seed_from_u64(24);
    let x = candle(&host(
        DType::F32,
        &[T, D_IN],
        &values(&mut rng, T * D_IN, 1.0),
    ));
    let ga = |mode| {
        let a = Var::from_tensor(&candle(&l.lora_a)).unwrap();
        let lin = DoraLinear::new(
            &candle(&l.weight),
            None,
            a.as_tensor().clone(),
            candle(&l.lora_b),
            l.magnitude.as_ref().map(candle),
            l.scaling,
        )
        .unwrap()
        .with_grad_mode(mode);
        let g = lin
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        f64s(g.get(a.as_tensor()).unwrap())
    };
    let (d, e) = (ga(GradMode::Detached), ga(GradMode::Exact));
    assert!(
        rel_l2(&d, &e) > 1e-3,
        "detached and exact gradients of A coincide"
    );
}
