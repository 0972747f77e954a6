//! Finite-difference checks of the float64 reference's backward (the oracle of every path):
//! each gradient element against a central difference of the loss `L = Σ y ⊙ grad_y`.
//! The detached gradient is checked with the norm held fixed in the difference (that is
//! what "detached" means); the exact gradient with the norm recomputed.

use dorafuse::cpu::reference::RefLayer;
use dorafuse::layer::GradMode;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

fn randn(rng: &mut rand::rngs::StdRng, n: usize, std: f64) -> Vec<f64> {
    (0..n)
        .map(|_| rng.sample::<f64, _>(StandardNormal) * std)
        .collect()
}

struct Setup {
    layer: RefLayer,
    x: Vec<f64>,
    dy: Vec<f64>,
    t: usize,
}

fn setup(seed: u64, fifo: bool, bias: bool, dora: bool) -> Setup {
    let (t, d_in, d_out, r) = (3, 5, 4, 3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let weight = randn(&mut rng, d_in * d_out, 0.5);
    let layer = RefLayer {
        d_in,
        d_out,
        r,
        weight,
        fan_in_fan_out: fifo,
        bias: bias.then(|| randn(&mut rng, d_out, 0.5)),
        lora_a: randn(&mut rng, r * d_in, 0.5),
        lora_b: randn(&mut rng, d_out * r, 0.3),
        magnitude: dora.then(|| {
            (0..d_out)
                .map(|_| 0.5 + rng.gen::<f64>())
                .collect::<Vec<f64>>()
        }),
        scaling: 1.7,
    };
    Setup {
        x: randn(&mut rng, t * d_in, 1.0),
        dy: randn(&mut rng, t * d_out, 1.0),
        t,
        layer,
    }
}

fn loss(l: &RefLayer, x: &[f64], t: usize, dy: &[f64], fixed: Option<&[f64]>) -> f64 {
    l.forward(x, t, fixed)
        .iter()
        .zip(dy)
        .map(|(a, b)| a * b)
        .sum()
}

/// Compares `grad` with central differences of `loss` over every element of the parameter
/// selected by `param`.
fn check(
    what: &str,
    s: &Setup,
    grad: &[f64],
    mode: GradMode,
    param: for<'a> fn(&'a mut RefLayer, &'a mut Vec<f64>) -> &'a mut Vec<f64>,
) {
    let fixed = s.layer.norm();
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for (i, &analytic) in grad.iter().enumerate() {
        let eval = |delta: f64| {
            let mut l = s.layer.clone();
            let mut x = s.x.clone();
            param(&mut l, &mut x)[i] += delta;
            let fixed = (mode == GradMode::Detached).then_some(fixed.as_slice());
            loss(&l, &x, s.t, &s.dy, fixed)
        };
        let fd = (eval(h) - eval(-h)) / (2.0 * h);
        let err = (fd - analytic).abs() / (1.0 + fd.abs());
        assert!(
            err < 1e-7,
            "{what} {mode:?}: element {i}: analytic {analytic} vs finite difference {fd}"
        );
        worst = worst.max(err);
    }
    assert!(
        grad.iter().any(|g| g.abs() > 1e-3),
        "{what}: trivial gradient"
    );
    eprintln!("{what} {mode:?}: worst {worst:.1e}");
}

fn check_all(seed: u64, fifo: bool, bias: bool, dora: bool) {
    let s = setup(seed, fifo, bias, dora);
    let modes: &[GradMode] = if dora {
        &[GradMode::Detached, GradMode::Exact]
    } else {
        &[GradMode::Detached]
    };
    for &mode in modes {
        let out = s.layer.run(&s.x, s.t, Some(&s.dy), mode, None);
        check("grad_x", &s, &out.grad_x, mode, |_, x| x);
        check("grad_lora_A", &s, &out.grad_lora_a, mode, |l, _| {
            &mut l.lora_a
        });
        check("grad_lora_B", &s, &out.grad_lora_b, mode, |l, _| {
            &mut l.lora_b
        });
        if dora {
            let gm = out
                .grad_magnitude
                .as_ref()
                .expect("DoRA has grad_magnitude");
            check("grad_magnitude", &s, gm, mode, |l, _| {
                l.magnitude.as_mut().unwrap()
            });
        } else {
            assert!(out.grad_magnitude.is_none());
        }
    }
}

#[test]
fn dora_bias_detached_and_exact() {
    check_all(1, false, true, true);
}

#[test]
fn dora_fan_in_fan_out_no_bias() {
    check_all(2, true, false, true);
}

#[test]
fn plain_lora() {
    check_all(3, false, true, false);
}

#[test]
fn detached_and_exact_differ() {
    // The check above would pass vacuously if both modes returned the same thing.
    let s = setup(4, false, true, true);
    let d = s
        .layer
        .run(&s.x, s.t, Some(&s.dy), GradMode::Detached, None);
    let e = s.layer.run(&s.x, s.t, Some(&s.dy), GradMode::Exact, None);
    let diff: f64 = d
        .grad_lora_a
        .iter()
        .zip(&e.grad_lora_a)
        .map(|(a, b)| (a - b).abs())
        .sum();
    assert!(diff > 1e-3, "exact and detached grad_lora_A agree: {diff}");
    assert_eq!(d.grad_x, e.grad_x, "grad_x does not depend on the mode");
}
