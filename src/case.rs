//! The layer-case format (docs/design.md §2): one safetensors file holding one layer's inputs and,
//! optionally, what is expected of it. It is how a layer is carried out of PyTorch and
//! replayed here, and how golden tests are stored.
//!
//! Tensor names: `x`, `weight`, `bias`?, `lora_A`, `lora_B`, `magnitude`? (absent = plain
//! LoRA), `grad_y`? (present = run the backward too), and `expected.<output>` for the outputs
//! `y`, `grad_x`, `grad_lora_A`, `grad_lora_B`, `grad_magnitude`. Metadata: `scaling`
//! (required, a decimal), `fan_in_fan_out` (`"true"`/`"false"`, default false); every other
//! key is kept (e.g. `peft_rel_err.<output>`, PyTorch's own error, which `replay` uses as the
//! bar for low-precision cases).
//!
//! Reading is strict: **unknown tensor names are an error**, not a warning, because the
//! likely cause is a typo (`magnitudes`, `lora_a`) that would otherwise silently change the
//! layer (DoRA replayed as plain LoRA). Every error is one line naming the tensor.

use crate::dtype::DType;
use crate::fsutil::write_atomic;
use crate::layer::{Layer, Outputs, Shape};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Input tensor names, in file order.
pub const INPUT_NAMES: [&str; 7] = [
    "x",
    "weight",
    "bias",
    "lora_A",
    "lora_B",
    "magnitude",
    "grad_y",
];

/// Output names (the `expected.` prefix removed), in the order `replay` reports them.
pub const OUTPUT_NAMES: [&str; 5] = [
    "y",
    "grad_x",
    "grad_lora_A",
    "grad_lora_B",
    "grad_magnitude",
];

/// Prefix of expected outputs.
pub const EXPECTED_PREFIX: &str = "expected.";

/// One layer case: the layer, its input, optionally `grad_y`, expected outputs and metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCase {
    /// The layer (weights, adapter, scaling, layout).
    pub layer: Layer,
    /// x `[T, d_in]`; its dtype is the computation dtype.
    pub x: Tensor,
    /// dL/dy `[T, d_out]`; present means the backward is run.
    pub grad_y: Option<Tensor>,
    /// Expected outputs, keyed by output name without the `expected.` prefix.
    pub expected: BTreeMap<String, Tensor>,
    /// All `__metadata__` entries, including `scaling` and `fan_in_fan_out`.
    pub metadata: BTreeMap<String, String>,
}

/// The named outputs of a layer call (y, then the gradients that were computed).
pub fn named_outputs(out: &Outputs) -> Vec<(&'static str, &Tensor)> {
    let mut v = vec![("y", &out.y)];
    if let Some(g) = &out.grads {
        v.push(("grad_x", &g.grad_x));
        v.push(("grad_lora_A", &g.grad_lora_a));
        v.push(("grad_lora_B", &g.grad_lora_b));
        if let Some(m) = &g.grad_magnitude {
            v.push(("grad_magnitude", m));
        }
    }
    v
}

/// Serialises named tensors and metadata as safetensors bytes.
fn serialize(
    tensors: &[(String, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            let v = TensorView::new(t.dtype().to_safetensors(), t.shape().to_vec(), t.as_bytes())
                .with_context(|| format!("tensor {name}: cannot describe it as safetensors"))?;
            Ok((name.clone(), v))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::serialize(views, &Some(meta)).context("serialising safetensors")
}

/// Writes `bytes` to `path` atomically.
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |f| Ok(f.write_all(bytes)?))
}

/// Writes a layer call's outputs to `path` under the names of docs/design.md §2 (`y` and
/// `grad_x` in x's dtype, each parameter gradient in its parameter's dtype, as
/// [`crate::cpu::run`] and the kernels produce them), with `metadata`, atomically (a temporary
/// file in the destination directory, then a rename: a failed write leaves nothing).
///
/// # Errors
/// The destination is not writable (the message names it), or serialisation fails.
pub fn write_outputs(
    path: &Path,
    outputs: &Outputs,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let named: Vec<(String, &Tensor)> = named_outputs(outputs)
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    write_bytes(path, &serialize(&named, metadata)?)
}

/// Parses a boolean metadata value `"true"`/`"false"` (also `"True"`/`"False"`, `"1"`/`"0"`).
pub(crate) fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "True" | "1" => Ok(true),
        "false" | "False" | "0" => Ok(false),
        _ => bail!("metadata {key} is {v:?}, expected \"true\" or \"false\""),
    }
}

impl LayerCase {
    /// Reads and validates a layer-case file.
    ///
    /// # Errors
    /// One line naming the file and the problem: unreadable or truncated/corrupt file, an
    /// unknown tensor name, a missing required tensor, an unsupported dtype, a wrong shape
    /// (including an A/B rank mismatch), missing or invalid `scaling`/`fan_in_fan_out`
    /// metadata, or a NaN/Inf in any input (with its index).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read layer case {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("layer case {}", path.display()))
    }

    /// Parses and validates a layer case from safetensors bytes (see [`Self::read`]).
    ///
    /// # Errors
    /// As [`Self::read`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            anyhow::anyhow!("not a valid safetensors file (truncated or corrupt): {e:?}")
        })?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
            anyhow::anyhow!("not a valid safetensors file (truncated or corrupt): {e:?}")
        })?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();

        let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut expected = BTreeMap::new();
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        for name in names {
            let view = st
                .tensor(&name)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            if let Some(out) = name.strip_prefix(EXPECTED_PREFIX) {
                ensure!(
                    OUTPUT_NAMES.contains(&out),
                    "unknown tensor {name:?} (expected outputs are {})",
                    OUTPUT_NAMES
                        .map(|n| format!("{EXPECTED_PREFIX}{n}"))
                        .join(", ")
                );
                expected.insert(out.to_string(), Tensor::from_view(&name, &view)?);
            } else {
                ensure!(
                    INPUT_NAMES.contains(&name.as_str()),
                    "unknown tensor {name:?} (inputs are {}; expected outputs are named expected.<output>)",
                    INPUT_NAMES.join(", ")
                );
                inputs.insert(name.clone(), Tensor::from_view(&name, &view)?);
            }
        }
        let mut take = |n: &str| inputs.remove(n);
        let missing = |n: &str| format!("missing tensor {n} (required)");
        let x = take("x").with_context(|| missing("x"))?;
        let weight = take("weight").with_context(|| missing("weight"))?;
        let lora_a = take("lora_A").with_context(|| missing("lora_A"))?;
        let lora_b = take("lora_B").with_context(|| missing("lora_B"))?;
        let bias = take("bias");
        let magnitude = take("magnitude");
        let grad_y = take("grad_y");

        let scaling_s = metadata.get("scaling").context(
            "metadata scaling is missing (the effective s = lora_alpha / r, as a decimal string)",
        )?;
        let scaling: f64 = scaling_s
            .trim()
            .parse()
            .ok()
            .filter(|s: &f64| s.is_finite())
            .with_context(|| {
                format!("metadata scaling is {scaling_s:?}, expected a finite decimal")
            })?;
        let fan_in_fan_out = match metadata.get("fan_in_fan_out") {
            Some(v) => parse_bool("fan_in_fan_out", v)?,
            None => false,
        };
        let layer = Layer {
            weight,
            bias,
            lora_a,
            lora_b,
            magnitude,
            scaling,
            fan_in_fan_out,
        };
        let case = Self {
            layer,
            x,
            grad_y,
            expected,
            metadata,
        };
        case.validate()?;
        Ok(case)
    }

    /// The call's shape.
    ///
    /// # Errors
    /// An inconsistent layer or `x`, naming the tensor.
    pub fn shape(&self) -> Result<Shape> {
        self.layer.shape_for(&self.x)
    }

    /// The shape output `name` must have, or `None` for an unknown name.
    pub fn output_shape(&self, name: &str) -> Option<Vec<usize>> {
        let s = self.shape().ok()?;
        Some(match name {
            "y" => vec![s.t, s.d_out],
            "grad_x" => vec![s.t, s.d_in],
            "grad_lora_A" => vec![s.r, s.d_in],
            "grad_lora_B" => vec![s.d_out, s.r],
            "grad_magnitude" => vec![s.d_out],
            _ => return None,
        })
    }

    /// The dtype output `name` is produced in: x's for `y`/`grad_x`, the parameter's for its
    /// gradient.
    pub fn output_dtype(&self, name: &str) -> DType {
        match name {
            "grad_lora_A" => self.layer.lora_a.dtype(),
            "grad_lora_B" => self.layer.lora_b.dtype(),
            "grad_magnitude" => self
                .layer
                .magnitude
                .as_ref()
                .map_or(self.x.dtype(), Tensor::dtype),
            _ => self.x.dtype(),
        }
    }

    /// PyTorch's own relative error on output `name` (metadata `peft_rel_err.<name>`), when
    /// the case records it.
    pub fn peft_rel_err(&self, name: &str) -> Option<f64> {
        self.metadata
            .get(&format!("peft_rel_err.{name}"))
            .and_then(|v| v.trim().parse().ok())
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
    }

    /// Checks every shape against the layer's, and that every input is finite.
    ///
    /// # Errors
    /// The first problem, naming the tensor (and index for a NaN/Inf).
    pub fn validate(&self) -> Result<()> {
        let s = self.shape()?;
        if let Some(gy) = &self.grad_y {
            ensure!(
                gy.shape() == [s.t, s.d_out],
                "grad_y is {:?}, expected [{}, {}] ([T, d_out])",
                gy.shape(),
                s.t,
                s.d_out
            );
        }
        for (name, t) in &self.expected {
            if name != "y" {
                ensure!(
                    self.grad_y.is_some(),
                    "expected.{name} is present but grad_y is not (gradients need grad_y)"
                );
            }
            if name == "grad_magnitude" {
                ensure!(
                    self.layer.magnitude.is_some(),
                    "expected.grad_magnitude is present but magnitude is not (plain LoRA has none)"
                );
            }
            let want = self
                .output_shape(name)
                .expect("names were checked on reading");
            ensure!(
                t.shape() == want.as_slice(),
                "expected.{name} is {:?}, expected {want:?}",
                t.shape()
            );
        }
        self.x.check_finite("x")?;
        self.layer.check_finite()?;
        if let Some(gy) = &self.grad_y {
            gy.check_finite("grad_y")?;
        }
        Ok(())
    }

    /// Writes the case (inputs, expected outputs and metadata, with `scaling` and
    /// `fan_in_fan_out` set from the layer) to `path`, atomically.
    ///
    /// # Errors
    /// The destination is not writable (named), or serialisation fails.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let l = &self.layer;
        let mut tensors: Vec<(String, &Tensor)> = vec![
            ("x".into(), &self.x),
            ("weight".into(), &l.weight),
            ("lora_A".into(), &l.lora_a),
            ("lora_B".into(), &l.lora_b),
        ];
        if let Some(b) = &l.bias {
            tensors.push(("bias".into(), b));
        }
        if let Some(m) = &l.magnitude {
            tensors.push(("magnitude".into(), m));
        }
        if let Some(g) = &self.grad_y {
            tensors.push(("grad_y".into(), g));
        }
        for (n, t) in &self.expected {
            tensors.push((format!("{EXPECTED_PREFIX}{n}"), t));
        }
        let mut meta = self.metadata.clone();
        // `{:?}` of an f64 is the shortest decimal that parses back to the same value.
        meta.insert("scaling".into(), format!("{:?}", l.scaling));
        meta.insert("fan_in_fan_out".into(), l.fan_in_fan_out.to_string());
        write_bytes(path.as_ref(), &serialize(&tensors, &meta)?)
    }
}
