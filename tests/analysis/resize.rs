//! `resize`: SVD truncation of each module's update from its factors, against numpy's
//! float64 SVD of the dense s·B·A, and the written adapter against PEFT itself (PEFT loaded
//! the committed outputs in tests/fixtures/analysis/derived and recorded its layer outputs in
//! peft_check.safetensors; gen_analysis.py).

use crate::util::*;

use dorafuse::adapter::{AdaptedModel, Adapter};
use dorafuse::analysis::lowrank::RankTarget;
use dorafuse::analysis::resize::{resize, ResizeOptions};
use dorafuse::{DType, Tensor};

const ADAPTERS: [&str; 3] = [
    "tiny/dora/checkpoint-30",
    "tiny/lora/checkpoint-30",
    "conv/dora",
];

fn opts(target: RankTarget, per_module: bool) -> ResizeOptions {
    ResizeOptions { target, per_module }
}

fn numpy_sigma(exp: &serde_json::Value, rel: &str, module: &str) -> Vec<f64> {
    exp["adapters"][rel]["modules"][module]["sigma"]
        .as_array()
        .unwrap_or_else(|| panic!("{rel} {module} missing from expected.json"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn numpy_energy(sigma: &[f64], k: usize) -> f64 {
    let total: f64 = sigma.iter().map(|x| x * x).sum();
    sigma.iter().take(k).map(|x| x * x).sum::<f64>() / total
}

#[test]
fn own_rank_reproduces_every_update_to_1e6() {
    for rel_path in ADAPTERS {
        let src = adapter(rel_path);
        let max_r = src.modules.values().map(|m| m.rank).max().unwrap();
        let (out, rows) = resize(&src, None, opts(RankTarget::Rank(max_r), false)).unwrap();
        assert_eq!(rows.len(), src.modules.len());
        for (name, m) in &src.modules {
            let n = &out.modules[name];
            assert_eq!(n.rank, m.rank, "{rel_path} {name}");
            let e = rel(&update(n), &update(m));
            assert!(e < 1e-6, "{rel_path} {name}: s'B'A' off by {e:e}");
            assert_eq!(
                n.magnitude, m.magnitude,
                "{rel_path} {name}: magnitude must be kept"
            );
        }
        for r in &rows {
            assert!((r.energy_kept - 1.0).abs() < 1e-12, "{r:?}");
            assert!(
                r.update_rel_err < 1e-6 && r.output_rel_change < 1e-6,
                "{r:?}"
            );
        }
    }
}

#[test]
fn energies_and_singular_values_match_numpy() {
    let exp = expected();
    for rel_path in ADAPTERS {
        let src = adapter(rel_path);
        let max_r = src.modules.values().map(|m| m.rank).max().unwrap();
        for k in 1..=max_r {
            let (out, rows) = resize(&src, None, opts(RankTarget::Rank(k), false)).unwrap();
            for row in &rows {
                let sigma = numpy_sigma(&exp, rel_path, &row.module);
                let r = src.modules[&row.module].rank;
                assert_eq!(row.rank, k.min(r), "{rel_path} {}", row.module);
                // numpy's SVD of the dense d_out×d_in update has min(d_out, d_in) values, the
                // ones past the rank ~0.
                for (i, s) in row.singular_values.iter().enumerate() {
                    assert!(
                        (s - sigma[i]).abs() <= 1e-9 * sigma[0],
                        "{rel_path} {} σ{i}: {s} vs {}",
                        row.module,
                        sigma[i]
                    );
                }
                let want = numpy_energy(&sigma, row.rank);
                assert!(
                    (row.energy_kept - want).abs() < 1e-6,
                    "{rel_path} {} k={k}: energy {} vs numpy {want}",
                    row.module,
                    row.energy_kept
                );
                // The dropped energy is the squared relative error of the written update.
                let got = rel(
                    &update(&out.modules[&row.module]),
                    &update(&src.modules[&row.module]),
                );
                assert!(
                    (got - row.update_rel_err).abs() < 1e-6,
                    "{got} vs {}",
                    row.update_rel_err
                );
                assert!(
                    (got * got - (1.0 - want)).abs() < 1e-6,
                    "{rel_path} {} k={k}",
                    row.module
                );
            }
        }
    }
}

#[test]
fn energy_target_keeps_the_smallest_rank_that_holds_it() {
    let exp = expected();
    for rel_path in ADAPTERS {
        let src = adapter(rel_path);
        for e in [0.3, 0.5, 0.8, 0.9, 0.99, 1.0] {
            let (_, rows) = resize(&src, None, opts(RankTarget::Energy(e), true)).unwrap();
            let mut needed = Vec::new();
            for row in &rows {
                let sigma = numpy_sigma(&exp, rel_path, &row.module);
                let r = src.modules[&row.module].rank;
                // Smallest k with numpy energy ≥ e (e = 1 needs every nonzero direction:
                // numerically, the module's full rank).
                let k = (1..=r)
                    .find(|&k| numpy_energy(&sigma, k) >= e - 1e-12)
                    .unwrap_or(r);
                assert_eq!(row.rank, k, "{rel_path} {} energy {e}", row.module);
                assert!(row.energy_kept >= e - 1e-12);
                needed.push(k);
            }
            // Without --per-module: one rank for all, the largest needed (capped per module).
            let k_all = *needed.iter().max().unwrap();
            let (_, rows) = resize(&src, None, opts(RankTarget::Energy(e), false)).unwrap();
            for row in &rows {
                assert_eq!(
                    row.rank,
                    k_all.min(row.rank_before),
                    "{rel_path} {}",
                    row.module
                );
            }
        }
    }
}

#[test]
fn ranks_and_scaling_are_written_so_peft_and_dorafuse_read_them_back() {
    // Mixed ranks: rank_pattern must give each module its rank, and the kept lora_alpha /
    // alpha_pattern its scaling alpha/k.
    let src = adapter("tiny/lora/checkpoint-30");
    let (out, rows) = resize(&src, None, opts(RankTarget::Energy(0.9), true)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resized");
    dorafuse::analysis::save_new_adapter(&out, &path).unwrap();
    let back = Adapter::load(&path).unwrap();
    for row in &rows {
        let m = &back.modules[&row.module];
        assert_eq!(m.rank, row.rank);
        assert_eq!(m.alpha, src.modules[&row.module].alpha);
        assert_eq!(m.scaling, m.alpha / row.rank as f64);
    }
    assert!(
        rows.iter()
            .map(|r| r.rank)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1,
        "fixture should give mixed ranks"
    );
}

/// The committed outputs: recomputed now, they give the same updates; PEFT's layer outputs on
/// them equal dorafuse's CPU path.
#[test]
fn peft_loads_the_resized_adapters_and_its_outputs_equal_the_cpu_path() {
    let check = peft_check();
    let cases = [
        (
            "tiny_dora_resize_r3",
            "tiny/dora/checkpoint-30",
            RankTarget::Rank(3),
            false,
        ),
        (
            "tiny_lora_resize_e90",
            "tiny/lora/checkpoint-30",
            RankTarget::Energy(0.9),
            true,
        ),
        (
            "conv_dora_resize_r4",
            "conv/dora",
            RankTarget::Rank(4),
            false,
        ),
    ];
    for (name, src_path, target, per_module) in cases {
        let committed = adapter(&format!("derived/{name}"));
        let (fresh, _) = resize(&adapter(src_path), None, opts(target, per_module)).unwrap();
        assert_eq!(fresh.config.to_json(), committed.config.to_json(), "{name}");
        for (m, c) in &committed.modules {
            let e = rel(&update(&fresh.modules[m]), &update(c));
            assert!(
                e < 1e-6,
                "{name} {m}: fresh resize differs from the committed one by {e:e}"
            );
        }
        let base = base(base_of(src_path));
        let model = AdaptedModel::new(&base, &committed).unwrap();
        let mut seen = 0;
        for module in committed.modules.keys() {
            let (xs, x) = &check[&format!("x.{name}.{module}")];
            let (_, y_peft) = &check[&format!("y.{name}.{module}")];
            let layer = model.layer(module).unwrap();
            let xt = Tensor::from_f64(DType::F32, xs.clone(), x).unwrap();
            let y = dorafuse::cpu::forward(&layer, &xt).unwrap().to_f64();
            let e = rel(&y, y_peft);
            assert!(e < 1e-5, "{name} {module}: CPU path vs PEFT {e:e}");
            seen += 1;
        }
        assert_eq!(seen, committed.modules.len());
    }
}

#[test]
fn with_a_base_dora_reports_the_change_of_g_and_of_the_layer() {
    let src = adapter("tiny/dora/checkpoint-30");
    let base = base("tiny/base");
    let model = AdaptedModel::new(&base, &src).unwrap();
    let (_, full) = resize(&src, Some(&model), opts(RankTarget::Rank(8), false)).unwrap();
    let (_, low) = resize(&src, Some(&model), opts(RankTarget::Rank(2), false)).unwrap();
    for (f, l) in full.iter().zip(&low) {
        assert_eq!(f.output_scope, "layer");
        assert!(
            f.g_max_rel_change.unwrap() < 1e-6 && f.output_rel_change < 1e-6,
            "{f:?}"
        );
        assert!(
            l.g_max_rel_change.unwrap() > 1e-4 && l.output_rel_change > 1e-3,
            "{l:?}"
        );
    }
    // The layer change against a dense float64 layer: y = g ⊙ (x·(W0 + s·B·A)ᵀ) + b.
    let (out, rows) = resize(&src, Some(&model), opts(RankTarget::Rank(2), false)).unwrap();
    let new_model = AdaptedModel::new(&base, &out).unwrap();
    for row in &rows {
        let (a, b) = (
            model.layer(&row.module).unwrap(),
            new_model.layer(&row.module).unwrap(),
        );
        let x = dorafuse::analysis::lowrank::gaussian(
            row.d_in,
            dorafuse::analysis::INPUT_TOKENS,
            dorafuse::analysis::INPUT_SEED,
        );
        let xt: Vec<f64> = (0..x.ncols())
            .flat_map(|t| (0..x.nrows()).map(move |i| (t, i)))
            .map(|(t, i)| x.read(i, t))
            .collect();
        let y = |l: &dorafuse::Layer, m: &dorafuse::adapter::AdapterModule| {
            let w = w0(&l.weight, false);
            let mut v = update(m);
            v.iter_mut().zip(&w).for_each(|(u, w)| *u += w);
            let mag = m.magnitude.as_ref().unwrap().to_f64();
            for j in 0..row.d_out {
                let r = &mut v[j * row.d_in..(j + 1) * row.d_in];
                let n = r.iter().map(|x| x * x).sum::<f64>().sqrt();
                r.iter_mut().for_each(|x| *x *= mag[j] / n);
            }
            let vt: Vec<f64> = (0..row.d_in)
                .flat_map(|i| (0..row.d_out).map(move |j| (i, j)))
                .map(|(i, j)| v[j * row.d_in + i])
                .collect();
            let mut y = matmul(&xt, &vt, x.ncols(), row.d_in, row.d_out);
            let bias = l.bias.as_ref().unwrap().to_f64();
            y.chunks_mut(row.d_out)
                .for_each(|r| r.iter_mut().zip(&bias).for_each(|(y, b)| *y += b));
            y
        };
        let y_old = y(&a, &src.modules[&row.module]);
        let y_new = y(&b, &out.modules[&row.module]);
        let e = rel(&y_new, &y_old);
        assert!(
            (e - row.output_rel_change).abs() < 1e-9 * e.max(1e-3),
            "{}: {e} vs {}",
            row.module,
            row.output_rel_change
        );
    }
}
