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
}

impl AdapterModule {
    /// `(d_in, d_out, r)` from the adapter tensors alone.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.lora_a.shape()[1], self.lora_b.shape()[0], self.rank)
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
}

/// What one key of `adapter_model.safetensors` holds.
enum Part {
    A,
    B,
    Magnitude,
}

/// Splits `base_model.model.<module>.<part>` into module and part.
///
/// Accepted parts: `lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector` (what PEFT
/// writes) and `lora_magnitude_vector.weight` (PEFT's in-memory name since DoRA became a
/// module; its loader accepts both, `tuners/lora/model.py` `_remap_adapter_state_dict_for_load`).
fn split_key(key: &str) -> Result<(String, Part)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    const PARTS: &[(&str, u8)] = &[
        (".lora_A.weight", 0),
        (".lora_B.weight", 1),
        (".lora_magnitude_vector.weight", 2),
        (".lora_magnitude_vector", 2),
    ];
    for (suffix, p) in PARTS {
        if let Some(module) = rest.strip_suffix(suffix) {
            ensure!(!module.is_empty(), "adapter tensor {key:?} names no module");
            let part = match p {
                0 => Part::A,
                1 => Part::B,
                _ => Part::Magnitude,
            };
            return Ok((module.to_string(), part));
        }
    }
    // Name what it is when we can, so the refusal says why.
    let module = rest.split(".lora_").next().unwrap_or(rest);
    if rest.contains(".lora_embedding_") {
        bail!("{module}: LoRA/DoRA on an embedding layer is not supported (tensor {key})");
    }
    if rest.contains(".lora_bias") || rest.ends_with(".lora_B.bias") {
        bail!("{module}: lora_bias (a trainable bias on lora_B) is not supported (tensor {key})");
    }
    if rest.contains(".modules_to_save.") || rest.ends_with(".bias") || rest.ends_with(".weight") {
        bail!("{module}: the adapter carries a full base tensor ({key}); modules_to_save and trained biases are not supported");
    }
    bail!("adapter tensor {key:?} is not a LoRA/DoRA tensor dorafuse knows (lora_A.weight, lora_B.weight, lora_magnitude_vector)")
}

impl Adapter {
    /// Loads an adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    ///
    /// Every module is checked: lora_A `[r, d_in]` and lora_B `[d_out, r]` both present and
    /// 2-D (a conv adapter is refused), r equal to the config's rank for that module
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
        type Parts = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
        // Sorted, so the first error reported is the same on every run.
        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        for (key, view) in st.tensors() {
            let (module, part) = split_key(&key)?;
            let t = Tensor::from_view(&key, &view).with_context(|| module.clone())?;
            let e = parts.entry(module.clone()).or_default();
            let slot = match part {
                Part::A => &mut e.0,
                Part::B => &mut e.1,
                Part::Magnitude => &mut e.2,
            };
            ensure!(
                slot.is_none(),
                "{module}: tensor {key} appears twice (with and without .weight)"
            );
            *slot = Some(t);
        }
        ensure!(!parts.is_empty(), "{WEIGHTS_FILE} holds no adapter tensors");
        let matcher = config.matcher()?;
        let mut modules = BTreeMap::new();
        for (name, (a, b, m)) in parts {
            let a = a.with_context(|| format!("{name}: lora_A.weight is missing"))?;
            let b = b.with_context(|| format!("{name}: lora_B.weight is missing"))?;
            let module = build_module(&name, a, b, m, &config, &matcher)?;
            modules.insert(name, module);
        }
        Ok(Self {
            config,
            modules,
            metadata,
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
        let mut named: Vec<(String, &Tensor)> = Vec::new();
        for (name, m) in &self.modules {
            named.push((format!("{KEY_PREFIX}{name}.lora_A.weight"), &m.lora_a));
            named.push((format!("{KEY_PREFIX}{name}.lora_B.weight"), &m.lora_b));
            if let Some(mag) = &m.magnitude {
                named.push((format!("{KEY_PREFIX}{name}.lora_magnitude_vector"), mag));
            }
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

/// Checks one module's tensors against each other and against the config.
fn build_module(
    name: &str,
    a: Tensor,
    b: Tensor,
    m: Option<Tensor>,
    config: &AdapterConfig,
    matcher: &super::config::Matcher,
) -> Result<AdapterModule> {
    let l = &config.lora;
    let (sa, sb) = (a.shape().to_vec(), b.shape().to_vec());
    if sa.len() != 2 || sb.len() != 2 {
        bail!("{name}: lora_A is {sa:?} and lora_B is {sb:?}; only linear layers (2-D factors) are supported, not convolutions");
    }
    let (r, _d_in) = (sa[0], sa[1]);
    let d_out = sb[0];
    ensure!(
        sb[1] == r,
        "{name}: lora_B is {sb:?} but lora_A is {sa:?}: rank {} of lora_B disagrees with rank {r} of lora_A",
        sb[1]
    );
    ensure!(
        r >= 1 && sa[1] >= 1 && d_out >= 1,
        "{name}: empty adapter tensors (lora_A {sa:?}, lora_B {sb:?})"
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
        bail!("{name}: lora_A is {sa:?}, so the rank is {r}, but the config gives rank {want_r} ({from})");
    }
    match (&m, l.use_dora) {
        (None, true) => bail!("{name}: use_dora is true but lora_magnitude_vector is missing"),
        (Some(_), false) => {
            bail!("{name}: the file has lora_magnitude_vector but the config's use_dora is false")
        }
        (Some(mag), true) => ensure!(
            mag.shape() == [d_out],
            "{name}: lora_magnitude_vector is {:?}, expected [{d_out}] (d_out from lora_B)",
            mag.shape()
        ),
        (None, false) => {}
    }
    a.check_finite(&format!("{name}.lora_A"))?;
    b.check_finite(&format!("{name}.lora_B"))?;
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
    })
}
