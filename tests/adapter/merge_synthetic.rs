//! `dorafuse merge` on small synthetic models built here: sharded and single-file bases in
//! every dtype, integer tensors, fan_in_fan_out, prefix differences, unmerge, and the errors
//! (each one line, naming the module, exit non-zero, leaving no output behind).

use dorafuse::adapter::{
    merge_model, read_unmerge, unmerge_module, AdaptedModel, Adapter, BaseModel, MergeDevice,
    MergeOptions,
};
use dorafuse::dtype::DType;
use dorafuse::tensor::{rel_l2, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

type Entry = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    std::fs::write(path, safetensors::serialize(views, &Some(meta)).unwrap()).unwrap();
}

fn float(name: &str, dtype: DType, shape: &[usize], vals: &[f32]) -> Entry {
    let t = Tensor::from_f32(dtype, shape.to_vec(), vals).unwrap();
    (
        name.to_string(),
        dtype.to_safetensors(),
        shape.to_vec(),
        t.as_bytes().to_vec(),
    )
}

fn randn(rng: &mut rand::rngs::StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
        .collect()
}

/// One synthetic module: name, d_out, d_in.
const MODULES: &[(&str, usize, usize)] = &[
    ("encoder.layer.0.attn.query", 7, 13),
    ("encoder.layer.0.ffn.dense", 33, 13),
    ("encoder.layer.1.attn.query", 7, 13),
    ("encoder.layer.1.ffn.dense", 33, 13),
];

struct Spec {
    dtype: DType,
    fifo: bool,
    sharded: bool,
    base_prefix: &'static str,
    adapter_prefix: &'static str,
    dora: bool,
    device: MergeDevice,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            dtype: DType::F32,
            fifo: false,
            sharded: false,
            base_prefix: "",
            adapter_prefix: "",
            dora: true,
            device: MergeDevice::Cpu,
        }
    }
}

/// Writes base/ and adapter/ under `root`; returns (base dir, adapter dir).
fn build(root: &Path, spec: &Spec) -> (PathBuf, PathBuf) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let base = root.join("base");
    let ad = root.join("adapter");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(base.join("sub")).unwrap();
    std::fs::create_dir_all(&ad).unwrap();
    let mut tensors: Vec<Entry> = Vec::new();
    let bp = spec.base_prefix;
    tensors.push((
        format!("{bp}embeddings.position_ids"),
        safetensors::Dtype::I64,
        vec![1, 5],
        (0i64..5).flat_map(|i| i.to_le_bytes()).collect(),
    ));
    tensors.push(float(
        &format!("{bp}embeddings.word.weight"),
        spec.dtype,
        &[11, 13],
        &randn(&mut rng, 143, 1.0),
    ));
    let mut adapter: Vec<Entry> = Vec::new();
    for (i, &(m, d_out, d_in)) in MODULES.iter().enumerate() {
        let shape = if spec.fifo {
            vec![d_in, d_out]
        } else {
            vec![d_out, d_in]
        };
        tensors.push(float(
            &format!("{bp}{m}.weight"),
            spec.dtype,
            &shape,
            &randn(&mut rng, d_out * d_in, 0.3),
        ));
        tensors.push(float(
            &format!("{bp}{m}.bias"),
            spec.dtype,
            &[d_out],
            &randn(&mut rng, d_out, 0.1),
        ));
        tensors.push(float(
            &format!("{bp}{m}.LayerNorm.weight"),
            spec.dtype,
            &[d_out],
            &randn(&mut rng, d_out, 1.0),
        ));
        // rank_pattern gives layer 1's query rank 2; everything else rank 3.
        let r = if i == 2 { 2 } else { 3 };
        let key = format!("base_model.model.{}{m}", spec.adapter_prefix);
        adapter.push(float(
            &format!("{key}.lora_A.weight"),
            DType::F32,
            &[r, d_in],
            &randn(&mut rng, r * d_in, 0.3),
        ));
        adapter.push(float(
            &format!("{key}.lora_B.weight"),
            DType::F32,
            &[d_out, r],
            &randn(&mut rng, d_out * r, 0.3),
        ));
        let mag: Vec<f32> = (0..d_out).map(|j| 0.5 + 0.1 * j as f32).collect();
        if !spec.dora {
            continue;
        }
        adapter.push(float(
            &format!("{key}.lora_magnitude_vector"),
            DType::F32,
            &[d_out],
            &mag,
        ));
    }
    if spec.sharded {
        let (a, b) = tensors.split_at(tensors.len() / 2);
        write_st(&base.join("model-00001-of-00002.safetensors"), a);
        write_st(&base.join("model-00002-of-00002.safetensors"), b);
        let mut map = serde_json::Map::new();
        for (k, ..) in a {
            map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
        }
        for (k, ..) in b {
            map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
        }
        let idx = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(
            base.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&idx).unwrap(),
        )
        .unwrap();
    } else {
        write_st(&base.join("model.safetensors"), &tensors);
    }
    std::fs::write(base.join("config.json"), "{\"model_type\": \"toy\"}\n").unwrap();
    std::fs::write(base.join("sub/extra.txt"), "kept").unwrap();
    write_st(&ad.join("adapter_model.safetensors"), &adapter);
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "r": 3,
        "lora_alpha": 6,
        "use_dora": spec.dora,
        "use_rslora": false,
        "fan_in_fan_out": spec.fifo,
        "target_modules": ["query", "dense"],
        "rank_pattern": {"layer.1.attn.query": 2},
        "alpha_pattern": {"ffn.dense": 1.5},
        "bias": "none",
        "lora_bias": false,
        "modules_to_save": null,
    });
    std::fs::write(
        ad.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    (base, ad)
}

/// W' in float64, `[d_out, d_in]`.
fn truth(model: &AdaptedModel<'_>, module: &str) -> Vec<f64> {
    let l = model.layer(module).unwrap();
    let (d_in, d_out, r) = l.dims().unwrap();
    let (w, a, b) = (l.weight.to_f64(), l.lora_a.to_f64(), l.lora_b.to_f64());
    let m = l.magnitude.as_ref().map(|t| t.to_f64());
    let mut out = vec![0f64; d_out * d_in];
    for j in 0..d_out {
        for i in 0..d_in {
            let w0 = if l.fan_in_fan_out {
                w[i * d_out + j]
            } else {
                w[j * d_in + i]
            };
            out[j * d_in + i] = w0
                + (0..r)
                    .map(|k| l.scaling * b[j * r + k] * a[k * d_in + i])
                    .sum::<f64>();
        }
        let row = &mut out[j * d_in..(j + 1) * d_in];
        let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if let Some(m) = &m {
            row.iter_mut().for_each(|x| *x *= m[j] / n);
        }
    }
    out
}

fn rows(t: &Tensor, fifo: bool) -> Vec<f64> {
    let v = t.to_f64();
    if !fifo {
        return v;
    }
    let (d_in, d_out) = (t.shape()[0], t.shape()[1]);
    let mut o = vec![0f64; v.len()];
    for i in 0..d_in {
        for j in 0..d_out {
            o[j * d_in + i] = v[i * d_out + j];
        }
    }
    o
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn check_merge(spec: &Spec) {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, ad) = build(tmp.path(), spec);
    let base = BaseModel::open(&base_dir).unwrap();
    let adapter = Adapter::load(&ad).unwrap();
    let model = AdaptedModel::new(&base, &adapter).unwrap();
    let out = tmp.path().join("out");
    let opts = MergeOptions {
        device: spec.device,
        progress: false,
        ..Default::default()
    };
    let rep = merge_model(&base, &adapter, &out, &opts).unwrap();
    let what = format!(
        "{:?} {} dora={} fifo={} sharded={} prefixes {:?}/{:?}",
        spec.device,
        spec.dtype,
        spec.dora,
        spec.fifo,
        spec.sharded,
        spec.base_prefix,
        spec.adapter_prefix
    );
    assert_eq!(rep.modules, MODULES.len(), "{what}");
    // Nothing but the output beside it: the temporary directory is gone.
    assert_eq!(
        entries(tmp.path()),
        vec!["adapter", "base", "out"],
        "{what}"
    );
    let merged = BaseModel::open(&out).unwrap();
    assert_eq!(merged.shards.len(), base.shards.len());
    for (s, t) in base.shards.iter().zip(&merged.shards) {
        assert_eq!(s.path.file_name(), t.path.file_name());
        assert_eq!(
            s.map[..s.header_len],
            t.map[..t.header_len],
            "{what}: header copied"
        );
    }
    let weights: BTreeMap<String, String> = adapter
        .modules
        .keys()
        .map(|m| (model.weight_name(m), m.clone()))
        .collect();
    for key in base.tensors.keys() {
        match weights.get(key) {
            Some(module) => {
                let got = merged.tensor(key).unwrap();
                assert_eq!(got.dtype(), spec.dtype, "{what}: {key} keeps its dtype");
                let e = rel_l2(&rows(&got, spec.fifo), &truth(&model, module));
                // Computed in f32, rounded once to the base dtype.
                let tol = match spec.dtype {
                    DType::F32 => 1e-6,
                    d => 2.0 * d.unit_roundoff(),
                };
                assert!(
                    e < tol,
                    "{what}: {module}: rel error {e:.3e} (tolerance {tol:e})"
                );
            }
            None => assert!(
                merged.bytes(key).unwrap() == base.bytes(key).unwrap(),
                "{what}: {key} not copied bit for bit"
            ),
        }
    }
    for f in [
        "config.json",
        "sub/extra.txt",
        "model.safetensors.index.json",
    ] {
        if base_dir.join(f).exists() {
            assert_eq!(
                std::fs::read(base_dir.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{what}: {f}"
            );
        }
    }
    // unmerge(merge(W0)) ≈ W0: exact up to the rounding of W' to the base dtype.
    for (module, entry) in read_unmerge(&out).unwrap() {
        let w0 = unmerge_module(&merged, &entry).unwrap();
        let orig = base.tensor(&entry.weight_name).unwrap();
        let e = rel_l2(&w0.to_f64(), &orig.to_f64());
        let tol = match spec.dtype {
            DType::F32 => 1e-6,
            d => 8.0 * d.unit_roundoff(),
        };
        assert!(e < tol, "{what}: {module}: unmerge rel error {e:.3e}");
    }
}

#[test]
fn merges_single_and_sharded_in_every_dtype() {
    for dtype in DType::ALL {
        for sharded in [false, true] {
            check_merge(&Spec {
                dtype,
                sharded,
                ..Default::default()
            });
        }
    }
}

/// The GPU merge (the fused kernels) against the same float64 truth.
#[test]
#[ignore = "needs a CUDA GPU"]
fn merges_on_cuda() {
    assert!(
        MergeDevice::cuda_usable(),
        "no usable CUDA device (or kernels not compiled into this build)"
    );
    for dtype in DType::ALL {
        for (fifo, dora) in [(false, true), (true, true), (false, false)] {
            check_merge(&Spec {
                dtype,
                fifo,
                dora,
                device: MergeDevice::Cuda,
                ..Default::default()
            });
        }
    }
}

#[test]
fn merges_plain_lora() {
    for dtype in [DType::F32, DType::F16] {
        check_merge(&Spec {
            dtype,
            dora: false,
            sharded: true,
            ..Default::default()
        });
    }
}

#[test]
fn merges_fan_in_fan_out() {
    for dtype in [DType::F32, DType::BF16] {
        check_merge(&Spec {
            dtype,
            fifo: true,
            ..Default::default()
        });
    }
}

#[test]
fn maps_module_prefixes_both_ways() {
    // Adapter trained on a wrapper (bert.encoder...), base saved bare (encoder...).
    check_merge(&Spec {
        adapter_prefix: "bert.",
        ..Default::default()
    });
    // Adapter on the bare model, base saved from a wrapper.
    check_merge(&Spec {
        base_prefix: "bert.",
        sharded: true,
        ..Default::default()
    });
}

#[test]
fn layers_and_inference_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, ad) = build(tmp.path(), &Spec::default());
    let base = BaseModel::open(&base_dir).unwrap();
    let adapter = Adapter::load(&ad).unwrap();
    let model = AdaptedModel::new(&base, &adapter).unwrap();
    let layers: Vec<_> = model.layers().collect::<anyhow::Result<_>>().unwrap();
    assert_eq!(layers.len(), MODULES.len());
    for (name, layer) in &layers {
        let (d_in, d_out, r) = layer.dims().unwrap();
        let &(_, want_out, want_in) = MODULES.iter().find(|m| m.0 == name).unwrap();
        assert_eq!((d_in, d_out), (want_in, want_out));
        assert_eq!(
            r,
            if name == "encoder.layer.1.attn.query" {
                2
            } else {
                3
            }
        );
        let alpha = if name.ends_with("ffn.dense") {
            1.5
        } else {
            6.0
        };
        assert_eq!(layer.scaling, alpha / r as f64, "{name}");
        assert!(layer.bias.is_some());
        let inf = model.inference_layer(name).unwrap();
        let g = inf.scale.unwrap();
        // g = m / ‖V_j‖, checked in f64 from the merged truth: ‖W'_j‖ = |m_j|.
        let t = truth(&model, name);
        let m = layer.magnitude.as_ref().unwrap().to_f64();
        for j in 0..d_out {
            let n = t[j * d_in..(j + 1) * d_in]
                .iter()
                .map(|x| x * x)
                .sum::<f64>()
                .sqrt();
            assert!((n - m[j]).abs() < 1e-5 * m[j], "{name} row {j}");
            assert!(g[j].is_finite() && g[j] > 0.0);
        }
    }
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dorafuse"))
}

/// Runs `merge` expecting failure: one line on stderr containing every `needle`, non-zero
/// exit, and nothing new in the output's parent directory.
fn merge_fails(base: &Path, ad: &Path, needles: &[&str]) -> String {
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("merged");
    let o = bin()
        .args(["merge", "--quiet", "--base"])
        .arg(base)
        .arg("--adapter")
        .arg(ad)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "merge succeeded; stderr: {err}");
    eprintln!("expected failure: {}", err.trim_end());
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    assert!(
        entries(parent.path()).is_empty(),
        "left behind: {:?}",
        entries(parent.path())
    );
    err
}

fn edit_adapter(ad: &Path, f: impl Fn(&mut Vec<Entry>)) {
    let p = ad.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    f(&mut v);
    write_st(&p, &v);
}

fn edit_config(ad: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = ad.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn corrupt_and_mismatched_inputs_fail_cleanly() {
    const M: &str = "encoder.layer.1.ffn.dense";
    let fresh = || {
        let tmp = tempfile::tempdir().unwrap();
        let (b, a) = build(tmp.path(), &Spec::default());
        (tmp, b, a)
    };

    // Truncated adapter file.
    let (_t, b, a) = fresh();
    let p = a.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    merge_fails(&b, &a, &["adapter_model.safetensors", "truncated"]);

    // Truncated base shard.
    let (_t, b, a) = fresh();
    let p = b.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    merge_fails(&b, &a, &["model.safetensors", "truncated"]);

    // Missing lora_B.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        v.retain(|e| !e.0.ends_with(&format!("{M}.lora_B.weight")))
    });
    merge_fails(&b, &a, &[M, "lora_B.weight is missing"]);

    // Missing magnitude with use_dora.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        v.retain(|e| !e.0.ends_with(&format!("{M}.lora_magnitude_vector")))
    });
    merge_fails(&b, &a, &[M, "lora_magnitude_vector is missing"]);

    // Rank disagreeing with the config (rank_pattern says 2 for layer.1's query).
    let (_t, b, a) = fresh();
    edit_config(&a, |v| {
        v["rank_pattern"] = serde_json::json!({"layer.1.attn.query": 4})
    });
    merge_fails(
        &b,
        &a,
        &[
            "encoder.layer.1.attn.query",
            "rank is 2",
            "rank 4",
            "rank_pattern",
        ],
    );
    let (_t, b, a) = fresh();
    edit_config(&a, |v| v["r"] = serde_json::json!(5));
    merge_fails(
        &b,
        &a,
        &["encoder.layer.0.attn.query", "rank is 3", "rank 5 (r)"],
    );

    // lora_A and lora_B disagreeing with each other.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        let e = v
            .iter_mut()
            .find(|e| e.0.ends_with(&format!("{M}.lora_B.weight")))
            .unwrap();
        e.2 = vec![11, 9];
    });
    merge_fails(&b, &a, &[M, "lora_B is [11, 9]"]);

    // Target module absent from the base.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        for e in v.iter_mut() {
            e.0 = e.0.replace("layer.1.ffn", "layer.9.ffn");
        }
    });
    merge_fails(
        &b,
        &a,
        &["encoder.layer.9.ffn.dense", "absent from the base"],
    );

    // Base weight of the wrong shape for the adapter: lora_A one input wider than the base.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        let e = v
            .iter_mut()
            .find(|e| e.0.ends_with(&format!("{M}.lora_A.weight")))
            .unwrap();
        e.2 = vec![3, 14];
        e.3 = vec![0u8; 3 * 14 * 4];
    });
    merge_fails(&b, &a, &[M, "should be [33, 14]"]);

    // A module the config targets but the file lacks.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| v.retain(|e| !e.0.contains(M)));
    merge_fails(&b, &a, &[M, "no tensors"]);

    // Unsupported configurations, each named.
    for (field, value, needle) in [
        ("lora_bias", serde_json::json!(true), "lora_bias"),
        ("bias", serde_json::json!("everything"), "bias"),
        ("peft_type", serde_json::json!("LOHA"), "LOHA"),
        ("use_qalora", serde_json::json!(true), "use_qalora"),
        (
            "target_modules",
            serde_json::json!("(?<=x)query"),
            "target_modules",
        ),
    ] {
        let (_t, b, a) = fresh();
        edit_config(&a, |v| v[field] = value.clone());
        merge_fails(&b, &a, &[needle]);
    }

    // Convolution and embedding adapters.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        let e = v
            .iter_mut()
            .find(|e| e.0.ends_with(&format!("{M}.lora_A.weight")))
            .unwrap();
        e.2 = vec![3, 13, 1, 1];
    });
    merge_fails(&b, &a, &[M, "convolution"]);

    // A full tensor of a module modules_to_save does not list, and a modules_to_save tensor
    // the base does not have.
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        v.push(float(
            "base_model.model.classifier.weight",
            DType::F32,
            &[2, 13],
            &[0.5; 26],
        ))
    });
    merge_fails(&b, &a, &["classifier", "modules_to_save"]);
    edit_config(&a, |v| {
        v["modules_to_save"] = serde_json::json!(["classifier"]);
    });
    merge_fails(&b, &a, &["classifier.weight", "absent from the base"]);
    let (_t, b, a) = fresh();
    edit_adapter(&a, |v| {
        v.push(float(
            "base_model.model.embeddings.word.lora_embedding_A",
            DType::F32,
            &[3, 11],
            &[0.5; 33],
        ))
    });
    merge_fails(&b, &a, &["embeddings.word", "embedding"]);

    // Quantized base weight.
    let (_t, b, a) = fresh();
    let p = b.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            if k == format!("{M}.weight") {
                (k, safetensors::Dtype::U8, vec![33, 13], vec![1u8; 33 * 13])
            } else {
                (k, t.dtype(), t.shape().to_vec(), t.data().to_vec())
            }
        })
        .collect();
    drop(st);
    write_st(&p, &v);
    merge_fails(&b, &a, &[M, "quantized"]);

    // A failure in the middle of writing (a non-finite base weight is only met when its
    // tensor is merged) still leaves nothing.
    let (_t, b, a) = fresh();
    let p = b.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| {
            let mut data = t.data().to_vec();
            if k == format!("{M}.weight") {
                data[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            }
            (k, t.dtype(), t.shape().to_vec(), data)
        })
        .collect();
    drop(st);
    write_st(&p, &v);
    merge_fails(&b, &a, &[M, "weight: element 1", "inf"]);
}

#[test]
fn existing_output_is_refused_and_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let (b, a) = build(tmp.path(), &Spec::default());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let o = bin()
        .args(["merge", "--quiet", "--base"])
        .arg(&b)
        .arg("--adapter")
        .arg(&a)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
    assert_eq!(entries(&out), vec!["keep.txt"]);
    assert_eq!(entries(tmp.path()), vec!["adapter", "base", "out"]);
}

/// A row merged with g = 0 (here a zero magnitude) is written as zeros: nothing recovers its
/// base row, so unmerging that module is refused in one line naming the weight and the row,
/// and no restored model is left behind.
#[test]
fn unmerge_refuses_rows_merged_with_zero_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_dir, ad) = build(tmp.path(), &Spec::default());
    let module = MODULES[0].0;
    edit_adapter(&ad, |v| {
        let e = v
            .iter_mut()
            .find(|e| e.0.ends_with(&format!("{module}.lora_magnitude_vector")))
            .unwrap();
        assert_eq!(e.1, safetensors::Dtype::F32);
        e.3[8..12].copy_from_slice(&0f32.to_le_bytes()); // m_2 = 0
    });
    let base = BaseModel::open(&base_dir).unwrap();
    let adapter = Adapter::load(&ad).unwrap();
    let merged_dir = tmp.path().join("merged");
    merge_model(&base, &adapter, &merged_dir, &MergeOptions::default()).unwrap();
    let merged = BaseModel::open(&merged_dir).unwrap();
    let data = read_unmerge(&merged_dir).unwrap();
    let err = format!("{:#}", unmerge_module(&merged, &data[module]).unwrap_err());
    assert!(err.contains("row 2") && err.contains("g = 0"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let restored = tmp.path().join("restored");
    let o = bin()
        .args(["merge", "--unmerge", "--base"])
        .arg(&merged_dir)
        .arg("--out")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("g = 0"), "{stderr}");
    assert!(!restored.exists());
}
