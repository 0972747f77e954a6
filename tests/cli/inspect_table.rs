//! `dorafuse inspect` without a base model: the table lists every module with its rank,
//! alpha and scaling from the config's patterns, and the summary line counts them.

use dorafuse::adapter::Adapter;
use std::path::Path;
use std::process::Command;

#[test]
fn table_lists_every_module() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm/all_rslora/adapter");
    let adapter = Adapter::load(&dir).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .arg("inspect")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Header, one row per module, summary.
    assert_eq!(lines.len(), adapter.modules.len() + 2, "{text}");
    for (name, m) in &adapter.modules {
        let row = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[1], m.rank.to_string(), "{row}");
        assert_eq!(cols[2].parse::<f64>().unwrap(), m.alpha, "{row}");
        assert!(
            (cols[3].parse::<f64>().unwrap() - m.scaling).abs() < 1e-4,
            "{row}"
        );
        // No base: no ΔM / ΔD.
        assert_eq!(&cols[cols.len() - 2..], ["-", "-"], "{row}");
    }
    // rank_pattern and alpha_pattern as PEFT applies them (rsLoRA: s = alpha / sqrt(r)).
    let q0 = &adapter.modules["encoder.layer.0.attention.self.query"];
    assert_eq!((q0.rank, q0.alpha), (12, 8.0));
    assert_eq!(q0.scaling, 8.0 / 12f64.sqrt());
    let v3 = &adapter.modules["encoder.layer.3.attention.self.value"];
    assert_eq!((v3.rank, v3.alpha), (4, 32.0));
    assert_eq!(v3.scaling, 16.0);
    let summary = lines.last().unwrap();
    assert!(
        summary.starts_with(&format!("{} DoRA modules", adapter.modules.len()))
            && summary.contains("rsLoRA")
            && summary.contains("rank 4/6/12"),
        "{summary}"
    );

    // --json carries the same modules.
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(["inspect", "--json"])
        .arg(&dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["modules"].as_array().unwrap().len(),
        adapter.modules.len()
    );
    assert!(v["modules"][0]["delta_m"].is_null());
}

#[test]
fn bad_adapter_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("adapter_config.json"), "{\"r\": 4}").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .arg("inspect")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("lora_alpha"), "{err}");
}

#[test]
fn a_non_finite_base_weight_is_named_by_every_tool_that_reads_the_base() {
    // The engine fixture's base with one element of attn.q_proj.weight set to NaN.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    std::fs::copy(root.join("base/config.json"), base.join("config.json")).unwrap();
    let model = dorafuse::adapter::BaseModel::open(&root.join("base")).unwrap();
    let tensors: Vec<(String, dorafuse::tensor::Tensor)> = (model.tensors.keys())
        .map(|n| {
            let t = model.tensor(n).unwrap();
            if n != "attn.q_proj.weight" {
                return (n.clone(), t);
            }
            let mut v = t.to_f32();
            v[10] = f32::NAN;
            let nan = dorafuse::tensor::Tensor::from_f32(t.dtype(), t.shape().to_vec(), &v);
            (n.clone(), nan.unwrap())
        })
        .collect();
    let views: Vec<(&str, safetensors::tensor::TensorView<'_>)> = (tensors.iter())
        .map(|(n, t)| {
            let dt = t.dtype().to_safetensors();
            (
                n.as_str(),
                safetensors::tensor::TensorView::new(dt, t.shape().to_vec(), t.as_bytes()).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &base.join("model.safetensors")).unwrap();
    let adapter = root.join("adapter_a");
    let out = dir.path().join("out");
    let runs: [&[&std::ffi::OsStr]; 4] = [
        &[
            "inspect".as_ref(),
            adapter.as_ref(),
            "--base".as_ref(),
            base.as_ref(),
        ],
        &[
            "analyze".as_ref(),
            "--base".as_ref(),
            base.as_ref(),
            adapter.as_ref(),
        ],
        &[
            "resize".as_ref(),
            adapter.as_ref(),
            "--rank".as_ref(),
            "2".as_ref(),
            "--base".as_ref(),
            base.as_ref(),
            "--out".as_ref(),
            out.as_ref(),
        ],
        &[
            "export-lora".as_ref(),
            adapter.as_ref(),
            "--base".as_ref(),
            base.as_ref(),
            "--rank".as_ref(),
            "2".as_ref(),
            "--out".as_ref(),
            out.as_ref(),
        ],
    ];
    for args in runs {
        let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success(),
            "{args:?} succeeded:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        // The base weight is named (not a factor computed from it).
        let named = err.contains("attn.q_proj") && err.contains("weight") && err.contains("NaN");
        assert!(named && !err.contains("lora_"), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}
