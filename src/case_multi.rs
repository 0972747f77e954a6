//! The multi-adapter layer (serving) and its case format (docs/design.md §2b): one base layer,
//! K adapters (each DoRA or plain LoRA, each its own rank and scaling) and a per-token adapter
//! index, −1 meaning the base layer only:
//!
//! ```text
//! y_t = g_k ⊙ (x_t·W0ᵀ + s_k·(x_t·A_kᵀ)·B_kᵀ) + b     token t on adapter k (g_k = 1 for LoRA)
//! y_t = x_t·W0ᵀ + b                                   token t with index −1
//! ```
//!
//! Tensors: `x [T, d_in]`, `weight` (as in §2, `[d_in, d_out]` with `fan_in_fan_out`),
//! `bias [d_out]`?, `adapter_index [T]` int32, and for k = 0..K−1 `adapters.k.lora_A
//! [r_k, d_in]`, `adapters.k.lora_B [d_out, r_k]`, `adapters.k.magnitude [d_out]`? (absent =
//! plain LoRA); `expected.y [T, d_out]`?. Metadata: `adapters` (K, required),
//! `adapters.k.scaling` (s_k, required for every k), `fan_in_fan_out` (default false); every
//! other key is kept (`peft_rel_err.y`, `zero_rows.k`, descriptive extras).
//!
//! A file is a multi-adapter case exactly when it holds an `adapter_index` tensor
//! ([`is_multi_case`]). Reading is as strict as for single-layer cases: unknown tensor names,
//! a tensor of an adapter k ≥ K, a missing tensor, a wrong shape or dtype, an index outside
//! −1..K−1 and NaN/Inf in any input are each a one-line error naming the tensor.

use crate::dtype::DType;
use crate::fsutil::write_atomic;
use crate::layer::Layer;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Name of the per-token adapter index tensor; its presence marks a multi-adapter case.
pub const INDEX_NAME: &str = "adapter_index";

/// Prefix of the per-adapter tensors and metadata: `adapters.<k>.<name>`.
pub const ADAPTER_PREFIX: &str = "adapters.";

/// One adapter of a multi-adapter layer, each tensor in its own dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterWeights {
    /// A `[r, d_in]` (PEFT's `lora_A`).
    pub lora_a: Tensor,
    /// B `[d_out, r]` (PEFT's `lora_B`).
    pub lora_b: Tensor,
    /// m `[d_out]` (PEFT's `lora_magnitude_vector`); `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// The effective scaling s (`lora_alpha / r`, or `/ √r` with rsLoRA).
    pub scaling: f64,
}

impl AdapterWeights {
    /// True for DoRA (a magnitude is present).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// The rank (rows of `lora_A`; 0 for a malformed tensor, which validation refuses).
    pub fn rank(&self) -> usize {
        self.lora_a.shape().first().copied().unwrap_or(0)
    }
}

/// One base layer with several adapters: what a serving engine holds per adapted module.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiLayer {
    /// Frozen base weight W0, `[d_out, d_in]` (or `[d_in, d_out]` with `fan_in_fan_out`).
    pub weight: Tensor,
    /// Optional bias `[d_out]`, added after the scale (PEFT's behaviour).
    pub bias: Option<Tensor>,
    /// True when `weight` is stored `[d_in, d_out]` (GPT-2's Conv1D).
    pub fan_in_fan_out: bool,
    /// The adapters; a token's index k selects `adapters[k]`.
    pub adapters: Vec<AdapterWeights>,
}

/// `adapters.<k>.<name>`.
pub fn adapter_tensor_name(k: usize, name: &str) -> String {
    format!("{ADAPTER_PREFIX}{k}.{name}")
}

impl MultiLayer {
    /// Validates the base and every adapter against it; returns `(d_in, d_out)`.
    ///
    /// # Errors
    /// The first inconsistency, naming the tensor (`weight`, `bias`, `adapters.k.lora_A`, ...),
    /// its shape and the expected shape; a non-finite scaling.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let w = self.weight.shape();
        ensure!(w.len() == 2, "weight must be 2-D, got {w:?}");
        let (d_out, d_in) = if self.fan_in_fan_out {
            (w[1], w[0])
        } else {
            (w[0], w[1])
        };
        ensure!(
            d_in >= 1 && d_out >= 1,
            "weight is {w:?}: d_in and d_out must be at least 1"
        );
        if let Some(b) = &self.bias {
            ensure!(
                b.shape() == [d_out],
                "bias is {:?}, expected [{d_out}] ([d_out])",
                b.shape()
            );
        }
        for (k, a) in self.adapters.iter().enumerate() {
            let n = |s: &str| adapter_tensor_name(k, s);
            let sa = a.lora_a.shape();
            ensure!(
                sa.len() == 2 && sa[0] >= 1 && sa[1] == d_in,
                "{} is {sa:?}, expected [r, {d_in}] (r ≥ 1, d_in from weight)",
                n("lora_A")
            );
            let r = sa[0];
            let sb = a.lora_b.shape();
            ensure!(
                sb == [d_out, r],
                "{} is {sb:?}, expected [{d_out}, {r}] ([d_out, r], r from {})",
                n("lora_B"),
                n("lora_A")
            );
            if let Some(m) = &a.magnitude {
                ensure!(
                    m.shape() == [d_out],
                    "{} is {:?}, expected [{d_out}] ([d_out])",
                    n("magnitude"),
                    m.shape()
                );
            }
            ensure!(
                a.scaling.is_finite(),
                "{} is {}, expected a finite number",
                n("scaling"),
                a.scaling
            );
        }
        Ok((d_in, d_out))
    }

    /// Checks `x [T, d_in]` and `adapter_index [T]` (each value in −1..K−1) against the layer;
    /// returns `(T, d_in, d_out)`.
    ///
    /// # Errors
    /// A layer inconsistency, a mis-shaped `x`, an index of another length, or the first
    /// out-of-range index (naming the token).
    pub fn check_call(&self, x: &Tensor, index: &[i32]) -> Result<(usize, usize, usize)> {
        let (d_in, d_out) = self.dims()?;
        let xs = x.shape();
        ensure!(
            xs.len() == 2 && xs[1] == d_in && xs[0] >= 1,
            "x is {xs:?}, expected [T, {d_in}] (T ≥ 1, d_in from weight)"
        );
        ensure!(
            index.len() == xs[0],
            "{INDEX_NAME} has {} entries, expected T = {} (one per row of x)",
            index.len(),
            xs[0]
        );
        check_index(index, self.adapters.len())?;
        Ok((xs[0], d_in, d_out))
    }

    /// Fails on the first NaN or infinity in any parameter, naming the tensor.
    ///
    /// # Errors
    /// A non-finite element.
    pub fn check_finite(&self) -> Result<()> {
        self.weight.check_finite("weight")?;
        if let Some(b) = &self.bias {
            b.check_finite("bias")?;
        }
        for (k, a) in self.adapters.iter().enumerate() {
            a.lora_a.check_finite(&adapter_tensor_name(k, "lora_A"))?;
            a.lora_b.check_finite(&adapter_tensor_name(k, "lora_B"))?;
            if let Some(m) = &a.magnitude {
                m.check_finite(&adapter_tensor_name(k, "magnitude"))?;
            }
        }
        Ok(())
    }

    /// Adapter k as a single-adapter [`Layer`] over the same base (a copy of the base weight:
    /// for the CPU path's norm and for tests, not for a hot path).
    ///
    /// # Panics
    /// When `k` is not an adapter of the layer.
    pub fn adapter_layer(&self, k: usize) -> Layer {
        let a = &self.adapters[k];
        Layer {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            lora_a: a.lora_a.clone(),
            lora_b: a.lora_b.clone(),
            magnitude: a.magnitude.clone(),
            scaling: a.scaling,
            fan_in_fan_out: self.fan_in_fan_out,
        }
    }
}

/// Checks that every index lies in −1..`adapters`−1.
///
/// # Errors
/// The first token whose index is out of range, naming it.
pub fn check_index(index: &[i32], adapters: usize) -> Result<()> {
    if let Some((t, &k)) = index
        .iter()
        .enumerate()
        .find(|&(_, &k)| k < -1 || k >= 0 && k as usize >= adapters)
    {
        bail!(
            "{INDEX_NAME}[{t}] is {k}, outside -1..={} (-1 = base layer only, {adapters} adapters)",
            adapters as i64 - 1
        );
    }
    Ok(())
}

/// One multi-adapter case: the layer, its input, the per-token index, the expected output and
/// the metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiCase {
    /// The base layer and its adapters.
    pub layer: MultiLayer,
    /// x `[T, d_in]`; its dtype is the computation dtype.
    pub x: Tensor,
    /// The adapter of each token `[T]`; −1 = base layer only.
    pub adapter_index: Vec<i32>,
    /// `expected.y` `[T, d_out]`, when the case has it.
    pub expected_y: Option<Tensor>,
    /// All `__metadata__` entries, including `adapters`, `adapters.k.scaling`, `fan_in_fan_out`.
    pub metadata: BTreeMap<String, String>,
}

/// True when the safetensors bytes hold an `adapter_index` tensor (a multi-adapter case).
///
/// # Errors
/// Bytes that are not a valid safetensors file.
pub fn is_multi_case(bytes: &[u8]) -> Result<bool> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!("not a valid safetensors file (truncated or corrupt): {e:?}")
    })?;
    Ok(header.tensors().contains_key(INDEX_NAME))
}

/// Splits `adapters.<k>.<rest>` into `(k, rest)`.
fn split_adapter_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix(ADAPTER_PREFIX)?;
    let (k, field) = rest.split_once('.')?;
    Some((k.parse().ok()?, field))
}

/// Parses a metadata decimal, naming the key.
fn parse_f64(meta: &BTreeMap<String, String>, key: &str, what: &str) -> Result<f64> {
    let v = meta
        .get(key)
        .with_context(|| format!("metadata {key} is missing ({what})"))?;
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite())
        .with_context(|| format!("metadata {key} is {v:?}, expected a finite decimal ({what})"))
}

/// The tensors of one adapter while reading.
#[derive(Default)]
struct Partial {
    lora_a: Option<Tensor>,
    lora_b: Option<Tensor>,
    magnitude: Option<Tensor>,
}

impl MultiCase {
    /// Reads and validates a multi-adapter case file.
    ///
    /// # Errors
    /// One line naming the file and the problem (see the module documentation).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read multi-adapter case {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("multi-adapter case {}", path.display()))
    }

    /// Parses and validates a multi-adapter case from safetensors bytes (see [`Self::read`]).
    ///
    /// # Errors
    /// As [`Self::read`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |e| anyhow::anyhow!("not a valid safetensors file (truncated or corrupt): {e:?}");
        let st = SafeTensors::deserialize(bytes).map_err(bad)?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let k_s = metadata.get("adapters").context(
            "metadata adapters is missing (the number of adapters K, as a decimal string)",
        )?;
        let count: usize = k_s
            .trim()
            .parse()
            .with_context(|| format!("metadata adapters is {k_s:?}, expected a count"))?;

        // Two tensors per adapter at least: a larger count cannot be right (and must not
        // allocate before the missing tensors are named).
        let tensors = st.names().len();
        ensure!(
            count <= tensors / 2,
            "metadata adapters is {count}, but the file holds only {tensors} tensors \
             (each adapter has adapters.<k>.lora_A and adapters.<k>.lora_B)"
        );
        let mut x = None;
        let mut weight = None;
        let mut bias = None;
        let mut index = None;
        let mut expected_y = None;
        let mut parts: Vec<Partial> = (0..count).map(|_| Partial::default()).collect();
        let mut names: Vec<String> = st.names().into_iter().cloned().collect();
        names.sort();
        for name in names {
            let view = st
                .tensor(&name)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            let tensor = || Tensor::from_view(&name, &view);
            match name.as_str() {
                "x" => x = Some(tensor()?),
                "weight" => weight = Some(tensor()?),
                "bias" => bias = Some(tensor()?),
                "expected.y" => expected_y = Some(tensor()?),
                INDEX_NAME => index = Some(read_index(&view)?),
                _ => {
                    let Some((k, field)) = split_adapter_name(&name) else {
                        bail!(
                            "unknown tensor {name:?} (inputs are x, weight, bias, {INDEX_NAME}, \
                             adapters.<k>.lora_A, adapters.<k>.lora_B, adapters.<k>.magnitude; \
                             the expected output is expected.y)"
                        );
                    };
                    ensure!(
                        k < count,
                        "tensor {name} belongs to adapter {k}, but metadata adapters is {count}"
                    );
                    let slot = match field {
                        "lora_A" => &mut parts[k].lora_a,
                        "lora_B" => &mut parts[k].lora_b,
                        "magnitude" => &mut parts[k].magnitude,
                        _ => bail!(
                            "unknown tensor {name:?} (an adapter has lora_A, lora_B, magnitude)"
                        ),
                    };
                    *slot = Some(tensor()?);
                }
            }
        }
        let missing = |n: &str| format!("missing tensor {n} (required)");
        let mut adapters = Vec::with_capacity(count);
        for (k, p) in parts.into_iter().enumerate() {
            let n = |s: &str| adapter_tensor_name(k, s);
            adapters.push(AdapterWeights {
                lora_a: p.lora_a.with_context(|| missing(&n("lora_A")))?,
                lora_b: p.lora_b.with_context(|| missing(&n("lora_B")))?,
                magnitude: p.magnitude,
                scaling: parse_f64(&metadata, &n("scaling"), "the effective s of the adapter")?,
            });
        }
        let fan_in_fan_out = match metadata.get("fan_in_fan_out") {
            None => false,
            Some(v) => crate::case::parse_bool("fan_in_fan_out", v)?,
        };
        let case = Self {
            layer: MultiLayer {
                weight: weight.with_context(|| missing("weight"))?,
                bias,
                fan_in_fan_out,
                adapters,
            },
            x: x.with_context(|| missing("x"))?,
            adapter_index: index.with_context(|| missing(INDEX_NAME))?,
            expected_y,
            metadata,
        };
        case.validate()?;
        Ok(case)
    }

    /// Checks every shape, the index range, and that every input is finite.
    ///
    /// # Errors
    /// The first problem, naming the tensor (and token or element).
    pub fn validate(&self) -> Result<()> {
        let (t, _, d_out) = self.layer.check_call(&self.x, &self.adapter_index)?;
        if let Some(e) = &self.expected_y {
            ensure!(
                e.shape() == [t, d_out],
                "expected.y is {:?}, expected [{t}, {d_out}] ([T, d_out])",
                e.shape()
            );
        }
        self.x.check_finite("x")?;
        self.layer.check_finite()
    }

    /// Rows that adapter k zeroes (metadata `zero_rows.<k>`: V_j = 0 and m_j = 0, so g_j = 0
    /// and y = bias there), as `(k, rows)` pairs.
    ///
    /// # Errors
    /// A malformed list or a row outside d_out, naming the key.
    pub fn zero_rows(&self) -> Result<Vec<(usize, Vec<usize>)>> {
        let (_, d_out) = self.layer.dims()?;
        let mut out = Vec::new();
        for (key, v) in &self.metadata {
            let Some(k) = key.strip_prefix("zero_rows.") else {
                continue;
            };
            let k: usize = k
                .parse()
                .ok()
                .filter(|&k| k < self.layer.adapters.len())
                .with_context(|| format!("metadata {key}: {k:?} is not an adapter"))?;
            let rows = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|&j| j < d_out)
                        .with_context(|| {
                            format!("metadata {key}: {s:?} is not a row below {d_out}")
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            out.push((k, rows));
        }
        Ok(out)
    }

    /// PyTorch's own relative error on y (metadata `peft_rel_err.y`), when recorded.
    pub fn peft_rel_err(&self) -> Option<f64> {
        self.metadata
            .get("peft_rel_err.y")
            .and_then(|v| v.trim().parse().ok())
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
    }

    /// Writes the case (inputs, `expected.y` when present, metadata with `adapters`,
    /// `adapters.k.scaling` and `fan_in_fan_out` set from the layer) to `path`, atomically.
    ///
    /// # Errors
    /// The destination is not writable (named), or serialisation fails.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let l = &self.layer;
        let index_bytes: Vec<u8> = self
            .adapter_index
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut named: Vec<(String, &Tensor)> =
            vec![("x".into(), &self.x), ("weight".into(), &l.weight)];
        if let Some(b) = &l.bias {
            named.push(("bias".into(), b));
        }
        for (k, a) in l.adapters.iter().enumerate() {
            named.push((adapter_tensor_name(k, "lora_A"), &a.lora_a));
            named.push((adapter_tensor_name(k, "lora_B"), &a.lora_b));
            if let Some(m) = &a.magnitude {
                named.push((adapter_tensor_name(k, "magnitude"), m));
            }
        }
        if let Some(e) = &self.expected_y {
            named.push(("expected.y".into(), e));
        }
        let mut views = named
            .into_iter()
            .map(|(n, t)| Ok((n.clone(), view_of(&n, t)?)))
            .collect::<Result<Vec<_>>>()?;
        views.push((
            INDEX_NAME.into(),
            TensorView::new(Dtype::I32, vec![self.adapter_index.len()], &index_bytes)
                .with_context(|| format!("tensor {INDEX_NAME}: cannot describe it"))?,
        ));
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.insert("adapters".into(), l.adapters.len().to_string());
        for (k, a) in l.adapters.iter().enumerate() {
            // `{:?}` of an f64 is the shortest decimal that parses back to the same value.
            meta.insert(
                adapter_tensor_name(k, "scaling"),
                format!("{:?}", a.scaling),
            );
        }
        meta.insert("fan_in_fan_out".into(), l.fan_in_fan_out.to_string());
        let bytes =
            safetensors::serialize(views, &Some(meta)).context("serialising safetensors")?;
        write_atomic(path.as_ref(), |f| Ok(f.write_all(&bytes)?))
    }
}

/// A safetensors view of a host tensor, naming it in an error.
fn view_of<'a>(name: &str, t: &'a Tensor) -> Result<TensorView<'a>> {
    TensorView::new(t.dtype().to_safetensors(), t.shape().to_vec(), t.as_bytes())
        .with_context(|| format!("tensor {name}: cannot describe it as safetensors"))
}

/// Reads `adapter_index`: int32 `[T]`.
fn read_index(view: &TensorView<'_>) -> Result<Vec<i32>> {
    ensure!(
        view.dtype() == Dtype::I32,
        "tensor {INDEX_NAME} is {:?}, expected I32 (int32, -1 = base layer only)",
        view.dtype()
    );
    ensure!(
        view.shape().len() == 1,
        "tensor {INDEX_NAME} is {:?}, expected [T]",
        view.shape()
    );
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The computation dtype's adapters: `dt` when every adapter's A and B are stored in it, else
/// f32 (a lossless widening; PEFT's default keeps f32 adapters beside a 16-bit base, and the
/// `_a32` kernels read them as they are). One dtype for all slots, as one kernel reads them.
pub fn adapter_dtype(layer: &MultiLayer, dt: DType) -> DType {
    let all = layer
        .adapters
        .iter()
        .all(|a| a.lora_a.dtype() == dt && a.lora_b.dtype() == dt);
    if all {
        dt
    } else {
        DType::F32
    }
}
