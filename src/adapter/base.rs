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
/// chosen for the whole adapter, never per module, in this order:
/// 1. identity: `<module>.weight`;
/// 2. strip the module's first component (`bert.encoder.x` → `encoder.x`), the same for all;
/// 3. add one prefix `P.` found in the base (`encoder.x` → `bert.encoder.x`), the same `P` for
///    all modules.
///
/// The first mapping under which every module's `.weight` exists wins; if none does, the
/// error names the first module missing under the identity mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameMap {
    /// Module names are base names.
    Identity,
    /// Each module name loses its first component, which is the same for all (`bert`).
    Strip(String),
    /// Each module name gains this prefix (without the dot).
    Add(String),
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

    /// Chooses the mapping for `modules` against `base` (see the type's documentation).
    ///
    /// # Errors
    /// No mapping finds every module; the message names the first missing module.
    pub fn resolve<'a>(
        base: &BaseModel,
        modules: impl IntoIterator<Item = &'a str> + Clone,
    ) -> Result<Self> {
        let has = |m: &NameMap| {
            modules.clone().into_iter().all(|n| {
                base.tensors
                    .contains_key(&format!("{}.weight", m.base_name(n)))
            })
        };
        if has(&NameMap::Identity) {
            return Ok(NameMap::Identity);
        }
        let first = modules
            .clone()
            .into_iter()
            .next()
            .context("the adapter has no modules")?;
        if let Some((p, _)) = first.split_once('.') {
            let all_share = modules
                .clone()
                .into_iter()
                .all(|n| n.starts_with(&format!("{p}.")));
            let cand = NameMap::Strip(p.to_string());
            if all_share && has(&cand) {
                return Ok(cand);
            }
        }
        let suffix = format!(".{first}.weight");
        let prefixes: Vec<String> = base
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(suffix.as_str()).map(str::to_string))
            .collect();
        for p in prefixes {
            let cand = NameMap::Add(p);
            if has(&cand) {
                return Ok(cand);
            }
        }
        let missing = modules
            .into_iter()
            .find(|n| !base.tensors.contains_key(&format!("{n}.weight")))
            .unwrap_or(first);
        bail!(
            "{missing}: target module absent from the base model (no tensor {missing}.weight, nor under one shared prefix added or removed)"
        )
    }
}
