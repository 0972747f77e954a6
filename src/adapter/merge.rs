//! Merging an adapter into a base model's safetensors files, tensor by tensor, and undoing
//! it.
//!
//! The output mirrors the input: the same shard files under the same names, each with the
//! input's header copied byte for byte (merged weights keep their dtype and shape, so every
//! offset is unchanged), every tensor the adapter does not touch copied byte for byte, and
//! the index and the model's other files (config.json, tokenizer, ...) copied. Reading,
//! computing and writing overlap: a writer thread writes one tensor while the next is
//! computed (on all cores, on the CPU path), so at most one input weight and three output
//! tensors' bytes are held in memory, whatever the model's size; the output buffers are
//! reused from tensor to tensor. Everything is written into a hidden temporary directory
//! beside the output and renamed into place at the end, so a failed merge leaves nothing.
//!
//! `dora_unmerge.safetensors` beside the shards keeps what undoing the merge needs: for each
//! module the g that was used, A, B, s and the base tensor name. W0 = W'/g − s·B·A.

use super::apply::{AdaptedModel, ApplyOptions};
use super::base::{BaseModel, TensorEntry};
use super::compute::{self, transpose, MergeDevice};
use super::config::Init;
use super::model::{Adapter, ModuleKind};
use crate::cpu::rows::{Elems, RowLayer};
use crate::dtype::DType;
use crate::layer::Layer;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The file that keeps what `unmerge` needs.
pub const UNMERGE_FILE: &str = "dora_unmerge.safetensors";
const UNMERGE_FORMAT: &str = "dorafuse-unmerge-1";

/// Round f32 values to `dtype` and return the little-endian bytes.
fn to_bytes(dtype: DType, shape: &[usize], v: &[f32]) -> Result<Vec<u8>> {
    Ok(Tensor::from_f32(dtype, shape.to_vec(), v)?
        .as_bytes()
        .to_vec())
}

/// How to merge.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Where W' is computed.
    pub device: MergeDevice,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Choices the files cannot settle (name mapping, per-module layout).
    pub apply: ApplyOptions,
}

/// What a merge wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// The output directory.
    pub out: PathBuf,
    /// Weights replaced (merged or unmerged).
    pub modules: usize,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// Shard files written.
    pub shards: usize,
    /// Tensor bytes written.
    pub bytes: u64,
}

/// What changes between the input and the output of [`write_model`].
trait Rewrite {
    /// Writes the new bytes of a tensor into `out` (resized; its allocation is reused) and
    /// returns true, or returns false to copy the tensor unchanged.
    fn replace(&mut self, name: &str, entry: &TensorEntry, out: &mut Vec<u8>) -> Result<bool>;
    /// Files to add beside the shards, computed once every tensor was seen.
    fn extra_files(&mut self) -> Result<Vec<(String, Vec<u8>)>>;
}

/// Writes `base` to `out` with some tensors' bytes replaced (see the module docs). Files of
/// the base directory named in `skip_files` are not copied.
fn write_model(
    base: &BaseModel,
    out: &Path,
    progress: bool,
    skip_files: &[&str],
    rw: &mut dyn Rewrite,
) -> Result<MergeReport> {
    ensure!(
        !out.exists(),
        "output {} already exists; remove it or choose another --out",
        out.display()
    );
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    ensure!(
        parent.is_dir(),
        "output {}: the parent directory {} does not exist",
        out.display(),
        parent.display()
    );
    let out_name = out
        .file_name()
        .with_context(|| format!("output {}: not a directory name", out.display()))?
        .to_string_lossy()
        .into_owned();
    // Hidden, beside the output (same file system, so the final rename is atomic); removed
    // by TempDir's Drop on any error, and by the signal handler from before it exists.
    let prefix = format!(".{out_name}.dorafuse-tmp-");
    let _creating = crate::fsutil::PendingPrefix::register(&parent, &prefix);
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in(&parent)
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                parent.display()
            )
        })?;

    // Removed by the signal handler if the run is interrupted (crate::fsutil).
    let pending = crate::fsutil::PendingOutput::register(tmp.path());
    // Progress bars come with the `cli` feature (indicatif); a library build shows none.
    #[cfg(feature = "cli")]
    let bar = if progress {
        let b = indicatif::ProgressBar::new(base.data_bytes());
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:40!} [{bar:40}] {bytes}/{total_bytes} ({eta})",
            )
            .expect("constant template")
            .progress_chars("=> "),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    #[cfg(not(feature = "cli"))]
    let bar = {
        let _ = progress;
        NoProgress
    };
    let mut report = MergeReport {
        out: out.to_path_buf(),
        modules: 0,
        copied: 0,
        shards: base.shards.len(),
        bytes: 0,
    };
    let mut written: Vec<String> = Vec::new();
    // Buffers for new tensor bytes, handed back by the writer once written: at most three
    // exist (one being computed, one queued, one being written), whatever the model's size.
    let mut spare: Vec<Vec<u8>> = Vec::new();
    for shard in &base.shards {
        let fname = shard
            .path
            .file_name()
            .context("shard without a file name")?
            .to_string_lossy()
            .into_owned();
        let dest = tmp.path().join(&fname);
        let file = std::fs::File::create(&dest)
            .with_context(|| format!("cannot create {}", dest.display()))?;
        write_shard(
            shard,
            base,
            (file, &dest),
            rw,
            &bar,
            &mut report,
            &mut spare,
        )?;
        written.push(fname);
    }
    bar.finish_and_clear();
    if base.from_dir {
        let mut skip: Vec<&str> = written.iter().map(String::as_str).collect();
        skip.extend_from_slice(skip_files);
        copy_tree(&base.dir, tmp.path(), &skip)?;
    }
    for (name, bytes) in rw.extra_files()? {
        let p = tmp.path().join(&name);
        std::fs::write(&p, bytes).with_context(|| format!("cannot write {}", p.display()))?;
    }
    let kept = tmp.keep();
    let renamed = pending.commit(|| std::fs::rename(&kept, out));
    if let Err(e) = renamed {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(e)
            .with_context(|| format!("cannot rename the finished output to {}", out.display()));
    }
    Ok(report)
}

/// What the writer thread writes next.
enum Piece<'m> {
    /// Bytes of the input mapping, copied as they are.
    Mapped(&'m [u8]),
    /// New bytes, handed back to the computing thread once written.
    New(Vec<u8>),
}

/// Writes one shard: its header as is, then every tensor, new bytes from `rw` or the
/// mapped bytes. A writer thread writes while the calling thread computes the next tensor
/// (the queue holds one tensor), so reading, computing and writing overlap. The file is
/// flushed to disk before this returns. I/O errors name `dest`; errors of `rw` come as they
/// are (they name the module).
fn write_shard(
    shard: &super::base::Shard,
    base: &BaseModel,
    (file, dest): (std::fs::File, &Path),
    rw: &mut dyn Rewrite,
    bar: &Progress,
    report: &mut MergeReport,
    spare: &mut Vec<Vec<u8>>,
) -> Result<()> {
    let (to_writer, queue) = std::sync::mpsc::sync_channel::<Piece<'_>>(1);
    let (give_back, returned) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::scope(|sc| -> Result<()> {
        let writer = sc.spawn(move || -> Result<std::fs::File> {
            let mut w = crate::fsutil::StreamWriter::new(file);
            // The header is copied as is: same names, dtypes, shapes and offsets.
            w.write_all(&shard.map[..shard.header_len])?;
            for piece in queue {
                match piece {
                    Piece::Mapped(b) => w.write_all(b)?,
                    Piece::New(buf) => {
                        w.write_all(&buf)?;
                        // The computing side may have finished already; then the buffer
                        // is simply dropped.
                        let _ = give_back.send(buf);
                    }
                }
            }
            Ok(w.into_inner()?)
        });
        let mut produce = || -> Result<()> {
            for name in &shard.names {
                let e = &base.tensors[name];
                bar.set_message(name.clone());
                spare.extend(returned.try_iter());
                let mut buf = spare.pop().unwrap_or_default();
                let piece = if rw.replace(name, e, &mut buf)? {
                    ensure!(
                        buf.len() == e.range.len(),
                        "{name}: new data is {} bytes, the slot is {}",
                        buf.len(),
                        e.range.len()
                    );
                    report.modules += 1;
                    Piece::New(buf)
                } else {
                    spare.push(buf);
                    report.copied += 1;
                    base.prefetch(name);
                    Piece::Mapped(&shard.map[e.range.clone()])
                };
                if to_writer.send(piece).is_err() {
                    // The writer stopped on an error; joining it below reports that error.
                    break;
                }
                report.bytes += e.range.len() as u64;
                bar.inc(e.range.len() as u64);
            }
            Ok(())
        };
        let produced = produce();
        drop(to_writer);
        let written = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        produced?;
        let file = written.with_context(|| format!("writing {}", dest.display()))?;
        file.sync_all()
            .with_context(|| format!("flushing {}", dest.display()))?;
        Ok(())
    })?;
    spare.extend(returned.try_iter());
    Ok(())
}

/// Copies every file and directory under `from` into `to`, except top-level names in `skip`.
fn copy_tree(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?
    {
        let entry = entry?;
        let name = entry.file_name();
        let name_s = name.to_string_lossy();
        if skip.contains(&name_s.as_ref()) {
            continue;
        }
        let src = entry.path();
        let dst = to.join(&name);
        if src.is_dir() {
            std::fs::create_dir(&dst)
                .with_context(|| format!("cannot create {}", dst.display()))?;
            copy_tree(&src, &dst, &[])?;
        } else if src.is_file() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

/// What the merge does to one base tensor.
enum Action {
    /// The weight of this adapter module becomes W'.
    Weight(String),
    /// The bias of this module gains s·lora_B.bias (`lora_bias`, plain LoRA).
    LoraBias(String),
    /// This `modules_to_save` tensor replaces the base tensor.
    Saved(String),
}

/// The merge: adapted weights replaced by W', the unmerge data collected on the way.
struct Merger<'m, 'a> {
    model: &'m AdaptedModel<'a>,
    by_name: HashMap<String, Action>,
    device: MergeDevice,
    unmerge: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
}

impl Merger<'_, '_> {
    /// W' of `module` (whose weight is the base tensor `name`) into `out`, as stored.
    fn weight(&mut self, module: &str, name: &str, out: &mut Vec<u8>) -> Result<()> {
        if self.device == MergeDevice::Cpu && self.weight_in_place(module, name, out)? {
            return Ok(());
        }
        let (layer, residual) = self.model.layer_and_residual(module)?;
        let layer = {
            let mut l = layer;
            l.lora_a = l.lora_a.cast(DType::F32);
            l.lora_b = l.lora_b.cast(DType::F32);
            l.magnitude = l.magnitude.map(|m| m.cast(DType::F32));
            l
        };
        layer.check_finite().with_context(|| module.to_string())?;
        let (d_in, d_out, _) = layer.dims()?;
        let g = compute::merged_weight_bytes(&layer, self.device, out)
            .with_context(|| format!("{module}: computing the merged weight"))?;
        self.unmerge
            .push((format!("{module}.lora_A"), layer.lora_a.clone()));
        self.unmerge
            .push((format!("{module}.lora_B"), layer.lora_b.clone()));
        if let Some(g) = g {
            self.unmerge.push((
                format!("{module}.g"),
                Tensor::from_f32(DType::F32, vec![d_out], &g)?,
            ));
        }
        if let Some(res) = residual {
            let p: Vec<f32> = res.p.iter().map(|&x| x as f32).collect();
            let q: Vec<f32> = res.q.iter().map(|&x| x as f32).collect();
            self.unmerge.push((
                format!("{module}.residual_P"),
                Tensor::from_f32(DType::F32, vec![d_out, res.r], &p)?,
            ));
            self.unmerge.push((
                format!("{module}.residual_Q"),
                Tensor::from_f32(DType::F32, vec![res.r, d_in], &q)?,
            ));
        }
        // {:?} of an f64 is the shortest string that reads back to the same value.
        self.meta
            .insert(format!("scaling.{module}"), format!("{:?}", layer.scaling));
        self.meta
            .insert(format!("weight.{module}"), name.to_string());
        self.meta.insert(
            format!("fan_in_fan_out.{module}"),
            layer.fan_in_fan_out.to_string(),
        );
        Ok(())
    }

    /// W' of a linear `[d_out, d_in]` module on a kept base, computed on the CPU from the
    /// memory-mapped base weight where it lies (no copy of W0; one pass on all cores).
    /// Returns false, having done nothing, for every other module.
    fn weight_in_place(&mut self, module: &str, name: &str, out: &mut Vec<u8>) -> Result<bool> {
        let m = &self.model.adapter.modules[module];
        if !matches!(m.kind, ModuleKind::Linear)
            || self.model.init != Init::KeepsBase
            || self.model.module_fan_in_fan_out(module)?
        {
            return Ok(false);
        }
        let base = self.model.base;
        let e = base.entry(name)?;
        let dtype = DType::from_safetensors(e.dtype).with_context(|| {
            format!("base tensor {name}: quantized or integer base weights are not supported")
        })?;
        let (a, b) = (m.lora_a.cast(DType::F32), m.lora_b.cast(DType::F32));
        let mag = m.magnitude.as_ref().map(|t| t.cast(DType::F32));
        a.check_finite("lora_A")
            .with_context(|| module.to_string())?;
        b.check_finite("lora_B")
            .with_context(|| module.to_string())?;
        if let Some(t) = &mag {
            t.check_finite("magnitude")
                .with_context(|| module.to_string())?;
        }
        base.prefetch(name);
        let bytes = base.bytes(name)?;
        let d_out = e.shape.first().copied().unwrap_or(0);
        let layer = RowLayer::from_parts(
            Elems::from_bytes(dtype, bytes)?,
            d_out,
            &a,
            &b,
            mag.as_ref(),
            m.scaling,
        )
        .with_context(|| format!("{module}: base weight {name} {:?}", e.shape))?;
        out.resize(bytes.len(), 0);
        let g = match layer.merged_weight_into(out) {
            Ok(g) => g,
            Err(err) => {
                // A non-finite W0 element is named as such, not as the W' it spoils.
                base.tensor(name)?
                    .check_finite("weight")
                    .with_context(|| module.to_string())?;
                return Err(err).with_context(|| format!("{module}: computing the merged weight"));
            }
        };
        self.unmerge.push((format!("{module}.lora_A"), a));
        self.unmerge.push((format!("{module}.lora_B"), b));
        if let Some(g) = g {
            self.unmerge.push((
                format!("{module}.g"),
                Tensor::from_f32(DType::F32, vec![d_out], &g)?,
            ));
        }
        self.meta
            .insert(format!("scaling.{module}"), format!("{:?}", m.scaling));
        self.meta
            .insert(format!("weight.{module}"), name.to_string());
        self.meta
            .insert(format!("fan_in_fan_out.{module}"), false.to_string());
        Ok(true)
    }

    fn lora_bias(&mut self, module: &str, name: &str) -> Result<Vec<u8>> {
        let m = &self.model.adapter.modules[module];
        let lb = m
            .lora_bias
            .as_ref()
            .with_context(|| format!("{module}: no lora_B.bias"))?;
        let b = self.model.base.tensor(name)?;
        let s = m.scaling as f32;
        let v: Vec<f32> = b
            .to_f32()
            .iter()
            .zip(lb.to_f32())
            .map(|(x, y)| x + y * s)
            .collect();
        if v.iter().any(|x| !x.is_finite()) {
            bail!("{module}: the merged bias {name} has a non-finite element");
        }
        self.unmerge
            .push((format!("{module}.lora_bias"), lb.cast(DType::F32)));
        self.meta.insert(format!("bias.{module}"), name.to_string());
        to_bytes(b.dtype(), b.shape(), &v).with_context(|| module.to_string())
    }

    fn saved(&mut self, tensor: &str, name: &str) -> Result<Vec<u8>> {
        let t = &self.model.adapter.saved[tensor];
        let orig = self.model.base.tensor(name)?;
        // PEFT loads the saved copy with load_state_dict, which casts to the module's dtype.
        let new = if t.dtype() == orig.dtype() {
            t.clone()
        } else {
            t.cast(orig.dtype())
        };
        self.unmerge.push((format!("saved.{tensor}"), orig));
        self.meta
            .insert(format!("saved.{tensor}"), name.to_string());
        Ok(new.as_bytes().to_vec())
    }
}

impl Rewrite for Merger<'_, '_> {
    fn replace(&mut self, name: &str, _e: &TensorEntry, out: &mut Vec<u8>) -> Result<bool> {
        let bytes = match self.by_name.get(name) {
            None => return Ok(false),
            Some(Action::Weight(m)) => {
                let m = m.clone();
                self.weight(&m, name, out)?;
                return Ok(true);
            }
            Some(Action::LoraBias(m)) => {
                let m = m.clone();
                self.lora_bias(&m, name)?
            }
            Some(Action::Saved(t)) => {
                let t = t.clone();
                self.saved(&t, name)?
            }
        };
        out.clear();
        out.extend_from_slice(&bytes);
        Ok(true)
    }

    fn extra_files(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        let views = self
            .unmerge
            .iter()
            .map(|(k, t)| {
                safetensors::tensor::TensorView::new(
                    t.dtype().to_safetensors(),
                    t.shape().to_vec(),
                    t.as_bytes(),
                )
                .map_err(|e| anyhow::anyhow!("{k}: {e}"))
                .map(|v| (k.clone(), v))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, &Some(self.meta.clone()))
            .map_err(|e| anyhow::anyhow!("serialising {UNMERGE_FILE}: {e}"))?;
        Ok(vec![(UNMERGE_FILE.to_string(), bytes)])
    }
}

/// Merges `adapter` into `base` and writes the merged model to `out` (see the module docs):
/// every adapted weight becomes W' (on the residual base for PiSSA/OLoRA adapters), a
/// `lora_bias` is added to its bias, and every `modules_to_save` tensor replaces its base
/// tensor (cast to the base dtype, as PEFT's `load_state_dict` does).
///
/// Everything is checked before anything is written: every module is matched to its base
/// weight (one name mapping, one layout per module, see [`AdaptedModel::with_options`]) and
/// its shapes and dtypes agree.
///
/// # Errors
/// A module that does not fit the base (named), a decision the files cannot settle, `out`
/// already existing, I/O errors. On any error `out` does not exist afterwards.
pub fn merge_model(
    base: &BaseModel,
    adapter: &Adapter,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let model = AdaptedModel::with_options(base, adapter, &opts.apply)?;
    let mut by_name = HashMap::new();
    for (m, am) in &adapter.modules {
        by_name.insert(model.weight_name(m), Action::Weight(m.clone()));
        if am.lora_bias.is_some() {
            by_name.insert(model.bias_name(m), Action::LoraBias(m.clone()));
        }
    }
    for t in adapter.saved.keys() {
        let bname = model.saved_name(t);
        ensure!(
            !by_name.contains_key(&bname),
            "{t}: a modules_to_save tensor and an adapted module both write {bname}"
        );
        by_name.insert(bname, Action::Saved(t.clone()));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), UNMERGE_FORMAT.to_string());
    let mut m = Merger {
        model: &model,
        by_name,
        device: opts.device,
        unmerge: Vec::new(),
        meta,
    };
    // A stale unmerge file from an earlier merge must not be carried over.
    write_model(base, out, opts.progress, &[UNMERGE_FILE], &mut m)
}

/// What undoing a merge needs for one module (read from [`UNMERGE_FILE`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UnmergeEntry {
    /// The base tensor that holds the merged weight.
    pub weight_name: String,
    /// A `[r, d_in]`.
    pub lora_a: Tensor,
    /// B `[d_out, r]`.
    pub lora_b: Tensor,
    /// The g the merge used; `None` for plain LoRA.
    pub g: Option<Vec<f32>>,
    /// s.
    pub scaling: f64,
    /// Whether the weight is stored `[d_in, d_out]`.
    pub fan_in_fan_out: bool,
    /// PiSSA/OLoRA: the part P `[d_out, r]`, Q `[r, d_in]` the initialisation took out of W0,
    /// added back so that the original base returns.
    pub residual: Option<(Tensor, Tensor)>,
    /// `lora_bias`: the bias tensor that gained s·lora_B.bias, and lora_B.bias.
    pub lora_bias: Option<(String, Tensor)>,
}

/// Everything [`UNMERGE_FILE`] holds: the merged modules, and the base tensors that
/// `modules_to_save` replaced (by base tensor name, with their original values).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnmergeData {
    /// Per adapter module.
    pub modules: BTreeMap<String, UnmergeEntry>,
    /// Base tensor name → its value before the merge.
    pub replaced: BTreeMap<String, Tensor>,
}

/// Reads `dora_unmerge.safetensors` from a merged model directory.
///
/// # Errors
/// Missing or malformed file, naming the module.
pub fn read_unmerge(dir: &Path) -> Result<BTreeMap<String, UnmergeEntry>> {
    Ok(read_unmerge_data(dir)?.modules)
}

/// Reads all of `dora_unmerge.safetensors` (see [`UnmergeData`]).
///
/// # Errors
/// Missing or malformed file, naming the module.
pub fn read_unmerge_data(dir: &Path) -> Result<UnmergeData> {
    let p = dir.join(UNMERGE_FILE);
    let bytes = std::fs::read(&p).with_context(|| {
        format!(
            "cannot read {} (was this model written by dorafuse merge?)",
            p.display()
        )
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", p.display()))?;
    let (_, md) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    let meta = md.metadata().clone().unwrap_or_default();
    ensure!(
        meta.get("format").map(String::as_str) == Some(UNMERGE_FORMAT),
        "{}: not a dorafuse unmerge file (format {:?})",
        p.display(),
        meta.get("format")
    );
    // Files written before layouts were decided per module carry one flag for all.
    let global_fifo = meta.get("fan_in_fan_out").map(String::as_str) == Some("true");
    let get = |key: &str| -> Result<Option<Tensor>> {
        match st.tensor(key) {
            Ok(view) => Ok(Some(Tensor::from_view(key, &view)?)),
            Err(_) => Ok(None),
        }
    };
    let mut out = UnmergeData::default();
    for (k, v) in &meta {
        if let Some(t) = k.strip_prefix("saved.") {
            let orig = get(&format!("saved.{t}"))?
                .with_context(|| format!("{t}: original tensor missing from {UNMERGE_FILE}"))?;
            out.replaced.insert(v.clone(), orig);
            continue;
        }
        let Some(module) = k.strip_prefix("weight.") else {
            continue;
        };
        let lora_a = get(&format!("{module}.lora_A"))?
            .with_context(|| format!("{module}: lora_A missing from {UNMERGE_FILE}"))?;
        let lora_b = get(&format!("{module}.lora_B"))?
            .with_context(|| format!("{module}: lora_B missing from {UNMERGE_FILE}"))?;
        let g = get(&format!("{module}.g"))?.map(|t| t.to_f32());
        let scaling: f64 = meta
            .get(&format!("scaling.{module}"))
            .with_context(|| format!("{module}: scaling missing from {UNMERGE_FILE}"))?
            .parse()
            .with_context(|| format!("{module}: scaling is not a number"))?;
        let fan_in_fan_out = match meta.get(&format!("fan_in_fan_out.{module}")) {
            Some(f) => f == "true",
            None => global_fifo,
        };
        let residual = match (
            get(&format!("{module}.residual_P"))?,
            get(&format!("{module}.residual_Q"))?,
        ) {
            (Some(p), Some(q)) => Some((p, q)),
            (None, None) => None,
            _ => bail!("{module}: {UNMERGE_FILE} holds half of the residual factors"),
        };
        let lora_bias = match meta.get(&format!("bias.{module}")) {
            Some(b) => Some((
                b.clone(),
                get(&format!("{module}.lora_bias"))?
                    .with_context(|| format!("{module}: lora_bias missing from {UNMERGE_FILE}"))?,
            )),
            None => None,
        };
        out.modules.insert(
            module.to_string(),
            UnmergeEntry {
                weight_name: v.clone(),
                lora_a,
                lora_b,
                g,
                scaling,
                fan_in_fan_out,
                residual,
                lora_bias,
            },
        );
    }
    ensure!(
        !out.modules.is_empty() || !out.replaced.is_empty(),
        "{}: lists no modules",
        p.display()
    );
    Ok(out)
}

/// Restores one module's base weight from a merged model: W0 = W'/g − s·B·A (+ P·Q for a
/// residual base), in the merged weight's dtype and stored layout (a convolution's weight
/// keeps its 4-D shape).
///
/// # Errors
/// The module's weight is missing from `merged` or disagrees in shape.
pub fn unmerge_module(merged: &BaseModel, entry: &UnmergeEntry) -> Result<Tensor> {
    let mut out = Vec::new();
    let (dtype, shape) = unmerged_weight_into(merged, entry, &mut out)?;
    Tensor::from_bytes(dtype, shape, &out)
}

/// [`unmerge_module`] into `out` (resized; its allocation reused from call to call): the
/// restored weight's bytes in the merged weight's dtype and stored layout. Returns that dtype
/// and stored shape.
fn unmerged_weight_into(
    merged: &BaseModel,
    entry: &UnmergeEntry,
    out: &mut Vec<u8>,
) -> Result<(DType, Vec<usize>)> {
    // W0_j = W'_j / g_j − s·B_j·A: a row merged with g_j = 0 (a zero magnitude or a zero row
    // of V) was written as zeros, and nothing in W' or the unmerge file recovers it.
    if let Some(j) = entry
        .g
        .as_deref()
        .and_then(|g| g.iter().position(|&x| x == 0.0))
    {
        bail!(
            "{}: row {j} was merged with g = 0 (a zero magnitude or a zero row of V), so its \
             base row is not recoverable from the merged weight; unmerge refuses",
            entry.weight_name
        );
    }
    if entry.residual.is_none() && !entry.fan_in_fan_out {
        // The common case: one pass on all cores over the mapped weight where it lies.
        let e = merged.entry(&entry.weight_name)?;
        let dtype = DType::from_safetensors(e.dtype)
            .with_context(|| format!("{}: not a float tensor", entry.weight_name))?;
        merged.prefetch(&entry.weight_name);
        let bytes = merged.bytes(&entry.weight_name)?;
        let d_out = e.shape.first().copied().unwrap_or(0);
        let layer = RowLayer::from_parts(
            Elems::from_bytes(dtype, bytes)?,
            d_out,
            &entry.lora_a,
            &entry.lora_b,
            None,
            entry.scaling,
        )
        .with_context(|| format!("{} {:?}", entry.weight_name, e.shape))?;
        out.resize(bytes.len(), 0);
        layer
            .unmerged_weight_into(entry.g.as_deref(), out)
            .with_context(|| entry.weight_name.clone())?;
        return Ok((dtype, e.shape.clone()));
    }
    let stored = merged.tensor(&entry.weight_name)?;
    let shape = stored.shape().to_vec();
    let w = if shape.len() > 2 {
        let rest = stored.len() / shape[0].max(1);
        Tensor::new(vec![shape[0], rest], stored.data().clone())?
    } else {
        stored
    };
    let layer = Layer {
        weight: w,
        bias: None,
        lora_a: entry.lora_a.clone(),
        lora_b: entry.lora_b.clone(),
        magnitude: None,
        scaling: entry.scaling,
        fan_in_fan_out: entry.fan_in_fan_out,
    };
    if entry.residual.is_none() {
        // The common case: one pass on all cores, no f32 copy of the weight.
        compute::unmerged_weight_bytes(&layer, entry.g.as_deref(), out)
            .with_context(|| entry.weight_name.clone())?;
        return Ok((layer.weight.dtype(), shape));
    }
    let (d_in, d_out, _) = layer.dims().with_context(|| entry.weight_name.clone())?;
    let wf = layer.weight.to_f32();
    let rows = if entry.fan_in_fan_out {
        transpose(&wf, d_in, d_out)
    } else {
        wf
    };
    let mut w0 = compute::unmerge_weight(&rows, &layer, entry.g.as_deref())
        .with_context(|| entry.weight_name.clone())?;
    if let Some((p, q)) = &entry.residual {
        let r = p.shape().get(1).copied().unwrap_or(0);
        ensure!(
            p.shape() == [d_out, r] && q.shape() == [r, d_in],
            "{}: residual factors {:?} and {:?} do not fit [{d_out}, {d_in}]",
            entry.weight_name,
            p.shape(),
            q.shape()
        );
        let (p, q) = (p.to_f64(), q.to_f64());
        for j in 0..d_out {
            for i in 0..d_in {
                let add: f64 = (0..r).map(|k| p[j * r + k] * q[k * d_in + i]).sum();
                w0[j * d_in + i] = (w0[j * d_in + i] as f64 + add) as f32;
            }
        }
    }
    let w0_stored = if entry.fan_in_fan_out {
        transpose(&w0, d_out, d_in)
    } else {
        w0
    };
    let t = Tensor::from_f32(layer.weight.dtype(), shape.clone(), &w0_stored)?;
    out.clear();
    out.extend_from_slice(t.as_bytes());
    Ok((layer.weight.dtype(), shape))
}

/// Writes the model in `merged` (a directory written by [`merge_model`]) back with every
/// merged weight restored (and every bias and `modules_to_save` tensor the merge changed),
/// to `out`; the unmerge file itself is not copied.
///
/// # Errors
/// As [`read_unmerge`] and [`unmerge_module`]; `out` existing; I/O errors. On any error
/// `out` does not exist afterwards.
pub fn unmerge_model(merged: &BaseModel, out: &Path, progress: bool) -> Result<MergeReport> {
    let data = read_unmerge_data(&merged.dir)?;
    enum Undo {
        Weight(Box<UnmergeEntry>),
        Bias(f64, Tensor),
        Restore(Tensor),
    }
    struct U<'b> {
        by_name: HashMap<String, Undo>,
        merged: &'b BaseModel,
    }
    impl Rewrite for U<'_> {
        fn replace(&mut self, name: &str, _e: &TensorEntry, out: &mut Vec<u8>) -> Result<bool> {
            let bytes = match self.by_name.get(name) {
                Some(Undo::Weight(entry)) => {
                    unmerged_weight_into(self.merged, entry, out)?;
                    return Ok(true);
                }
                Some(Undo::Bias(s, lb)) => {
                    let b = self.merged.tensor(name)?;
                    let v: Vec<f32> = b
                        .to_f32()
                        .iter()
                        .zip(lb.to_f32())
                        .map(|(x, y)| x - y * *s as f32)
                        .collect();
                    to_bytes(b.dtype(), b.shape(), &v)?
                }
                Some(Undo::Restore(t)) => t.as_bytes().to_vec(),
                None => return Ok(false),
            };
            out.clear();
            out.extend_from_slice(&bytes);
            Ok(true)
        }
        fn extra_files(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
            Ok(vec![])
        }
    }
    let mut by_name = HashMap::new();
    for (module, e) in data.modules {
        ensure!(
            merged.tensors.contains_key(&e.weight_name),
            "{module}: {} names weight {}, absent from the merged model",
            UNMERGE_FILE,
            e.weight_name
        );
        if let Some((b, lb)) = &e.lora_bias {
            ensure!(
                merged.tensors.contains_key(b),
                "{module}: {UNMERGE_FILE} names bias {b}, absent from the merged model"
            );
            by_name.insert(b.clone(), Undo::Bias(e.scaling, lb.clone()));
        }
        by_name.insert(e.weight_name.clone(), Undo::Weight(Box::new(e)));
    }
    for (name, t) in data.replaced {
        let e = merged.entry(&name).with_context(|| {
            format!("{UNMERGE_FILE} restores {name}, absent from the merged model")
        })?;
        ensure!(
            e.shape == t.shape() && e.range.len() == t.as_bytes().len(),
            "{name}: the original in {UNMERGE_FILE} does not fit the merged model's tensor"
        );
        by_name.insert(name, Undo::Restore(t));
    }
    let mut u = U { by_name, merged };
    write_model(merged, out, progress, &[UNMERGE_FILE], &mut u)
}

/// The merge's progress bar: indicatif's with the `cli` feature, else one that shows nothing.
#[cfg(feature = "cli")]
type Progress = indicatif::ProgressBar;
#[cfg(not(feature = "cli"))]
type Progress = NoProgress;

/// The progress bar of a build without the `cli` feature: shows nothing.
#[cfg(not(feature = "cli"))]
struct NoProgress;

#[cfg(not(feature = "cli"))]
impl NoProgress {
    fn set_message(&self, _: String) {}
    fn inc(&self, _: u64) {}
    fn finish_and_clear(&self) {}
}
