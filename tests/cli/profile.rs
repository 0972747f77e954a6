//! `dorafuse profile --device emu --json`: a table per kernel and the documented JSON fields
//! (docs/profile.md) for every selected kernel.

use std::process::Command;

#[test]
fn profile_writes_the_documented_fields_for_each_selected_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("p.json");
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args([
            "profile",
            "--device",
            "emu",
            "--kernel",
            "dora_shrink_f32",
            "--shape",
            "40x24",
            "--weight-shape",
            "40x24",
            "--tokens",
            "3",
            "--rank",
            "5",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("dora_shrink_f32"), "{out}");
    assert!(out.contains("sectors/req"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let ks = v["kernels"].as_array().unwrap();
    assert_eq!(ks.len(), 1);
    for field in [
        "sectors_per_request",
        "load_efficiency",
        "store_efficiency",
        "unique_bytes_over_formula",
        "shared_wavefronts_per_request",
        "blocks",
        "waves_h200",
    ] {
        assert!(ks[0].get(field).is_some(), "missing {field}");
    }
    assert!(ks[0]["blocks"].as_u64().unwrap() >= 1);
    assert!(ks[0]["waves_h200"].as_f64().unwrap() > 0.0);
}

#[test]
fn profile_refuses_a_device_other_than_the_emulator_in_one_line() {
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(["profile", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--device emu only"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
