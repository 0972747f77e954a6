//! An adapter directory as PEFT's `save_pretrained` writes it: `adapter_config.json` and
//! `adapter_model.safetensors`; loading (with every module checked against the config) and
//! saving in the same format.

use super::config::AdapterConfig;
use crate::dtype::DType;
use crate::layer;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The file names inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every module name (`PeftModel.base_model.model`).
pub const KEY_PREFIX: &str = "base_model.model.";

/// One adapted module: its low-rank factors, its DoRA magnitude, and the rank, alpha and
/// scaling the config gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterModule {
    /// The module name relative to the base model (`encoder.layer.0.attention.self.query`).
    pub name: String,
    /// A `[r, d_in]`.
    pub lora_a: Tensor,
    /// B `[d_out, r]`.
    pub lora_b: Tensor,
    /// DoRA magnitude m `[d_out]`; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// The rank (from the tensors, checked against the config).
    pub rank: usize,
    /// The module's alpha (`alpha_pattern` aware).
    pub alpha: f64,
    /// The effective scaling s (alpha / r, or alpha / sqrt(r) with rsLoRA).
    pub scaling: f64,
    /// The kind of base layer PEFT adapted, told by the tensor names and shapes.
    pub kind: ModuleKind,
    /// `lora_B.bias` `[d_out]` (`lora_bias=True`, plain LoRA only): merged as
    /// bias + s·lora_B.bias (PEFT's `Linear.merge`).
    pub lora_bias: Option<Tensor>,
}

/// Which PEFT layer class a module is, and how its tensors map onto the linear form
/// `W' = diag(g)·(W0 + s·B·A)` with rows `[d_out, d_in]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleKind {
    /// `lora.Linear` over `nn.Linear` or transformers' `Conv1D` (the layout of each module is
    /// decided against the base, see `AdaptedModel`).
    Linear,
    /// `lora.Embedding` over `nn.Embedding` `[num_embeddings, embedding_dim]`:
    /// `lora_embedding_A` `[r, num_embeddings]` is A, `lora_embedding_B`
    /// `[embedding_dim, r]` is B, and the weight is used transposed (rows = embedding
    /// dimensions), as PEFT's `DoraEmbeddingLayer(fan_in_fan_out=True)` does: the DoRA norm
    /// runs over the vocabulary, one magnitude per embedding dimension.
    Embedding,
    /// `lora.Conv2d` (or Conv1d/Conv3d) with `lora_B` a 1×1 convolution: the weight
    /// `[out, in/groups, k...]` is used as `[out, in/groups·Πk]`, lora_A
    /// `[r, in, k...]` as `[r, in·Πk]`, lora_B `[out, r, 1...]` as `[out, r]` and the
    /// magnitude `[1, out, 1...]` as `[out]`; the norm is per output channel over all other
    /// axes (`_DoraConvNdLayer.get_weight_norm`, dims 1..). The stored shapes are kept here.
    Conv {
        /// lora_A as stored.
        a_shape: Vec<usize>,
        /// lora_B as stored.
        b_shape: Vec<usize>,
        /// The magnitude as stored (DoRA), else empty.
        m_shape: Vec<usize>,
    },
}

impl AdapterModule {
    /// `(d_in, d_out, r)` from the adapter tensors alone, as loaded (a module of
    /// [`Adapter::load`] is checked); [`AdapterModule::checked_dims`] checks a module built by
    /// hand. A tensor that is not 2-D gives 0 for its size.
    pub fn dims(&self) -> (usize, usize, usize) {
        let at = |t: &Tensor, i: usize| t.shape().get(i).copied().unwrap_or(0);
        (at(&self.lora_a, 1), at(&self.lora_b, 0), self.rank)
    }

    /// [`AdapterModule::dims`] after checking that the tensors agree: lora_A `[r, d_in]`,
    /// lora_B `[d_out, r]` with r = [`AdapterModule::rank`], and a magnitude of `d_out`
    /// elements (DoRA).
    ///
    /// # Errors
    /// An [`crate::error::ErrorKind::InvalidInput`] naming the tensor that disagrees.
    pub fn checked_dims(&self) -> Result<(usize, usize, usize)> {
        let (a, b, r) = (self.lora_a.shape(), self.lora_b.shape(), self.rank);
        crate::error::ensure_input!(
            a.len() == 2 && a[0] == r,
            "lora_A is {a:?}, expected [{r}, d_in] (rank {r})"
        );
        crate::error::ensure_input!(
            b.len() == 2 && b[1] == r,
            "lora_B is {b:?}, expected [d_out, {r}] (rank {r})"
        );
        if let Some(m) = &self.magnitude {
            crate::error::ensure_input!(
                m.len() == b[0],
                "magnitude is {:?}, expected {} elements (d_out of lora_B)",
                m.shape(),
                b[0]
            );
        }
        Ok((a[1], b[0], r))
    }

    /// The dtype the adapter tensors are stored in (lora_A's; PEFT keeps all three alike).
    pub fn dtype(&self) -> DType {
        self.lora_a.dtype()
    }
}

/// A loaded PEFT LoRA/DoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// The parsed `adapter_config.json`.
    pub config: AdapterConfig,
    /// The adapted modules, by name (sorted).
    pub modules: BTreeMap<String, AdapterModule>,
    /// `__metadata__` of the weights file (PEFT writes `{"format": "pt"}`).
    pub metadata: BTreeMap<String, String>,
    /// The trained copies of `modules_to_save`, and the base biases trained with `bias`
    /// `"all"`/`"lora_only"`, by tensor name relative to the base model
    /// (`classifier.weight`): they replace the base's tensors when merging.
    pub saved: BTreeMap<String, Tensor>,
}

/// The base model's name of a saved full tensor: PEFT saves the trained bias of an adapted
/// module under its wrapper's name, `<module>.base_layer.bias`, for the base's
/// `<module>.bias`.
pub fn saved_base_name(name: &str) -> String {
    name.replace(".base_layer.", ".")
}

/// What one key of `adapter_model.safetensors` holds.
enum Part {
    A,
    B,
    Magnitude,
    EmbeddingA,
    EmbeddingB,
    BBias,
}

/// Splits `base_model.model.<module>.<part>` into module and part; `None` for a key that is
/// no LoRA tensor (a `modules_to_save` tensor, decided by the caller).
///
/// Accepted parts: `lora_A.weight`, `lora_B.weight`, `lora_B.bias`, `lora_embedding_A`,
/// `lora_embedding_B`, `lora_magnitude_vector` (what PEFT writes) and
/// `lora_magnitude_vector.weight` (PEFT's in-memory name since DoRA became a module; its
/// loader accepts both, `tuners/lora/model.py` `_remap_adapter_state_dict_for_load`).
fn split_key(key: &str) -> Result<Option<(String, Part)>> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    const PARTS: &[(&str, u8)] = &[
        (".lora_A.weight", 0),
        (".lora_B.weight", 1),
        (".lora_magnitude_vector.weight", 2),
        (".lora_magnitude_vector", 2),
        (".lora_embedding_A", 3),
        (".lora_embedding_B", 4),
        (".lora_B.bias", 5),
    ];
    for (suffix, p) in PARTS {
        if let Some(module) = rest.strip_suffix(suffix) {
            ensure!(!module.is_empty(), "adapter tensor {key:?} names no module");
            let part = match p {
                0 => Part::A,
                1 => Part::B,
                2 => Part::Magnitude,
                3 => Part::EmbeddingA,
                4 => Part::EmbeddingB,
                _ => Part::BBias,
            };
            return Ok(Some((module.to_string(), part)));
        }
    }
    if rest.contains(".lora_") {
        let module = rest.split(".lora_").next().unwrap_or(rest);
        bail!("{module}: adapter tensor {key} is not a LoRA/DoRA tensor dorafuse knows (lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B, lora_magnitude_vector)");
    }
    Ok(None)
}

/// The tensors of one module as read from the file.
#[derive(Default)]
struct Parts {
    a: Option<Tensor>,
    b: Option<Tensor>,
    m: Option<Tensor>,
    bias: Option<Tensor>,
    embedding: bool,
}

impl Adapter {
    /// Loads an adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    ///
    /// Every module is checked: lora_A `[r, d_in]` and lora_B `[d_out, r]` both present
    /// (2-D, or a convolution's, or `lora_embedding_A`/`_B`), r equal to the config's rank for that module
    /// (`rank_pattern` aware), the magnitude `[d_out]` present exactly when `use_dora`, the
    /// module a target of the config, and every value finite.
    ///
    /// # Errors
    /// The first problem, naming the module (or the file when it is not a safetensors file).
    pub fn load(dir: &Path) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "adapter {}: not a directory (expected {CONFIG_FILE} and {WEIGHTS_FILE} inside)",
            dir.display()
        );
        let config = AdapterConfig::read(&dir.join(CONFIG_FILE))?;
        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.exists() && dir.join("adapter_model.bin").exists() {
            bail!(
                "{}: only adapter_model.bin (a pickle) is present; re-save the adapter with safe_serialization=True",
                dir.display()
            );
        }
        let bytes =
            std::fs::read(&wpath).with_context(|| format!("cannot read {}", wpath.display()))?;
        Self::from_parts(config, &bytes).with_context(|| format!("adapter {}", dir.display()))
    }

    /// Builds an adapter from a parsed config and the bytes of `adapter_model.safetensors`.
    ///
    /// # Errors
    /// As [`Adapter::load`].
    pub fn from_parts(config: AdapterConfig, weights: &[u8]) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(weights).map_err(|e| {
            anyhow::anyhow!(
                "{WEIGHTS_FILE} is not a valid safetensors file (truncated or corrupt?): {e}"
            )
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(weights)
            .map_err(|e| anyhow::anyhow!("{WEIGHTS_FILE}: {e}"))?;
        let metadata: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let matcher = config.matcher()?;
        // Sorted, so the first error reported is the same on every run.
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut saved = BTreeMap::new();
        let mut keys: Vec<_> = st.tensors();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, view) in keys {
            let Some((module, part)) = split_key(&key)? else {
                let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(&key);
                let module = rest.rsplit_once('.').map_or("", |(m, _)| m);
                if rest.contains(".modules_to_save.") {
                    bail!("{module}: tensor {key} keeps PEFT's in-memory modules_to_save wrapper name; re-save the adapter with PEFT's save_pretrained");
                }
                // bias="all" / "lora_only": PEFT trains and saves base biases, loaded over the
                // base's own (`get_peft_model_state_dict`, `set_peft_model_state_dict`).
                let trained_bias = config.lora.bias.as_deref().is_some_and(|b| b != "none")
                    && rest.ends_with(".bias");
                if module.is_empty() || !(matcher.in_modules_to_save(module) || trained_bias) {
                    bail!("{}: adapter tensor {key} is a full tensor of a module that neither modules_to_save lists nor the config's bias ({:?}) trains", if module.is_empty() { rest } else { module }, config.lora.bias.as_deref().unwrap_or("none"));
                }
                let t = Tensor::from_view(&key, &view)
                    .with_context(|| format!("{module}: modules_to_save tensor {key}"))?;
                t.check_finite(rest)?;
                saved.insert(rest.to_string(), t);
                continue;
            };
            let t = Tensor::from_view(&key, &view).with_context(|| module.clone())?;
            let e = parts.entry(module.clone()).or_default();
            let slot = match part {
                Part::A => &mut e.a,
                Part::B => &mut e.b,
                Part::EmbeddingA => {
                    e.embedding = true;
                    &mut e.a
                }
                Part::EmbeddingB => {
                    e.embedding = true;
                    &mut e.b
                }
                Part::Magnitude => &mut e.m,
                Part::BBias => &mut e.bias,
            };
            ensure!(
                slot.is_none(),
                "{module}: tensor {key} appears twice (with and without .weight, or as both a linear and an embedding factor)"
            );
            *slot = Some(t);
        }
        ensure!(
            !parts.is_empty() || !saved.is_empty(),
            "{WEIGHTS_FILE} holds no adapter tensors"
        );
        // A modules_to_save entry with no tensor is not an error: PEFT lists `classifier` and
        // `score` for every sequence-classification adapter, and a model has one of them.
        let mut modules = BTreeMap::new();
        for (name, p) in parts {
            let (ka, kb) = if p.embedding {
                ("lora_embedding_A", "lora_embedding_B")
            } else {
                ("lora_A.weight", "lora_B.weight")
            };
            let a = p.a.with_context(|| format!("{name}: {ka} is missing"))?;
            let b = p.b.with_context(|| format!("{name}: {kb} is missing"))?;
            let module = build_module(&name, a, b, p.m, p.bias, p.embedding, &config, &matcher)?;
            modules.insert(name, module);
        }
        Ok(Self {
            config,
            modules,
            metadata,
            saved,
        })
    }

    /// True when the config says DoRA.
    pub fn is_dora(&self) -> bool {
        self.config.lora.use_dora
    }

    /// Writes the adapter in PEFT's format into `dir` (created if needed):
    /// `adapter_config.json` (the original object, sorted keys) and
    /// `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`,
    /// `.lora_B.weight`, `.lora_magnitude_vector`, each tensor in its own dtype,
    /// `__metadata__` `{"format": "pt"}` as PEFT writes it). Each file is written atomically.
    ///
    /// # Errors
    /// I/O errors, naming the file.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create adapter directory {}", dir.display()))?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (name, m) in &self.modules {
            let reshape = |t: &Tensor, shape: &[usize]| {
                Tensor::new(shape.to_vec(), t.data().clone()).with_context(|| name.clone())
            };
            match &m.kind {
                ModuleKind::Linear => {
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_A.weight"),
                        m.lora_a.clone(),
                    ));
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_B.weight"),
                        m.lora_b.clone(),
                    ));
                    if let Some(mag) = &m.magnitude {
                        named.push((
                            format!("{KEY_PREFIX}{name}.lora_magnitude_vector"),
                            mag.clone(),
                        ));
                    }
                }
                ModuleKind::Embedding => {
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_embedding_A"),
                        m.lora_a.clone(),
                    ));
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_embedding_B"),
                        m.lora_b.clone(),
                    ));
                    if let Some(mag) = &m.magnitude {
                        named.push((
                            format!("{KEY_PREFIX}{name}.lora_magnitude_vector"),
                            mag.clone(),
                        ));
                    }
                }
                ModuleKind::Conv {
                    a_shape,
                    b_shape,
                    m_shape,
                } => {
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_A.weight"),
                        reshape(&m.lora_a, a_shape)?,
                    ));
                    named.push((
                        format!("{KEY_PREFIX}{name}.lora_B.weight"),
                        reshape(&m.lora_b, b_shape)?,
                    ));
                    if let Some(mag) = &m.magnitude {
                        named.push((
                            format!("{KEY_PREFIX}{name}.lora_magnitude_vector"),
                            reshape(mag, m_shape)?,
                        ));
                    }
                }
            }
            if let Some(bias) = &m.lora_bias {
                named.push((format!("{KEY_PREFIX}{name}.lora_B.bias"), bias.clone()));
            }
        }
        for (name, t) in &self.saved {
            named.push((format!("{KEY_PREFIX}{name}"), t.clone()));
        }
        let views = named
            .iter()
            .map(|(k, t)| {
                let v = safetensors::tensor::TensorView::new(
                    t.dtype().to_safetensors(),
                    t.shape().to_vec(),
                    t.as_bytes(),
                )
                .map_err(|e| anyhow::anyhow!("tensor {k}: {e}"))?;
                Ok((k.clone(), v))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.entry("format".into()).or_insert_with(|| "pt".into());
        let bytes = safetensors::serialize(views, &Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising {WEIGHTS_FILE}: {e}"))?;
        let wpath = dir.join(WEIGHTS_FILE);
        crate::fsutil::write_atomic(&wpath, |f| {
            use std::io::Write;
            Ok(f.write_all(&bytes)?)
        })?;
        let json = self.config.to_json();
        crate::fsutil::write_atomic(&dir.join(CONFIG_FILE), |f| {
            use std::io::Write;
            Ok(f.write_all(json.as_bytes())?)
        })?;
        Ok(())
    }
}

/// A tensor with a new shape of the same element count.
fn reshaped(t: Tensor, shape: Vec<usize>, what: &str) -> Result<Tensor> {
    Tensor::new(shape, t.data().clone()).with_context(|| what.to_string())
}

/// Checks one module's tensors against each other and against the config, and brings
/// convolution factors to their linear form (see [`ModuleKind`]).
#[allow(clippy::too_many_arguments)]
fn build_module(
    name: &str,
    a: Tensor,
    b: Tensor,
    m: Option<Tensor>,
    lora_bias: Option<Tensor>,
    embedding: bool,
    config: &AdapterConfig,
    matcher: &super::config::Matcher,
) -> Result<AdapterModule> {
    let l = &config.lora;
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    let (a, b, m, kind) = if embedding {
        ensure!(
            sa.len() == 2 && sb.len() == 2,
            "{name}: lora_embedding_A is {sa:?} and lora_embedding_B is {sb:?}; both must be 2-D"
        );
        (a, b, m, ModuleKind::Embedding)
    } else if sa.len() == 2 && sb.len() == 2 {
        (a, b, m, ModuleKind::Linear)
    } else if sa.len() >= 3 && sa.len() == sb.len() {
        // A convolution: lora_B must be a 1x1 kernel (PEFT's default; the view it takes).
        ensure!(
            sb[2..].iter().all(|&k| k == 1),
            "{name}: lora_B is {sb:?}; only a 1x1 lora_B kernel (PEFT's) is supported for convolutions"
        );
        let r = sa[0];
        let k: usize = sa[1..].iter().product();
        let m_shape = m.as_ref().map(|t| t.shape().to_vec()).unwrap_or_default();
        let a2 = reshaped(a, vec![r, k], name)?;
        let b2 = reshaped(b, vec![sb[0], sb[1]], name)?;
        let m2 = match m {
            Some(t) => {
                let want: Vec<usize> = std::iter::once(1)
                    .chain(std::iter::once(sb[0]))
                    .chain(std::iter::repeat(1).take(sa.len() - 2))
                    .collect();
                ensure!(
                    t.shape() == want.as_slice(),
                    "{name}: lora_magnitude_vector is {:?}, expected {want:?} (one per output channel)",
                    t.shape()
                );
                Some(reshaped(t, vec![sb[0]], name)?)
            }
            None => None,
        };
        (
            a2,
            b2,
            m2,
            ModuleKind::Conv {
                a_shape: sa.clone(),
                b_shape: sb.clone(),
                m_shape,
            },
        )
    } else {
        bail!("{name}: lora_A is {sa:?} and lora_B is {sb:?}; neither a linear (2-D) nor a convolution (lora_A and lora_B of one rank ≥ 3) adapter");
    };
    let (fa, fb) = if embedding {
        ("lora_embedding_A", "lora_embedding_B")
    } else {
        ("lora_A", "lora_B")
    };
    let (sa2, sb2) = (a.shape().to_vec(), b.shape().to_vec());
    let (r, _d_in) = (sa2[0], sa2[1]);
    let d_out = sb2[0];
    ensure!(
        sb2[1] == r,
        "{name}: {fb} is {sb:?} but {fa} is {sa:?}: rank {} of {fb} disagrees with rank {r} of {fa}",
        sb2[1]
    );
    ensure!(
        r >= 1 && sa2[1] >= 1 && d_out >= 1,
        "{name}: empty adapter tensors ({fa} {sa:?}, {fb} {sb:?})"
    );
    ensure!(
        matcher.is_target(name),
        "{name}: the adapter file has tensors for this module but the config does not target it (target_modules {})",
        serde_json::to_string(&l.target_modules).unwrap_or_default()
    );
    let want_r = matcher.rank(name);
    if r != want_r {
        let from = match matcher.rank_key(name) {
            Some(k) => format!("rank_pattern[{k:?}]"),
            None => "r".to_string(),
        };
        bail!("{name}: {fa} is {sa:?}, so the rank is {r}, but the config gives rank {want_r} ({from})");
    }
    match (&m, l.use_dora) {
        (None, true) => bail!("{name}: use_dora is true but lora_magnitude_vector is missing"),
        (Some(_), false) => {
            bail!("{name}: the file has lora_magnitude_vector but the config's use_dora is false")
        }
        (Some(mag), true) => ensure!(
            mag.shape() == [d_out],
            "{name}: lora_magnitude_vector is {:?}, expected [{d_out}] (d_out from {fb})",
            mag.shape()
        ),
        (None, false) => {}
    }
    match (&lora_bias, l.lora_bias) {
        (Some(_), false) => {
            bail!("{name}: the file has lora_B.bias but the config's lora_bias is false")
        }
        (None, true) => bail!("{name}: lora_bias is true but lora_B.bias is missing"),
        (Some(t), true) => {
            ensure!(
                matches!(kind, ModuleKind::Linear),
                "{name}: lora_B.bias on a convolution or embedding adapter is not supported"
            );
            ensure!(
                t.shape() == [d_out],
                "{name}: lora_B.bias is {:?}, expected [{d_out}]",
                t.shape()
            );
            t.check_finite(&format!("{name}.lora_B.bias"))?;
        }
        (None, false) => {}
    }
    a.check_finite(&format!("{name}.{fa}"))?;
    b.check_finite(&format!("{name}.{fb}"))?;
    if let Some(mag) = &m {
        mag.check_finite(&format!("{name}.lora_magnitude_vector"))?;
    }
    let alpha = matcher.alpha(name);
    let scaling = layer::scaling(alpha, r, l.use_rslora).with_context(|| name.to_string())?;
    Ok(AdapterModule {
        name: name.to_string(),
        lora_a: a,
        lora_b: b,
        magnitude: m,
        rank: r,
        alpha,
        scaling,
        kind,
        lora_bias,
    })
}
