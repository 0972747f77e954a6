//! An adapter applied to a base model: per-module [`Layer`]s for the CPU and CUDA paths.
//!
//! Every decision that changes numbers is taken here once, from PEFT's rules or from
//! evidence in the files, or refused with a one-line error that names the module and the
//! option that settles it:
//!
//! - **names**: one [`NameMap`] for the whole adapter; two that fit are refused.
//! - **layout** per module (`nn.Linear` `[d_out, d_in]` or transformers' `Conv1D`
//!   `[d_in, d_out]`): PEFT decides per module from its class, whatever the config's single
//!   `fan_in_fan_out` says. Here: the `--fan-in-fan-out` pattern when given; else the shape
//!   when the weight is not square; else the base's `config.json` model type
//!   ([`BaseConfig::is_conv1d`]); else refused. Embeddings and convolutions have one layout.
//! - **residual base** (`init_lora_weights` "pissa"/"olora", [`Init`]): re-derived from W0
//!   exactly as PEFT does when it loads the adapter onto the original base.
//! - **tied `lm_head`**: refused with the reason (see [`AdaptedModel::new`]).

use super::base::{BaseConfig, BaseModel, NameMap};
use super::config::Init;
use super::model::{Adapter, AdapterModule, ModuleKind};
use crate::dtype::DType;
use crate::layer::Layer;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;

/// Choices the files cannot settle, made by the user (`--base-prefix`/`--strip-prefix`,
/// `--fan-in-fan-out`).
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// How module names map onto base tensor names; `None`: the one mapping that fits.
    pub names: Option<NameMap>,
    /// A regular expression (full match, on adapter module names): matching `Linear`
    /// modules are stored `[d_in, d_out]` (Conv1D), all others `[d_out, d_in]`. `None`: decided
    /// from the evidence, square weights without evidence refused.
    pub fan_in_fan_out: Option<String>,
}

/// A base model and an adapter checked against each other: every adapted module has a base
/// weight of the right shape and a floating-point dtype, and every module the config
/// targets in the base has adapter tensors.
#[derive(Debug)]
pub struct AdaptedModel<'a> {
    /// The base model.
    pub base: &'a BaseModel,
    /// The adapter.
    pub adapter: &'a Adapter,
    /// How module names map to base tensor names.
    pub names: NameMap,
    /// Per module: true when its base weight is stored `[d_in, d_out]` (Conv1D, and every
    /// embedding, see [`ModuleKind::Embedding`]).
    pub fan_in_fan_out: BTreeMap<String, bool>,
    /// What `init_lora_weights` did to the base.
    pub init: Init,
}

/// A layer prepared for inference: the DoRA scale g = m / max(‖W0 + s·B·A‖, ε) computed once
/// (it depends only on the frozen parameters), so a forward pass costs no norm.
///
/// Training must not use a cached g: A and B change every step, and the CPU/CUDA `run`
/// functions recompute it from the [`Layer`].
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceLayer {
    /// The layer's parameters.
    pub layer: Layer,
    /// g `[d_out]` (f32), `None` for plain LoRA.
    pub scale: Option<Vec<f32>>,
}

/// The part PEFT's initialisation took out of W0, `W0 − W_res = P·Q` with P `[rows, r]` and
/// Q `[r, cols]` (f64, on the rows `[d_out, d_in]`): what undoing a merge adds back.
#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    /// P `[d_out, r]`.
    pub p: Vec<f64>,
    /// Q `[r, d_in]`.
    pub q: Vec<f64>,
    /// r.
    pub r: usize,
}

impl<'a> AdaptedModel<'a> {
    /// Pairs a base model with an adapter with no explicit choices (see
    /// [`AdaptedModel::with_options`]).
    ///
    /// # Errors
    /// As [`AdaptedModel::with_options`].
    pub fn new(base: &'a BaseModel, adapter: &'a Adapter) -> Result<Self> {
        Self::with_options(base, adapter, &ApplyOptions::default())
    }

    /// Pairs a base model with an adapter and checks every module (see the type and the
    /// module documentation).
    ///
    /// # Errors
    /// The first module that does not fit, named: absent from the base, a shape that
    /// disagrees, a non-float (quantized) base weight, a module the config targets that
    /// the adapter file lacks, names that fit under two mappings, a square weight whose layout
    /// nothing tells, an initialisation whose residual cannot be re-derived, an adapter on an
    /// `lm_head` the base ties to its input embedding.
    pub fn with_options(
        base: &'a BaseModel,
        adapter: &'a Adapter,
        opts: &ApplyOptions,
    ) -> Result<Self> {
        let init = adapter.config.init()?;
        let cfg = if base.from_dir {
            BaseConfig::read(&base.dir)?
        } else {
            BaseConfig::default()
        };
        if let Some(e) = tied_head_reason(base, adapter, &cfg) {
            return Err(e);
        }
        let saved: Vec<String> = adapter
            .saved
            .keys()
            .map(|k| super::model::saved_base_name(k))
            .collect();
        let names = NameMap::resolve_with(
            base,
            adapter.modules.keys().map(String::as_str),
            saved.iter().map(String::as_str),
            opts.names.as_ref(),
        )?;
        let fifo_re = opts
            .fan_in_fan_out
            .as_deref()
            .map(|p| super::config::compile_full(p, "--fan-in-fan-out"))
            .transpose()?;
        // A pattern that names no module is a typo that would lay every module out as
        // nn.Linear; '' is the way to say "none".
        if let (Some(re), Some(p)) = (&fifo_re, opts.fan_in_fan_out.as_deref()) {
            ensure!(
                p.is_empty() || adapter.modules.keys().any(|m| re.is_match(m)),
                "--fan-in-fan-out {p:?} matches no module of the adapter (first: {}); give '' \
                 for none",
                adapter.modules.keys().next().map_or("none", String::as_str)
            );
        }
        let mut me = Self {
            base,
            adapter,
            names,
            fan_in_fan_out: BTreeMap::new(),
            init,
        };
        for m in adapter.modules.values() {
            let fifo = me.check_module(m, &cfg, fifo_re.as_ref())?;
            me.fan_in_fan_out.insert(m.name.clone(), fifo);
        }
        for (name, t) in &adapter.saved {
            me.check_saved(name, t)?;
        }
        me.check_targets()?;
        Ok(me)
    }

    /// The base tensor name of a module's weight.
    pub fn weight_name(&self, module: &str) -> String {
        format!("{}.weight", self.names.base_name(module))
    }

    /// The base tensor name of a module's bias.
    pub fn bias_name(&self, module: &str) -> String {
        format!("{}.bias", self.names.base_name(module))
    }

    /// The base tensor a saved full tensor (`modules_to_save`, a trained bias) replaces.
    pub fn saved_name(&self, tensor: &str) -> String {
        self.names.base_name(&super::model::saved_base_name(tensor))
    }

    /// Checks one module against its base weight and decides its layout (true: stored
    /// `[d_in, d_out]`).
    fn check_module(
        &self,
        m: &AdapterModule,
        cfg: &BaseConfig,
        fifo_re: Option<&regex::Regex>,
    ) -> Result<bool> {
        let name = &m.name;
        let wname = self.weight_name(name);
        let e = self.base.entry(&wname).with_context(|| name.clone())?;
        if crate::dtype::DType::from_safetensors(e.dtype).is_err() {
            bail!(
                "{name}: base weight {wname} is {:?}; quantized or integer base weights are not supported",
                e.dtype
            );
        }
        let (d_in, d_out, _) = m.dims();
        let fifo = match &m.kind {
            ModuleKind::Embedding => {
                ensure!(
                    e.shape == [d_in, d_out],
                    "{name}: base embedding {wname} is {:?}, but lora_embedding_A is {:?} and lora_embedding_B is {:?}, so it should be [{d_in}, {d_out}] ([num_embeddings, embedding_dim])",
                    e.shape,
                    m.lora_a.shape(),
                    m.lora_b.shape()
                );
                true
            }
            ModuleKind::Conv {
                a_shape, b_shape, ..
            } => {
                ensure!(
                    e.shape.len() == a_shape.len()
                        && e.shape[0] == b_shape[0]
                        && e.shape[1..].iter().product::<usize>() == d_in
                        && e.shape[2..] == a_shape[2..],
                    "{name}: base convolution {wname} is {:?}, but lora_A is {a_shape:?} and lora_B is {b_shape:?} (grouped convolutions are not supported)",
                    e.shape
                );
                false
            }
            ModuleKind::Linear => {
                if e.shape.len() != 2 {
                    bail!(
                        "{name}: base weight {wname} is {:?} but the adapter's factors are 2-D (lora_A {:?}, lora_B {:?})",
                        e.shape,
                        m.lora_a.shape(),
                        m.lora_b.shape()
                    );
                }
                let fits = |fifo: bool| e.shape == if fifo { [d_in, d_out] } else { [d_out, d_in] };
                let shape_err = || {
                    anyhow::anyhow!(
                        "{name}: base weight {wname} is {:?}, but lora_A is {:?} and lora_B is {:?}, so it should be [{d_out}, {d_in}] (nn.Linear) or [{d_in}, {d_out}] (Conv1D)",
                        e.shape,
                        m.lora_a.shape(),
                        m.lora_b.shape()
                    )
                };
                if let Some(re) = fifo_re {
                    let f = re.is_match(name);
                    if !fits(f) {
                        bail!(
                            "{name}: --fan-in-fan-out makes it {}, but base weight {wname} is {:?} and lora_A/lora_B say [{d_out}, {d_in}] rows",
                            if f { "[d_in, d_out] (Conv1D)" } else { "[d_out, d_in] (nn.Linear)" },
                            e.shape
                        );
                    }
                    f
                } else if d_in != d_out {
                    match (fits(false), fits(true)) {
                        (true, _) => false,
                        (_, true) => true,
                        _ => return Err(shape_err()),
                    }
                } else {
                    ensure!(fits(false), shape_err());
                    let base_module = self.names.base_name(name);
                    match cfg.is_conv1d(&base_module) {
                        Some(f) => f,
                        None => {
                            let beside =
                                !self.base.from_dir && self.base.dir.join("config.json").is_file();
                            let hint = if beside {
                                " (the base was given as a file: the config.json beside it is read only when the base is given as its directory)"
                            } else {
                                ""
                            };
                            bail!(
                                "{name}: base weight {wname} is square {:?}, so its shape cannot tell nn.Linear [out, in] from Conv1D [in, out], and the base has no config.json naming a model type that does{hint} (the adapter's fan_in_fan_out is one flag for all modules, which PEFT itself overrides per module); give --fan-in-fan-out with a pattern of the modules stored [in, out] ('' for none)",
                                e.shape
                            )
                        }
                    }
                }
            }
        };
        let bname = self.bias_name(name);
        if let Some(b) = self.base.tensors.get(&bname) {
            ensure!(
                b.shape == [d_out] && crate::dtype::DType::from_safetensors(b.dtype).is_ok(),
                "{name}: base bias {bname} is {:?} {:?}, expected a float [{d_out}]",
                b.dtype,
                b.shape
            );
        } else if m.lora_bias.is_some() {
            // PEFT's Linear.merge: "Impossible to merge LoRA with `lora_bias=True` because the
            // base layer has no bias."
            bail!("{name}: lora_bias is true but the base layer has no bias {bname} to merge it into (PEFT refuses too)");
        }
        match self.init {
            Init::KeepsBase => {}
            Init::Pissa | Init::Olora if !matches!(m.kind, ModuleKind::Linear) => {}
            Init::Pissa => ensure!(
                m.rank <= d_in.min(d_out),
                "{name}: PiSSA rank {} exceeds min(d_out, d_in) = {}",
                m.rank,
                d_in.min(d_out)
            ),
            Init::Olora => {
                ensure!(
                    !fifo,
                    "{name}: OLoRA on a Conv1D weight ([in, out]) is not supported (PEFT factors the stored matrix, whose rows are not the outputs)"
                );
                ensure!(
                    m.rank <= d_in.min(d_out),
                    "{name}: OLoRA rank {} exceeds min(d_out, d_in) = {}",
                    m.rank,
                    d_in.min(d_out)
                );
            }
        }
        Ok(fifo)
    }

    fn check_saved(&self, name: &str, t: &Tensor) -> Result<()> {
        let bname = self.saved_name(name);
        let e = self.base.entry(&bname).with_context(|| {
            format!("{name}: modules_to_save tensor has no base tensor {bname} to replace")
        })?;
        ensure!(
            e.shape == t.shape(),
            "{name}: modules_to_save tensor is {:?} but base tensor {bname} is {:?}",
            t.shape(),
            e.shape
        );
        ensure!(
            crate::dtype::DType::from_safetensors(e.dtype).is_ok(),
            "{name}: base tensor {bname} is {:?}; only float tensors can be replaced",
            e.dtype
        );
        Ok(())
    }

    /// Modules the config targets in the base model must all be in the adapter file (PEFT
    /// would silently leave a missing one at its initial value; here that is a corrupt file).
    fn check_targets(&self) -> Result<()> {
        let cfg = &self.adapter.config;
        if cfg.lora.target_modules.is_none() {
            return Ok(());
        }
        let matcher = cfg.matcher()?;
        for (key, e) in &self.base.tensors {
            let Some(base_mod) = key.strip_suffix(".weight") else {
                continue;
            };
            if e.shape.len() != 2 && e.shape.len() != 4 {
                continue;
            }
            let Some(module) = self.names.module_name(base_mod) else {
                continue;
            };
            if matcher.is_target(&module) && !self.adapter.modules.contains_key(&module) {
                bail!("{module}: targeted by the config (target_modules) and present in the base, but the adapter file has no tensors for it");
            }
        }
        Ok(())
    }

    /// True when a module's base weight is stored `[d_in, d_out]`.
    ///
    /// # Errors
    /// Unknown module.
    pub fn module_fan_in_fan_out(&self, module: &str) -> Result<bool> {
        self.fan_in_fan_out
            .get(module)
            .copied()
            .with_context(|| format!("{module}: not a module of this adapter"))
    }

    /// The [`Layer`] of one module as PEFT holds it after loading: the base weight (the
    /// residual base for PiSSA/OLoRA) and bias read from the mapping in the base dtype, and
    /// lora_A, lora_B and the magnitude in f32 (PEFT's default `autocast_adapter_dtype=True`
    /// upcasts f16/bf16 adapter parameters to f32, whatever the file stores; the values are
    /// unchanged, and so are the gradients' dtypes a training step produces).
    ///
    /// # Errors
    /// Unknown module, or an unreadable base tensor.
    pub fn layer(&self, module: &str) -> Result<Layer> {
        let mut l = self.layer_as_stored(module)?;
        l.lora_a = l.lora_a.cast(DType::F32);
        l.lora_b = l.lora_b.cast(DType::F32);
        l.magnitude = l.magnitude.map(|m| m.cast(DType::F32));
        Ok(l)
    }

    /// The [`Layer`] of one module with the adapter tensors in the dtypes the file stores
    /// (PEFT's `autocast_adapter_dtype=False` on a base of the same dtype). A convolution's
    /// weight comes as `[out, in·Πk]`; a `lora_B.bias` (plain LoRA) is folded into the bias
    /// as bias + s·lora_B.bias, which is what the layer adds.
    ///
    /// # Errors
    /// Unknown module, an unreadable base tensor, or a residual base that cannot be derived.
    pub fn layer_as_stored(&self, module: &str) -> Result<Layer> {
        Ok(self.layer_and_residual(module)?.0)
    }

    /// [`AdaptedModel::layer_as_stored`] with the residual the initialisation took out of
    /// W0 (`None` when it kept the base).
    ///
    /// # Errors
    /// As [`AdaptedModel::layer_as_stored`].
    pub fn layer_and_residual(&self, module: &str) -> Result<(Layer, Option<Residual>)> {
        let m = self
            .adapter
            .modules
            .get(module)
            .with_context(|| format!("{module}: not a module of this adapter"))?;
        let fifo = self.module_fan_in_fan_out(module)?;
        let mut weight = self
            .base
            .tensor(&self.weight_name(module))
            .with_context(|| module.to_string())?;
        if let ModuleKind::Conv { .. } = m.kind {
            let out = weight.shape()[0];
            let rest = weight.len() / out.max(1);
            weight = Tensor::new(vec![out, rest], weight.data().clone())
                .with_context(|| module.to_string())?;
        }
        let residual = match (self.init, &m.kind) {
            (Init::KeepsBase, _) | (_, ModuleKind::Embedding | ModuleKind::Conv { .. }) => None,
            (init, ModuleKind::Linear) => {
                let (w, res) = super::residual::residual_base(&weight, fifo, m, init)
                    .with_context(|| {
                        format!(
                            "{module}: re-deriving the residual base of init_lora_weights {:?}",
                            self.adapter
                                .config
                                .raw
                                .get("init_lora_weights")
                                .cloned()
                                .unwrap_or_default()
                        )
                    })?;
                weight = w;
                Some(res)
            }
        };
        let bname = self.bias_name(module);
        let mut bias = if self.base.tensors.contains_key(&bname) {
            Some(
                self.base
                    .tensor(&bname)
                    .with_context(|| module.to_string())?,
            )
        } else {
            None
        };
        if let (Some(b), Some(lb)) = (&bias, &m.lora_bias) {
            let s = m.scaling as f32;
            let v: Vec<f32> = b
                .to_f32()
                .iter()
                .zip(lb.to_f32())
                .map(|(x, y)| x + y * s)
                .collect();
            bias = Some(Tensor::from_f32(b.dtype(), b.shape().to_vec(), &v)?);
        }
        let layer = Layer {
            weight,
            bias,
            lora_a: m.lora_a.clone(),
            lora_b: m.lora_b.clone(),
            magnitude: m.magnitude.clone(),
            scaling: m.scaling,
            fan_in_fan_out: fifo,
        };
        layer.dims().with_context(|| module.to_string())?;
        Ok((layer, residual))
    }

    /// Every module's layer, one at a time (only one base weight is in memory at once).
    pub fn layers(&self) -> impl Iterator<Item = Result<(String, Layer)>> + '_ {
        self.adapter
            .modules
            .keys()
            .map(move |k| self.layer(k).map(|l| (k.clone(), l)))
    }

    /// One module prepared for inference, with g computed once.
    ///
    /// # Errors
    /// As [`AdaptedModel::layer`], or a failing norm computation.
    pub fn inference_layer(&self, module: &str) -> Result<InferenceLayer> {
        InferenceLayer::new(self.layer(module)?).with_context(|| module.to_string())
    }
}

/// An adapted `lm_head` (or one in `modules_to_save`) in a base that ties it to the input
/// embedding: the refusal with its reason. Tied means `tie_word_embeddings: true` in
/// `config.json`, or the key omitted while the base stores no `lm_head.weight` (transformers
/// drops a tied weight when saving).
fn tied_head_reason(
    base: &BaseModel,
    adapter: &Adapter,
    cfg: &BaseConfig,
) -> Option<anyhow::Error> {
    let is_head = |m: &str| m == "lm_head" || m.ends_with(".lm_head");
    let head = adapter.modules.keys().find(|m| is_head(m)).or_else(|| {
        adapter
            .saved
            .keys()
            .find(|t| is_head(t.rsplit_once('.').map_or(t.as_str(), |(m, _)| m)))
    })?;
    let stored = base.tensors.keys().any(|k| k.ends_with("lm_head.weight"));
    let tied = match cfg.tie_word_embeddings {
        Some(t) => t,
        None => cfg.present && !stored,
    };
    if !tied {
        return None;
    }
    let why = match cfg.tie_word_embeddings {
        Some(_) => "tie_word_embeddings is true in config.json".to_string(),
        None => "config.json leaves tie_word_embeddings to the model's default and the base stores no lm_head.weight".to_string(),
    };
    Some(anyhow::anyhow!(
        "{head}: the base ties lm_head to the input embedding ({why}), so one tensor serves both; PEFT's merge writes the merged weight into that shared tensor and so changes the input embedding too, which the adapter never trained; untie the base first (load it with tie_word_embeddings=False, save it) and merge into that"
    ))
}

impl InferenceLayer {
    /// Computes g once on the CPU path.
    ///
    /// # Errors
    /// Inconsistent layer shapes.
    pub fn new(layer: Layer) -> Result<Self> {
        let scale = super::compute::magnitude_scale(&layer)?;
        Ok(Self { layer, scale })
    }
}
