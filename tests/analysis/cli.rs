//! `resize`, `export-lora` and `analyze` refuse bad input in one line and write nothing.

use crate::util::root;

use std::process::Command;

/// Runs dorafuse with `args` (`OUT` replaced by a fresh path that must stay absent) and
/// returns the one-line error.
fn refuses(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let r = root();
    let args: Vec<String> = args
        .iter()
        .map(|a| match *a {
            "OUT" => out.display().to_string(),
            a if a.starts_with("fx:") => r.join(&a[3..]).display().to_string(),
            a => a.to_string(),
        })
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert!(!o.status.success(), "{args:?} succeeded");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{args:?} left {left:?}");
    err
}

fn has(err: &str, what: &[&str]) {
    for w in what {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
}

#[test]
fn resize_refuses_bad_input() {
    let a = "fx:tiny/dora/checkpoint-30";
    has(
        &refuses(&["resize", a, "--out", "OUT", "--rank", "0"]),
        &["rank", "at least 1"],
    );
    has(
        &refuses(&["resize", a, "--out", "OUT", "--rank", "38"]),
        &[
            "encoder.layer.0.query",
            "rank 38",
            "above the module's size",
        ],
    );
    for e in ["0", "1.5", "-0.1", "nan"] {
        has(
            &refuses(&["resize", a, "--out", "OUT", "--energy", e]),
            &["--energy", "(0, 1]"],
        );
    }
    has(
        &refuses(&["resize", a, "--out", "OUT"]),
        &["--rank", "--energy"],
    );
    has(
        &refuses(&[
            "resize", a, "--out", "OUT", "--rank", "2", "--energy", "0.5",
        ]),
        &["not both"],
    );
    has(
        &refuses(&["resize", a, "--out", "OUT", "--rank", "2", "--per-module"]),
        &["--per-module"],
    );
    has(
        &refuses(&[
            "resize",
            a,
            "--out",
            "OUT",
            "--rank",
            "2",
            "--base",
            "fx:no/such/base",
        ]),
        &["base model", "no such file"],
    );
    has(
        &refuses(&[
            "resize",
            "fx:no/such/adapter",
            "--out",
            "OUT",
            "--rank",
            "2",
        ]),
        &["not a directory"],
    );
}

#[test]
fn export_lora_refuses_bad_input() {
    let a = "fx:conv/dora";
    has(
        &refuses(&["export-lora", a, "--out", "OUT", "--rank", "2"]),
        &["--base"],
    );
    has(
        &refuses(&[
            "export-lora",
            a,
            "--base",
            "fx:no/such/base",
            "--out",
            "OUT",
            "--rank",
            "2",
        ]),
        &["base model", "no such file"],
    );
    // c_attn is 45 -> 67: rank 46 is above min(d_out, d_in).
    has(
        &refuses(&[
            "export-lora",
            a,
            "--base",
            "fx:conv/base",
            "--out",
            "OUT",
            "--rank",
            "46",
        ]),
        &["h.0.attn.c_attn", "rank 46", "above the module's size (45)"],
    );
    has(
        &refuses(&[
            "export-lora",
            a,
            "--base",
            "fx:conv/base",
            "--out",
            "OUT",
            "--rank",
            "0",
        ]),
        &["at least 1"],
    );
    has(
        &refuses(&[
            "export-lora",
            a,
            "--base",
            "fx:conv/base",
            "--out",
            "OUT",
            "--energy",
            "2",
        ]),
        &["(0, 1]"],
    );
    // A base the adapter does not fit.
    has(
        &refuses(&[
            "export-lora",
            a,
            "--base",
            "fx:tiny/base",
            "--out",
            "OUT",
            "--rank",
            "2",
        ]),
        &["h.0.attn.c_attn"],
    );
}

#[test]
fn analyze_refuses_bad_input() {
    has(
        &refuses(&["analyze", "fx:tiny/dora/checkpoint-10"]),
        &["--base"],
    );
    has(
        &refuses(&["analyze", "--base", "fx:tiny/base"]),
        &["checkpoint"],
    );
    has(
        &refuses(&[
            "analyze",
            "--base",
            "fx:no/such/base",
            "fx:tiny/dora/checkpoint-10",
        ]),
        &["base model", "no such file"],
    );
    has(
        &refuses(&[
            "analyze",
            "--base",
            "fx:tiny/base",
            "fx:tiny/dora/checkpoint-99",
        ]),
        &["checkpoint-99"],
    );
    has(
        &refuses(&["analyze", "--base", "fx:tiny/base", "fx:conv/dora"]),
        &["h.0.attn.c_attn"],
    );
    has(
        &refuses(&[
            "analyze",
            "--base",
            "fx:tiny/base",
            "fx:tiny/dora/checkpoint-10",
            "--plot",
            "fx:no/dir/fig.svg",
        ]),
        &["does not exist"],
    );
}

#[test]
fn an_existing_output_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), b"x").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(["resize"])
        .arg(root().join("tiny/dora/checkpoint-30"))
        .arg("--out")
        .arg(&out)
        .args(["--rank", "2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(std::fs::read(out.join("keep")).unwrap(), b"x");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

/// A square weight whose layout neither its shape nor a config.json tells is refused, as merge
/// refuses it, rather than read in the layout of the config's single `fan_in_fan_out` flag
/// (which PEFT overrides per module).
#[test]
fn export_lora_decides_the_layout_per_module() {
    let case = "fx:../peft_cases/mixed-fan-in-fan-out/head_first";
    has(
        &refuses(&[
            "export-lora",
            &format!("{case}/adapter"),
            "--base",
            &format!("{case}/base"),
            "--out",
            "OUT",
            "--rank",
            "2",
        ]),
        &["is square", "--fan-in-fan-out"],
    );
}

/// PiSSA/OLoRA factors belong to the residual base their loader re-derives from the rank:
/// new factors at another rank would be applied to another base, so both commands refuse.
#[test]
fn residual_base_adapters_are_refused() {
    for init in ["pissa", "olora"] {
        let adapter = format!("fx:../peft_cases/pissa-residual-base/{init}/adapter");
        has(
            &refuses(&["resize", &adapter, "--out", "OUT", "--rank", "2"]),
            &["init_lora_weights", "rewrote the base"],
        );
    }
}

/// `analyze`, `resize --base` and `export-lora` take merge's options for what the files cannot
/// settle: a model mixing GPT-2 `Conv1D` and `nn.Linear` square weights is refused without
/// `--fan-in-fan-out` and analysed with it.
#[test]
fn layout_and_name_options_reach_the_analysis_commands() {
    let c = root().join("../peft_cases/mixed-fan-in-fan-out/head_first");
    let (base, adapter) = (c.join("base"), c.join("adapter"));
    let (base, adapter) = (base.to_str().unwrap(), adapter.to_str().unwrap());
    for cmd in [
        vec!["analyze", "--base", base, adapter],
        vec![
            "resize", adapter, "--base", base, "--rank", "2", "--out", "OUT",
        ],
        vec![
            "export-lora",
            adapter,
            "--base",
            base,
            "--rank",
            "2",
            "--out",
            "OUT",
        ],
    ] {
        has(&refuses(&cmd), &["square", "--fan-in-fan-out"]);
        let mut bad = cmd.clone();
        bad.extend(["--fan-in-fan-out", "("]);
        has(
            &refuses(&bad),
            &["--fan-in-fan-out \"(\"", "unclosed group"],
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut args: Vec<String> = cmd
            .iter()
            .map(|a| match *a {
                "OUT" => out.display().to_string(),
                a => a.to_string(),
            })
            .collect();
        args.extend(["--fan-in-fan-out".into(), r"backbone\..*".into()]);
        let o = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if cmd[0] != "analyze" {
            assert!(out.join("adapter_model.safetensors").exists(), "{args:?}");
        }
    }
}
