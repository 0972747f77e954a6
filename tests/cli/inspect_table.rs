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
