//! The multi-adapter forward (`kernels/multi.cu`) on a real GPU: PEFT's multi-adapter cases
//! against their float64 truth with replay's bars, a decode batch of 64 tokens over 64
//! adapters (DoRA and LoRA, ranks 8/16/64) against the CPU path, bitwise batch invariance, a
//! fused-QKV column slice finished in place, and the device-flagged bad index. The same paths
//! run on the emulator in multi_adapter.rs.
//!
//! Each test is `#[ignore = "needs a CUDA GPU"]` and named `cuda_*`: scripts/gpu-check.sh runs
//! them with `--ignored cuda`; without a device they fail, saying why.

use crate::gpu_util::{assert_close, backend, random_tensor, rng};
use dorafuse::case_multi::{AdapterWeights, MultiCase, MultiLayer};
use dorafuse::cpu;
use dorafuse::kernels::multi::{self, MultiBase};
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use std::path::PathBuf;

/// `DORAFUSE_GPU_QUICK=1` (the sanitizer runs): fewer cases.
fn quick() -> bool {
    std::env::var("DORAFUSE_GPU_QUICK").is_ok_and(|v| v == "1")
}

fn fixtures() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/multi");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 5);
    v
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_peft_multi_adapter_cases_meet_the_bars() {
    let b = backend();
    for path in fixtures() {
        let case = MultiCase::read(&path).unwrap();
        let y = multi::run_multi(
            &b,
            &case.layer,
            &case.x,
            &case.adapter_index,
            MultiBase::Compute,
        )
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let dt = case.x.dtype();
        let bar = match dt {
            DType::F32 => 1e-5,
            _ => (2.0 * case.peft_rel_err().unwrap()).min(dt.tolerance()),
        };
        let err = rel_l2(&y.to_f64(), &case.expected_y.as_ref().unwrap().to_f64());
        assert!(err <= bar, "{}: {err:.3e} > {bar:.3e}", path.display());
        let d_out = y.shape()[1];
        let (yv, bias) = (y.to_f64(), case.layer.bias.as_ref().unwrap().to_f64());
        for (k, rows) in case.zero_rows().unwrap() {
            for (i, _) in case
                .adapter_index
                .iter()
                .enumerate()
                .filter(|(_, &a)| a == k as i32)
            {
                for &j in &rows {
                    assert_eq!(yv[i * d_out + j], bias[j], "token {i} row {j}: y = bias");
                }
            }
        }
    }
}

/// `n` adapters over one base, ranks cycling through 8/16/64, every other one DoRA.
fn layer(seed: u64, dt: DType, adt: DType, (d_in, d_out): (usize, usize), n: usize) -> MultiLayer {
    let mut g = rng(seed);
    let adapters = (0..n)
        .map(|k| {
            let r = [8, 16, 64][k % 3];
            AdapterWeights {
                lora_a: random_tensor(&mut g, adt, &[r, d_in], 1.0 / (d_in as f32).sqrt()),
                lora_b: random_tensor(&mut g, adt, &[d_out, r], 0.5 / (r as f32).sqrt()),
                magnitude: (k % 2 == 0).then(|| {
                    let m: Vec<f32> = (0..d_out).map(|_| g.gen_range(0.5..1.5)).collect();
                    Tensor::from_f32(DType::F32, vec![d_out], &m).unwrap()
                }),
                scaling: 0.5 + 0.01 * k as f64,
            }
        })
        .collect();
    MultiLayer {
        weight: random_tensor(&mut g, dt, &[d_out, d_in], 1.0 / (d_in as f32).sqrt()),
        bias: Some(random_tensor(&mut g, dt, &[d_out], 0.5)),
        fan_in_fan_out: false,
        adapters,
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_decode_batch_over_64_adapters_matches_the_cpu_path() {
    let b = backend();
    for (dt, adt) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F16),
        (DType::BF16, DType::F32),
    ] {
        let l = layer(1, dt, adt, (1031, 1029), 64);
        let mut g = rng(2);
        let x = random_tensor(&mut g, dt, &[64, 1031], 1.0);
        let mut idx: Vec<i32> = (0..64).collect();
        idx[5] = -1;
        idx.shuffle(&mut g);
        let y = multi::run_multi(&b, &l, &x, &idx, MultiBase::Compute).unwrap();
        let want = cpu::multi::forward(&l, &x, &idx).unwrap();
        assert_close(
            &format!("{dt}/{adt}"),
            &y.to_f64(),
            &want.to_f64(),
            2.0 * dt.tolerance(),
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_a_token_is_bit_identical_alone_and_in_any_batch_on_the_gpu() {
    let b = backend();
    let (d_in, d_out) = (517, 300);
    for (dt, adt) in [(DType::F32, DType::F32), (DType::BF16, DType::F32)] {
        // Targets 0, 1, 2 sit on the slots drawn for them below (DoRA, LoRA or base-only).
        let l = layer(3, dt, adt, (d_in, d_out), 6);
        let mut g = rng(4);
        let pool = 257;
        let xs = random_tensor(&mut g, dt, &[pool, d_in], 1.0).to_f32();
        let base = random_tensor(&mut g, dt, &[pool, d_out], 1.0).to_f32();
        let slots: Vec<i32> = (0..pool).map(|_| g.gen_range(-1..6)).collect();
        let pick = |v: &[f32], sel: &[usize], w: usize| {
            let out: Vec<f32> = sel
                .iter()
                .flat_map(|&i| v[i * w..(i + 1) * w].iter().copied())
                .collect();
            Tensor::from_f32(dt, vec![sel.len(), w], &out).unwrap()
        };
        let run = |sel: &[usize]| {
            let idx: Vec<i32> = sel.iter().map(|&i| slots[i]).collect();
            let bt = pick(&base, sel, d_out);
            multi::run_multi(
                &b,
                &l,
                &pick(&xs, sel, d_in),
                &idx,
                MultiBase::Given { out: &bt, col0: 0 },
            )
            .unwrap()
            .to_f32()
        };
        let sizes: Vec<usize> = if quick() {
            vec![1, 2, 17, 64, 257]
        } else {
            (1..=257).collect()
        };
        for target in [0usize, 1, 2] {
            let alone = run(&[target]);
            for &t in &sizes {
                let mut others: Vec<usize> = (0..pool).filter(|&i| i != target).collect();
                others.shuffle(&mut g);
                let mut sel = others[..t - 1].to_vec();
                let pos = g.gen_range(0..t);
                sel.insert(pos, target);
                let y = run(&sel);
                assert!(
                    y[pos * d_out..(pos + 1) * d_out]
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dt}/{adt}: token {target} at {pos} of {t}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_a_fused_qkv_slice_is_finished_in_place_and_bad_indices_are_flagged() {
    let b = backend();
    let (t, d_in, d_out) = (33, 260, 130);
    let l = layer(5, DType::BF16, DType::F32, (d_in, d_out), 3);
    let mut g = rng(6);
    let x = random_tensor(&mut g, DType::BF16, &[t, d_in], 1.0);
    let ld = 3 * d_out + 7;
    let col0 = d_out + 1;
    let fused = random_tensor(&mut g, DType::BF16, &[t, ld], 1.0);
    let idx: Vec<i32> = (0..t).map(|_| g.gen_range(-1..3)).collect();
    let out = multi::run_multi(&b, &l, &x, &idx, MultiBase::Given { out: &fused, col0 }).unwrap();
    let (before, after) = (fused.to_f32(), out.to_f32());
    let mut base = Vec::new();
    for i in 0..t {
        for c in 0..ld {
            if (col0..col0 + d_out).contains(&c) {
                base.push(before[i * ld + c]);
            } else {
                assert_eq!(after[i * ld + c].to_bits(), before[i * ld + c].to_bits());
            }
        }
    }
    let scales = cpu::multi::magnitude_scales(&l).unwrap();
    let want = cpu::multi::forward_on_base(&l, &x, &idx, &base, &scales).unwrap();
    let got: Vec<f64> = (0..t)
        .flat_map(|i| after[i * ld + col0..i * ld + col0 + d_out].to_vec())
        .map(f64::from)
        .collect();
    assert_close("slice", &got, &want.to_f64(), DType::BF16.tolerance());
    let mut bad = idx.clone();
    bad[7] = 3;
    let e = multi::run_multi(&b, &l, &x, &bad, MultiBase::Compute).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("adapter_index[7] is 3") && !msg.contains('\n'),
        "{msg}"
    );
}
