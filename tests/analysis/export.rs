//! `export-lora`: the randomized SVD of a DoRA layer's full update ΔW, checked against a dense
//! float64 ΔW built here; the written LoRA adapter against PEFT's own merge of it (PEFT loaded
//! the committed outputs in tests/fixtures/analysis/derived; gen_analysis.py).

use crate::util::*;

use dorafuse::adapter::{AdaptedModel, AdapterModule};
use dorafuse::analysis::export::{export_lora, ExportOptions, ExportRow};
use dorafuse::analysis::lowrank::RankTarget;
use dorafuse::analysis::{INPUT_SEED, INPUT_TOKENS};

const ADAPTERS: [&str; 2] = ["tiny/dora/checkpoint-30", "conv/dora"];

fn opts(target: RankTarget) -> ExportOptions {
    ExportOptions {
        target,
        ..ExportOptions::default()
    }
}

/// Dense float64 (ΔW, W', W0) `[d_out, d_in]` of a DoRA module, and its bias.
fn dense(model: &AdaptedModel<'_>, m: &AdapterModule) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let l = model.layer(&m.name).unwrap();
    let (d_in, d_out, _) = m.dims();
    let w = w0(&l.weight, l.fan_in_fan_out);
    let mut v = update(m);
    v.iter_mut().zip(&w).for_each(|(u, w)| *u += w);
    let mag = m.magnitude.as_ref().unwrap().to_f64();
    for j in 0..d_out {
        let row = &mut v[j * d_in..(j + 1) * d_in];
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x *= mag[j] / n);
    }
    let dw: Vec<f64> = v.iter().zip(&w).map(|(a, b)| a - b).collect();
    let bias = l.bias.as_ref().map_or(vec![0.0; d_out], |b| b.to_f64());
    (dw, v, w, bias)
}

/// `x·Mᵀ` for the reports' random x, `[T, d_out]`.
fn apply(m: &[f64], d_out: usize, d_in: usize) -> Vec<f64> {
    let x = dorafuse::analysis::lowrank::gaussian(d_in, INPUT_TOKENS, INPUT_SEED);
    let mut y = vec![0f64; INPUT_TOKENS * d_out];
    for t in 0..INPUT_TOKENS {
        for j in 0..d_out {
            y[t * d_out + j] = (0..d_in).map(|i| x.read(i, t) * m[j * d_in + i]).sum();
        }
    }
    y
}

fn check_rows(rel_path: &str, target: RankTarget) -> Vec<ExportRow> {
    let src = adapter(rel_path);
    let base = base(base_of(rel_path));
    let model = AdaptedModel::new(&base, &src).unwrap();
    let (out, rows) = export_lora(&model, opts(target)).unwrap();
    assert!(!out.is_dora() && out.modules.values().all(|m| m.magnitude.is_none()));
    for row in &rows {
        let m = &src.modules[&row.module];
        let (dw, wp, _, bias) = dense(&model, m);
        let lo = update(&out.modules[&row.module]);
        let err = rel(&lo, &dw);
        assert!(
            (err - row.weight_rel_err).abs() <= 1e-10 + 1e-7 * err,
            "{rel_path} {} rank {}: reported {} but the dense float64 error is {err}",
            row.module,
            row.rank,
            row.weight_rel_err
        );
        let fro = dw.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((fro - row.delta_w_fro).abs() <= 1e-12 * fro);
        // Layer output: y = x·W'ᵀ + b against x·(W0 + s'B'A')ᵀ + b.
        let resid: Vec<f64> = dw.iter().zip(&lo).map(|(a, b)| a - b).collect();
        let dy = apply(&resid, row.d_out, row.d_in);
        let mut y = apply(&wp, row.d_out, row.d_in);
        y.chunks_mut(row.d_out)
            .for_each(|r| r.iter_mut().zip(&bias).for_each(|(y, b)| *y += b));
        let ny = y.iter().map(|x| x * x).sum::<f64>().sqrt();
        let out_err = dy.iter().map(|x| x * x).sum::<f64>().sqrt() / ny;
        assert!(
            (out_err - row.output_rel_err).abs() <= 1e-10 + 1e-7 * out_err,
            "{rel_path} {}: output error reported {} vs dense {out_err}",
            row.module,
            row.output_rel_err
        );
    }
    rows
}

#[test]
fn reported_errors_are_the_true_errors_and_fall_with_the_rank() {
    for rel_path in ADAPTERS {
        let src = adapter(rel_path);
        let full = src
            .modules
            .values()
            .map(|m| m.dims().0.min(m.dims().1))
            .min()
            .unwrap();
        let mut last: Option<Vec<ExportRow>> = None;
        for k in [1, 2, 4, 8, 16, full] {
            let rows = check_rows(rel_path, RankTarget::Rank(k));
            if let Some(prev) = &last {
                for (p, r) in prev.iter().zip(&rows) {
                    assert!(
                        r.weight_rel_err < p.weight_rel_err,
                        "{rel_path} {}: rank {} error {} not below rank {} error {}",
                        r.module,
                        r.rank,
                        r.weight_rel_err,
                        p.rank,
                        p.weight_rel_err
                    );
                }
            }
            last = Some(rows);
        }
        // At the full rank of ΔW only the f32 rounding of the written factors remains.
        for r in last.unwrap() {
            let n = r.d_out.min(r.d_in);
            if r.rank == n {
                assert!(r.weight_rel_err < 1e-6 && r.output_rel_err < 1e-6, "{r:?}");
            }
        }
    }
}

#[test]
fn energy_target_is_the_smallest_rank_holding_the_energy() {
    for rel_path in ADAPTERS {
        for e in [0.5, 0.9, 0.99] {
            let rows = check_rows(rel_path, RankTarget::Energy(e));
            for r in &rows {
                // Kept energy 1 − err² reaches e ...
                assert!(
                    1.0 - r.weight_rel_err.powi(2) >= e - 1e-6,
                    "{rel_path} {r:?}"
                );
                // ... and one rank less cannot, even with the exact SVD (Eckart–Young): the
                // dense singular values of ΔW, from faer here.
                let src = adapter(rel_path);
                let base = base(base_of(rel_path));
                let model = AdaptedModel::new(&base, &src).unwrap();
                let (dw, _, _, _) = dense(&model, &src.modules[&r.module]);
                let m = faer::Mat::from_fn(r.d_out, r.d_in, |j, i| dw[j * r.d_in + i]);
                let mut s = m.singular_values();
                s.sort_by(|a, b| b.total_cmp(a));
                let total: f64 = s.iter().map(|x| x * x).sum();
                let best: f64 = s.iter().take(r.rank - 1).map(|x| x * x).sum();
                assert!(
                    best / total < e,
                    "{rel_path} {}: rank {} is not the smallest for energy {e}",
                    r.module,
                    r.rank
                );
            }
        }
    }
}

#[test]
fn peft_merges_the_exported_adapters_to_w0_plus_low_rank() {
    let check = peft_check();
    let cases = [
        (
            "tiny_dora_export_r5",
            "tiny/dora/checkpoint-30",
            RankTarget::Rank(5),
        ),
        (
            "conv_dora_export_e95",
            "conv/dora",
            RankTarget::Energy(0.95),
        ),
    ];
    for (name, src_path, target) in cases {
        let committed = adapter(&format!("derived/{name}"));
        assert!(!committed.is_dora());
        let base = base(base_of(src_path));
        let src = adapter(src_path);
        let (fresh, _) =
            export_lora(&AdaptedModel::new(&base, &src).unwrap(), opts(target)).unwrap();
        assert_eq!(fresh.config.to_json(), committed.config.to_json(), "{name}");
        let model = AdaptedModel::new(&base, &committed).unwrap();
        for (module, m) in &committed.modules {
            let e = rel(&update(&fresh.modules[module]), &update(m));
            assert!(
                e < 1e-6,
                "{name} {module}: fresh export differs from the committed one by {e:e}"
            );
            let l = model.layer(module).unwrap();
            let (d_in, d_out, _) = m.dims();
            let mut want = w0(&l.weight, l.fan_in_fan_out);
            want.iter_mut().zip(update(m)).for_each(|(w, u)| *w += u);
            let (shape, merged) = &check[&format!("merged.{name}.{module}")];
            // PEFT's merged weight, in the base's stored orientation.
            let merged = if l.fan_in_fan_out {
                assert_eq!(shape, &vec![d_in, d_out]);
                (0..d_out * d_in)
                    .map(|k| merged[(k % d_in) * d_out + k / d_in])
                    .collect::<Vec<_>>()
            } else {
                assert_eq!(shape, &vec![d_out, d_in]);
                merged.clone()
            };
            let e = rel(&merged, &want);
            assert!(
                e < 1e-12,
                "{name} {module}: PEFT's merge differs from W0 + s'B'A' by {e:e}"
            );
        }
    }
}
