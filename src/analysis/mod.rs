//! Adapter analysis: why DoRA differs from LoRA, and dynamic rank by SVD.
//!
//! - [`delta`] and [`plot`]: `dorafuse analyze`, the DoRA paper's Figure 2 (Liu et al.,
//!   ICML 2024, §3.2) over training checkpoints: per module the magnitude change ΔM and
//!   direction change ΔD against the base, their correlation and regression slope per
//!   checkpoint, as a table, JSON and an SVG scatter plot.
//! - [`resize`]: `dorafuse resize`, each module's update `s·B·A` truncated by SVD to a rank
//!   or an energy fraction, from the factors alone ([`lowrank::update_svd`]).
//! - [`export`]: `dorafuse export-lora`, a DoRA adapter turned into a plain LoRA adapter: the
//!   best low-rank approximation of each module's full update
//!   `ΔW = diag(g − 1)·W0 + diag(g)·s·B·A`, found by a randomized SVD over the base weight
//!   streamed block by block ([`stream`]).
//!
//! Both writers produce PEFT's adapter format with the module ranks in `r` and
//! `rank_pattern`; each module keeps its `lora_alpha` (`alpha_pattern` aware), so its new
//! scaling is `alpha / k` (`alpha / √k` with rsLoRA) and the factors absorb the rest.

pub mod delta;
pub mod export;
pub mod lowrank;
#[cfg(feature = "bench")]
pub mod plot;
pub mod resize;
pub mod stream;

use crate::adapter::{Adapter, AdapterConfig, AdapterModule, ModuleKind};
use crate::dtype::DType;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use faer::Mat;
use std::collections::BTreeMap;
use std::path::Path;

/// Seed of the random layer inputs the reports measure output changes on.
pub const INPUT_SEED: u64 = 0x5EED_0001;
/// Seed of the randomized SVD's Gaussian test matrix.
pub const SKETCH_SEED: u64 = 0x5EED_0002;
/// Tokens of random input (rows of x, standard normal) per module in the reports.
pub const INPUT_TOKENS: usize = 64;

/// A module's factors in f64: `(B [d_out, r] as a matrix, A [r, d_in] as a matrix)`.
pub fn factors(m: &AdapterModule) -> (Mat<f64>, Mat<f64>) {
    let (d_in, d_out, r) = m.dims();
    (
        lowrank::mat_from_rows(&m.lora_b.to_f64(), d_out, r),
        lowrank::mat_from_rows(&m.lora_a.to_f64(), r, d_in),
    )
}

/// `diag(row)·P`.
pub fn scale_rows(p: &Mat<f64>, row: &[f64]) -> Mat<f64> {
    Mat::from_fn(p.nrows(), p.ncols(), |i, j| row[i] * p.read(i, j))
}

/// New factors for one module, rounded to the adapter's storage dtype.
#[derive(Debug, Clone)]
pub struct NewFactors {
    /// A' `[k, d_in]`.
    pub lora_a: Tensor,
    /// B' `[d_out, k]`.
    pub lora_b: Tensor,
    /// The new rank k.
    pub rank: usize,
    /// The new scaling s' (the module's alpha over k, or over √k with rsLoRA).
    pub scaling: f64,
}

impl NewFactors {
    /// Rounds `b [d_out, k]` and `a [k, d_in]` (row-major f64) to `dtype`.
    ///
    /// # Errors
    /// A non-finite factor (a degenerate SVD), naming the module.
    pub fn new(
        module: &str,
        b: &[f64],
        a: &[f64],
        dims: (usize, usize, usize),
        scaling: f64,
        dtype: DType,
    ) -> Result<Self> {
        let (d_in, d_out, k) = dims;
        let lora_a = Tensor::from_f64(dtype, vec![k, d_in], a)?;
        let lora_b = Tensor::from_f64(dtype, vec![d_out, k], b)?;
        lora_a.check_finite(&format!("{module}.lora_A (new)"))?;
        lora_b.check_finite(&format!("{module}.lora_B (new)"))?;
        Ok(Self {
            lora_a,
            lora_b,
            rank: k,
            scaling,
        })
    }

    /// `(s'·B' as a matrix, A' as a matrix)` from the rounded values (what is written).
    pub fn scaled_f64(&self) -> (Mat<f64>, Mat<f64>) {
        let k = self.rank;
        let d_out = self.lora_b.shape()[0];
        let d_in = self.lora_a.shape()[1];
        let b = lowrank::mat_from_rows(&self.lora_b.to_f64(), d_out, k) * faer::scale(self.scaling);
        (b, lowrank::mat_from_rows(&self.lora_a.to_f64(), k, d_in))
    }
}

/// The most frequent rank (the larger on a tie): the config's `r`, so `rank_pattern` lists
/// only the exceptions.
fn default_rank(ranks: &BTreeMap<String, usize>) -> usize {
    let mut count: BTreeMap<usize, usize> = BTreeMap::new();
    for r in ranks.values() {
        *count.entry(*r).or_default() += 1;
    }
    count
        .iter()
        .max_by_key(|(r, c)| (**c, **r))
        .map(|(r, _)| *r)
        .unwrap_or(1)
}

/// The source config with new module ranks: `r` the most frequent rank, `rank_pattern` one
/// exact key per other module (its name with the regex metacharacters escaped, matched by
/// PEFT's `get_pattern_key` as `(.*\.)?(key)$`), `use_dora` as given. `lora_alpha`,
/// `alpha_pattern` and every other field are kept.
///
/// # Errors
/// The resulting config does not give some module its rank or its alpha (named).
pub fn config_with_ranks(
    src: &Adapter,
    ranks: &BTreeMap<String, usize>,
    use_dora: bool,
) -> Result<AdapterConfig> {
    let r = default_rank(ranks);
    let mut raw = src.config.raw.clone();
    raw.insert("r".into(), r.into());
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, k)| **k != r)
        .map(|(name, k)| (regex::escape(name), (*k).into()))
        .collect();
    raw.insert("rank_pattern".into(), serde_json::Value::Object(pattern));
    raw.insert("use_dora".into(), use_dora.into());
    let text = serde_json::to_string(&serde_json::Value::Object(raw))?;
    let cfg = AdapterConfig::from_json(&text).context("the rewritten adapter_config.json")?;
    let matcher = cfg.matcher()?;
    for (name, k) in ranks {
        ensure!(
            matcher.rank(name) == *k,
            "{name}: the rewritten config gives rank {} instead of {k}",
            matcher.rank(name)
        );
        let alpha = src.modules[name].alpha;
        ensure!(
            matcher.alpha(name) == alpha,
            "{name}: the rewritten config gives alpha {} instead of {alpha}",
            matcher.alpha(name)
        );
    }
    Ok(cfg)
}

/// Refuses an adapter whose `init_lora_weights` rewrote the base (PiSSA, OLoRA): its loader
/// re-derives a residual base from the rank and the factors, so new factors would need a new
/// residual, which `resize` and `export-lora` do not derive.
///
/// # Errors
/// That initialisation, or one [`AdapterConfig::init`] refuses.
pub fn check_keeps_base(adapter: &Adapter) -> Result<()> {
    let init = adapter.config.init()?;
    ensure!(
        init == crate::adapter::Init::KeepsBase,
        "init_lora_weights {init:?} rewrote the base: the adapter's factors are bound to that \
         residual base, so resize and export-lora refuse it"
    );
    Ok(())
}

/// The adapter `src` with each module's factors replaced (magnitudes kept when `use_dora`;
/// the `modules_to_save` tensors kept as they are).
///
/// # Errors
/// As [`config_with_ranks`]; a module that is not a linear layer (`nn.Linear` or `Conv1D`):
/// the factors of Embedding and convolution adapters are stored in other shapes, which these
/// tools do not write; a module with a `lora_B.bias` (its term is scaled by s, which a new
/// rank changes); an adapter whose `init_lora_weights` rewrote the base (PiSSA, OLoRA).
pub fn rebuild(
    src: &Adapter,
    new: &BTreeMap<String, NewFactors>,
    use_dora: bool,
) -> Result<Adapter> {
    check_keeps_base(src)?;
    let ranks: BTreeMap<String, usize> = new.iter().map(|(n, f)| (n.clone(), f.rank)).collect();
    let config = config_with_ranks(src, &ranks, use_dora)?;
    let mut modules = BTreeMap::new();
    for (name, f) in new {
        let old = &src.modules[name];
        ensure!(
            old.kind == ModuleKind::Linear,
            "{name}: a {:?} adapter module; resize and export-lora handle linear layers only",
            old.kind
        );
        ensure!(
            old.lora_bias.is_none(),
            "{name}: has a lora_B.bias, whose term s·b a new rank would rescale; resize and \
             export-lora do not rewrite it"
        );
        modules.insert(
            name.clone(),
            AdapterModule {
                name: name.clone(),
                lora_a: f.lora_a.clone(),
                lora_b: f.lora_b.clone(),
                magnitude: if use_dora {
                    old.magnitude.clone()
                } else {
                    None
                },
                rank: f.rank,
                alpha: old.alpha,
                scaling: f.scaling,
                kind: ModuleKind::Linear,
                lora_bias: None,
            },
        );
    }
    Ok(Adapter {
        config,
        modules,
        metadata: src.metadata.clone(),
        saved: src.saved.clone(),
    })
}

/// Writes `adapter` to `out` (which must not exist) through a hidden temporary directory
/// beside it, loads it back and checks every module's rank and scaling, then renames it into
/// place: a failure leaves nothing at `out`.
///
/// # Errors
/// `out` exists, its parent is missing or unwritable, or the written adapter does not load
/// back as intended (named).
pub fn save_new_adapter(adapter: &Adapter, out: &Path) -> Result<()> {
    ensure!(
        !out.exists(),
        "output {} already exists; choose a new directory",
        out.display()
    );
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    ensure!(
        parent.is_dir(),
        "output {}: parent directory {} does not exist",
        out.display(),
        parent.display()
    );
    let name = out
        .file_name()
        .with_context(|| format!("output {} has no directory name", out.display()))?;
    // Removed by the signal handler from before it exists, and once registered below.
    let prefix = format!(".{}.dorafuse-tmp-", name.to_string_lossy());
    let _creating = crate::fsutil::PendingPrefix::register(&parent, &prefix);
    let tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempdir_in(&parent)
        .with_context(|| format!("cannot create a directory in {}", parent.display()))?;
    // Removed if the command is interrupted before the rename (SIGINT, SIGTERM, SIGHUP).
    let pending = crate::fsutil::PendingOutput::register(tmp.path());
    adapter.save(tmp.path())?;
    let back = Adapter::load(tmp.path()).context("reading back the written adapter")?;
    for (name, m) in &adapter.modules {
        let Some(b) = back.modules.get(name) else {
            bail!("{name}: missing from the written adapter");
        };
        ensure!(
            b.rank == m.rank
                && b.scaling == m.scaling
                && b.magnitude.is_some() == m.magnitude.is_some(),
            "{name}: the written adapter loads with rank {} and scaling {} instead of {} and {}",
            b.rank,
            b.scaling,
            m.rank,
            m.scaling
        );
    }
    let kept = tmp.keep();
    if let Err(e) = pending.commit(|| std::fs::rename(&kept, out)) {
        let _ = std::fs::remove_dir_all(&kept);
        return Err(e)
            .with_context(|| format!("cannot rename the finished adapter to {}", out.display()));
    }
    Ok(())
}

/// Relative L2 change `‖new − old‖ / ‖old‖` of two f64 matrices of the same shape (0 when both
/// are zero).
pub fn rel_change(new: &Mat<f64>, old: &Mat<f64>) -> f64 {
    rel_norm((new - old).norm_l2(), old.norm_l2())
}

/// `d / o`, with 0/0 = 0 and d/0 = ∞.
pub fn rel_norm(d: f64, o: f64) -> f64 {
    if o == 0.0 {
        if d == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        d / o
    }
}

/// `g = m / max(n, ε)` for row norms squared `n2` (PEFT's DoRA scale, docs/design.md §1).
pub fn magnitude_scale(m: &[f64], n2: &[f64]) -> Vec<f64> {
    m.iter()
        .zip(n2)
        .map(|(m, n2)| m / n2.sqrt().max(crate::layer::NORM_EPS))
        .collect()
}

/// The base bias of a module as f64, when the base has one.
///
/// # Errors
/// An unreadable bias tensor.
pub fn base_bias(
    model: &crate::adapter::AdaptedModel<'_>,
    module: &str,
) -> Result<Option<Vec<f64>>> {
    let name = model.bias_name(module);
    if !model.base.tensors.contains_key(&name) {
        return Ok(None);
    }
    Ok(Some(
        model
            .base
            .tensor(&name)
            .with_context(|| module.to_string())?
            .to_f64(),
    ))
}
