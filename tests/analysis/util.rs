//! Shared helpers for the analysis tests: the fixtures of tests/fixtures/analysis (made by
//! gen_analysis.py with numpy and PEFT), dense float64 products, PEFT's check tensors.
#![allow(dead_code)]

use dorafuse::adapter::{Adapter, AdapterModule, BaseModel};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// tests/fixtures/analysis.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/analysis")
}

/// expected.json (numpy float64 truth).
pub fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// An adapter under the fixture root.
pub fn adapter(rel: &str) -> Adapter {
    Adapter::load(&root().join(rel)).unwrap()
}

/// A base model under the fixture root.
pub fn base(rel: &str) -> BaseModel {
    BaseModel::open(&root().join(rel)).unwrap()
}

/// The base of an adapter path (`tiny/...` → `tiny/base`).
pub fn base_of(rel: &str) -> &'static str {
    if rel.starts_with("conv") {
        "conv/base"
    } else {
        "tiny/base"
    }
}

/// `P·Q` for row-major `P [m, k]`, `Q [k, n]`, in f64.
pub fn matmul(p: &[f64], q: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for c in 0..k {
            let a = p[i * k + c];
            for j in 0..n {
                out[i * n + j] += a * q[c * n + j];
            }
        }
    }
    out
}

/// `s·B·A` of a module, dense `[d_out, d_in]`, f64.
pub fn update(m: &AdapterModule) -> Vec<f64> {
    let (d_in, d_out, r) = m.dims();
    let mut u = matmul(&m.lora_b.to_f64(), &m.lora_a.to_f64(), d_out, r, d_in);
    u.iter_mut().for_each(|x| *x *= m.scaling);
    u
}

/// ‖a − b‖ / ‖b‖.
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    dorafuse::tensor::rel_l2(a, b)
}

/// W0 `[d_out, d_in]` in f64 (transposed from the stored `[d_in, d_out]` with fan_in_fan_out).
pub fn w0(weight: &dorafuse::Tensor, fifo: bool) -> Vec<f64> {
    let w = weight.to_f64();
    let s = weight.shape();
    if !fifo {
        return w;
    }
    let (d_in, d_out) = (s[0], s[1]);
    let mut t = vec![0f64; d_in * d_out];
    for i in 0..d_in {
        for j in 0..d_out {
            t[j * d_in + i] = w[i * d_out + j];
        }
    }
    t
}

/// PEFT's float64 tensors from peft_check.safetensors, by name: (shape, values).
pub fn peft_check() -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(root().join("peft_check.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F64, "{k}");
            let vals = v
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (k, (v.shape().to_vec(), vals))
        })
        .collect()
}
