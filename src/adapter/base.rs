//! A base model in safetensors, memory-mapped: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are read one at a time, so a model larger than
//! memory can be inspected and merged.

use crate::dtype::DType;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The single-file model name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor's place in a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Index into [`BaseModel::shards`].
    pub shard: usize,
    /// safetensors dtype (any: integer tensors are copied as they are).
    pub dtype: safetensors::Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte range inside the shard file (absolute, header included).
    pub range: std::ops::Range<usize>,
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// The file.
    pub path: PathBuf,
    /// The mapping of the whole file.
    pub map: Mmap,
    /// Length of the header (8-byte length prefix included); tensor data starts here.
    pub header_len: usize,
    /// Tensor names in data order.
    pub names: Vec<String>,
}

/// A memory-mapped base model.
#[derive(Debug)]
pub struct BaseModel {
    /// The directory holding the model (copied small files come from here).
    pub dir: PathBuf,
    /// The shards, in index order (one for a single file).
    pub shards: Vec<Shard>,
    /// Every tensor, by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The index file, when the model is sharded.
    pub index: Option<PathBuf>,
    /// True when the model was opened as a directory: its other files (config.json,
    /// tokenizer, ...) belong to it and are copied by `merge`.
    pub from_dir: bool,
}

/// A mapped file, its header length and its tensors in data order.
type Mapped = (Mmap, usize, Vec<(String, safetensors::tensor::TensorInfo)>);

fn map_file(path: &Path) -> Result<Mapped> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the mapping is read-only and private to this process; the file is an input the
    // caller promised not to modify while dorafuse runs (the same contract as safetensors'
    // own mmap loaders). A concurrent truncation would fault rather than corrupt memory.
    let map =
        unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    let mut infos: Vec<(String, safetensors::tensor::TensorInfo)> = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    infos.sort_by_key(|(_, i)| i.data_offsets);
    Ok((map, n + 8, infos))
}

impl BaseModel {
    /// Opens a model: a directory with `model.safetensors` or `model.safetensors.index.json`,
    /// or a path to one `.safetensors` file.
    ///
    /// # Errors
    /// No model found, an unreadable or corrupt file (named), an index naming a missing
    /// shard, or a tensor present in two shards.
    pub fn open(path: &Path) -> Result<Self> {
        let (dir, files, index) = if path.is_dir() {
            let idx = path.join(INDEX_FILE);
            if idx.exists() {
                let text = std::fs::read_to_string(&idx)
                    .with_context(|| format!("cannot read {}", idx.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not JSON", idx.display()))?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .with_context(|| format!("{}: no weight_map object", idx.display()))?;
                let mut files: Vec<String> = Vec::new();
                for f in map.values() {
                    let f = f.as_str().with_context(|| {
                        format!("{}: weight_map values must be file names", idx.display())
                    })?;
                    if !files.iter().any(|g| g == f) {
                        files.push(f.to_string());
                    }
                }
                files.sort();
                (path.to_path_buf(), files, Some(idx))
            } else if path.join(SINGLE_FILE).exists() {
                (path.to_path_buf(), vec![SINGLE_FILE.to_string()], None)
            } else {
                bail!(
                    "base model {}: neither {SINGLE_FILE} nor {INDEX_FILE} found",
                    path.display()
                );
            }
        } else if path.is_file() {
            let dir = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            let name = path
                .file_name()
                .context("base model path has no file name")?
                .to_string_lossy()
                .into_owned();
            (dir, vec![name], None)
        } else {
            bail!("base model {}: no such file or directory", path.display());
        };
        let mut shards = Vec::new();
        let mut tensors = BTreeMap::new();
        for (si, f) in files.iter().enumerate() {
            ensure!(
                !f.contains('/') && !f.contains('\\'),
                "base model index names shard {f:?}: shards must sit beside the index"
            );
            let p = dir.join(f);
            let (map, header_len, infos) = map_file(&p)?;
            let mut names = Vec::with_capacity(infos.len());
            for (name, info) in infos {
                let range = header_len + info.data_offsets.0..header_len + info.data_offsets.1;
                let prev = tensors.insert(
                    name.clone(),
                    TensorEntry {
                        shard: si,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range,
                    },
                );
                ensure!(
                    prev.is_none(),
                    "base model: tensor {name} appears in two shards"
                );
                names.push(name);
            }
            shards.push(Shard {
                path: p,
                map,
                header_len,
                names,
            });
        }
        if let Some(idx) = &index {
            // Every tensor the index names must be where it says.
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(idx)?)?;
            for (k, f) in v["weight_map"].as_object().into_iter().flatten() {
                let e = tensors.get(k).with_context(|| {
                    format!(
                        "{}: tensor {k} is listed in {} but absent from it",
                        idx.display(),
                        f
                    )
                })?;
                ensure!(
                    Some(files[e.shard].as_str()) == f.as_str(),
                    "{}: tensor {k} is listed in {f} but stored in {}",
                    idx.display(),
                    files[e.shard]
                );
            }
        }
        Ok(Self {
            dir,
            shards,
            tensors,
            index,
            from_dir: path.is_dir(),
        })
    }

    /// Maps a tensor's pages into the process ahead of a pass over them: on Linux
    /// `MADV_POPULATE_READ`, one call instead of a page fault every few pages (the pages
    /// are the file's page cache either way; nothing is copied). A hint: an error (a kernel
    /// older than 5.14, an unknown name) is ignored, and the pass faults the pages in itself.
    pub fn prefetch(&self, name: &str) {
        #[cfg(target_os = "linux")]
        if let Ok(e) = self.entry(name) {
            let _ = self.shards[e.shard].map.advise_range(
                memmap2::Advice::PopulateRead,
                e.range.start,
                e.range.len(),
            );
        }
        #[cfg(not(target_os = "linux"))]
        let _ = name;
    }

    /// The raw bytes of a tensor (borrowed from the mapping).
    ///
    /// # Errors
    /// No tensor of that name.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.shards[e.shard].map[e.range.clone()])
    }

    /// A tensor's entry.
    ///
    /// # Errors
    /// No tensor of that name.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors
            .get(name)
            .with_context(|| format!("base model has no tensor {name}"))
    }

    /// Reads a floating-point tensor (f32, f16 or bf16) into host memory.
    ///
    /// # Errors
    /// No such tensor, or another dtype (a quantized base, named).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let dtype = DType::from_safetensors(e.dtype).with_context(|| {
            format!("base tensor {name}: quantized or integer base weights are not supported")
        })?;
        Tensor::from_bytes(dtype, e.shape.clone(), self.bytes(name)?)
            .with_context(|| format!("base tensor {name}"))
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.range.len() as u64).sum()
    }
}

/// How adapter module names map onto base tensor names.
///
/// PEFT names a module relative to the model given to `get_peft_model`; the base file may
/// have been saved from a different wrapper of the same network (`BertModel` writes
/// `encoder.…`, `BertForSequenceClassification` writes `bert.encoder.…`). One mapping is
/// used for the whole adapter, never per module. The candidates are: identity
/// (`<module>.weight`); stripping the first component that every module name shares
/// (`bert.encoder.x` → `encoder.x`); adding one prefix `P.` (`encoder.x` → `bert.encoder.x`)
/// for every `P` under which the first module exists. A candidate fits when every module's
/// `.weight` (and every `modules_to_save` tensor) exists under it. Exactly one fitting
/// candidate is used; two or more (the two towers of a model with the same structure, say)
/// are refused, naming them, and an explicit mapping settles it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMap {
    /// Module names are base names.
    Identity,
    /// Each module name loses its first component, which is the same for all (`bert`).
    Strip(String),
    /// Each module name gains this prefix (without the dot).
    Add(String),
}

impl std::fmt::Display for NameMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameMap::Identity => write!(f, "the names as they are (--base-prefix \"\")"),
            NameMap::Strip(p) => write!(f, "\"{p}.\" removed (--strip-prefix {p})"),
            NameMap::Add(p) => write!(f, "\"{p}.\" added (--base-prefix {p})"),
        }
    }
}

impl NameMap {
    /// The base tensor prefix for a module (`<prefix>.weight`, `<prefix>.bias`).
    pub fn base_name(&self, module: &str) -> String {
        match self {
            NameMap::Identity => module.to_string(),
            NameMap::Strip(p) => module
                .strip_prefix(p.as_str())
                .and_then(|m| m.strip_prefix('.'))
                .unwrap_or(module)
                .to_string(),
            NameMap::Add(p) => format!("{p}.{module}"),
        }
    }

    /// The adapter module name of a base module name, when it is under this mapping.
    pub fn module_name(&self, base_module: &str) -> Option<String> {
        match self {
            NameMap::Identity => Some(base_module.to_string()),
            NameMap::Strip(p) => Some(format!("{p}.{base_module}")),
            NameMap::Add(p) => base_module
                .strip_prefix(p.as_str())
                .and_then(|m| m.strip_prefix('.'))
                .map(str::to_string),
        }
    }

    /// Every candidate mapping (see the type) for modules whose first name is `first`.
    fn candidates(base: &BaseModel, first: &str, all_share: Option<&str>) -> Vec<NameMap> {
        let mut c = vec![NameMap::Identity];
        if let Some(p) = all_share {
            c.push(NameMap::Strip(p.to_string()));
        }
        let suffix = format!(".{first}.weight");
        c.extend(
            base.tensors
                .keys()
                .filter_map(|k| k.strip_suffix(suffix.as_str()))
                .map(|p| NameMap::Add(p.to_string())),
        );
        c
    }

    /// Chooses the mapping for `modules` (module names whose `.weight` must exist) and
    /// `tensors` (full tensor names that must exist, the `modules_to_save` copies) against
    /// `base`, or checks `chosen` when the user gave one (see the type's documentation).
    ///
    /// # Errors
    /// Two or more mappings fit (both named); none fits (the modules that match no base
    /// tensor under any candidate are listed, or, when each matches under some mapping but
    /// no one mapping fits all, the first two that disagree); a `chosen` mapping under which
    /// a module is missing.
    pub fn resolve_with<'a>(
        base: &BaseModel,
        modules: impl IntoIterator<Item = &'a str> + Clone,
        tensors: impl IntoIterator<Item = &'a str> + Clone,
        chosen: Option<&NameMap>,
    ) -> Result<Self> {
        let missing_under = |m: &NameMap| -> Option<String> {
            modules
                .clone()
                .into_iter()
                .map(|n| format!("{}.weight", m.base_name(n)))
                .chain(tensors.clone().into_iter().map(|t| m.base_name(t)))
                .find(|k| !base.tensors.contains_key(k))
        };
        if let Some(c) = chosen {
            if let Some(k) = missing_under(c) {
                bail!("with the module names mapped by {c}, the base model has no tensor {k}");
            }
            return Ok(c.clone());
        }
        let names: Vec<&str> = modules.clone().into_iter().collect();
        let full: Vec<&str> = tensors.clone().into_iter().collect();
        // The first name decides the prefixes to try: a module's `.weight`, else a saved tensor
        // (whose own name already ends in `.weight` / `.bias`).
        let (first, first_is_module) = match (names.first(), full.first()) {
            (Some(m), _) => (*m, true),
            (None, Some(t)) => (*t, false),
            (None, None) => bail!("the adapter has no modules"),
        };
        let lead = |n: &str| n.split_once('.').map(|(p, _)| p.to_string());
        let share = lead(first).filter(|p| {
            names
                .iter()
                .chain(full.iter())
                .all(|n| n.starts_with(&format!("{p}.")))
        });
        let probe = if first_is_module {
            first.to_string()
        } else {
            first.rsplit_once('.').map_or(first, |(m, _)| m).to_string()
        };
        let fits: Vec<NameMap> = Self::candidates(base, &probe, share.as_deref())
            .into_iter()
            .filter(|m| missing_under(m).is_none())
            .collect();
        match fits.len() {
            1 => return Ok(fits.into_iter().next().expect("one")),
            0 => {}
            _ => {
                let listed: Vec<String> = fits
                    .iter()
                    .map(|m| format!("{m}: {}", m.base_name(&probe)))
                    .collect();
                bail!(
                    "the adapter's module names fit the base model in {} ways ({}); PEFT applies an adapter to the one model it is loaded onto, so choose with --base-prefix or --strip-prefix",
                    fits.len(),
                    listed.join("; ")
                );
            }
        }
        // Nothing fits: name the modules (and saved tensors) that exist under no candidate.
        let exists_somewhere = |probe: &str, key: &dyn Fn(&NameMap) -> String| {
            let own = lead(probe).filter(|p| probe.starts_with(&format!("{p}.")));
            Self::candidates(base, probe, own.as_deref())
                .iter()
                .any(|m| base.tensors.contains_key(&key(m)))
        };
        let unmatched: Vec<String> = names
            .iter()
            .filter(|n| !exists_somewhere(n, &|m: &NameMap| format!("{}.weight", m.base_name(n))))
            .map(|n| format!("{n}.weight"))
            .chain(
                full.iter()
                    .filter(|t| {
                        let module = t.rsplit_once('.').map_or(**t, |(m, _)| m);
                        !exists_somewhere(module, &|m: &NameMap| m.base_name(t))
                    })
                    .map(|t| t.to_string()),
            )
            .collect();
        if !unmatched.is_empty() {
            let total = names.len() + full.len();
            let shown: Vec<&str> = unmatched.iter().take(4).map(String::as_str).collect();
            let more = if unmatched.len() > shown.len() {
                format!(" and {} more", unmatched.len() - shown.len())
            } else {
                String::new()
            };
            bail!(
                "{}: absent from the base model, under the adapter's name and under any prefix added or removed{}; {} of {total} adapter tensors match no base tensor",
                shown[0],
                if shown.len() > 1 { format!(" (also {}{more})", shown[1..].join(", ")) } else { more },
                unmatched.len(),
            );
        }
        let missing = missing_under(&NameMap::Identity).unwrap_or_default();
        bail!(
            "no single prefix maps every adapter module onto the base model (each exists under some prefix, but not all under one; e.g. {missing} is absent as named); choose with --base-prefix or --strip-prefix"
        )
    }

    /// [`NameMap::resolve_with`] for modules alone, with no explicit choice.
    ///
    /// # Errors
    /// As [`NameMap::resolve_with`].
    pub fn resolve<'a>(
        base: &BaseModel,
        modules: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<Self> {
        Self::resolve_with(base, modules, std::iter::empty(), None)
    }
}

/// What the base model's `config.json` (transformers' `PretrainedConfig`) says about the
/// layout of its weights and its tied embeddings; every field `None` without one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BaseConfig {
    /// `model_type`, when the file names one and no `auto_map` (custom modelling code, whose
    /// layer classes transformers does not define) is present.
    pub model_type: Option<String>,
    /// `tie_word_embeddings` as the file states it; `None` when it omits it (transformers
    /// writes only values that differ from the config class's own default, which differs
    /// between model types).
    pub tie_word_embeddings: Option<bool>,
    /// True when the base has a `config.json`.
    pub present: bool,
}

/// Model types whose transformers modelling code (5.x, `models/*/modeling_*.py`) builds some
/// projections as `Conv1D` (weight stored `[in, out]`), with the module names that are
/// `Conv1D`; every other module of these models is an `nn.Linear`.
const CONV1D_MODELS: &[(&str, &[&str])] = &[
    ("gpt2", &["c_attn", "q_attn", "c_proj", "c_fc"]),
    ("openai-gpt", &["c_attn", "c_proj", "c_fc"]),
    ("imagegpt", &["c_attn", "q_attn", "c_proj", "c_fc"]),
    (
        "decision_transformer",
        &["c_attn", "q_attn", "c_proj", "c_fc"],
    ),
];

/// Model types whose modelling code mixes `Conv1D` and `nn.Linear` under names that do not
/// tell them apart: no layout is read from their config.
const CONV1D_MIXED_MODELS: &[&str] = &["clvp", "convbert", "omniasr"];

impl BaseConfig {
    /// Reads `config.json` beside the model; absent or unreadable gives no evidence.
    ///
    /// # Errors
    /// A `config.json` that is not a JSON object.
    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("config.json");
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(Self::default());
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
        let o = v
            .as_object()
            .with_context(|| format!("{}: not a JSON object", p.display()))?;
        let model_type = if o.contains_key("auto_map") {
            None
        } else {
            o.get("model_type")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        let tie = match o.get("tie_word_embeddings") {
            Some(serde_json::Value::Bool(b)) => Some(*b),
            _ => None,
        };
        Ok(Self {
            model_type,
            tie_word_embeddings: tie,
            present: true,
        })
    }

    /// Whether the base module `module` (its name in the base file) is transformers'
    /// `Conv1D`, from the model type; `None` when the config cannot tell.
    pub fn is_conv1d(&self, module: &str) -> Option<bool> {
        let t = self.model_type.as_deref()?;
        if CONV1D_MIXED_MODELS.contains(&t) {
            return None;
        }
        let last = module.rsplit('.').next().unwrap_or(module);
        match CONV1D_MODELS.iter().find(|(m, _)| *m == t) {
            Some((_, names)) => Some(names.contains(&last)),
            None => Some(false),
        }
    }
}
