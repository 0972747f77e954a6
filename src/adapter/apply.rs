//! An adapter applied to a base model: per-module [`Layer`]s for the CPU and CUDA paths.

use super::base::{BaseModel, NameMap};
use super::model::{Adapter, AdapterModule};
use crate::dtype::DType;
use crate::layer::Layer;
use anyhow::{bail, ensure, Context, Result};

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

impl<'a> AdaptedModel<'a> {
    /// Pairs a base model with an adapter and checks every module (see the type).
    ///
    /// # Errors
    /// The first module that does not fit, named: absent from the base, a shape that
    /// disagrees, a non-float (quantized) base weight, or a module the config targets that
    /// the adapter file lacks.
    pub fn new(base: &'a BaseModel, adapter: &'a Adapter) -> Result<Self> {
        let names = NameMap::resolve(base, adapter.modules.keys().map(String::as_str))?;
        let me = Self {
            base,
            adapter,
            names,
        };
        for m in adapter.modules.values() {
            me.check_module(m)?;
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

    fn check_module(&self, m: &AdapterModule) -> Result<()> {
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
        let fifo = self.adapter.config.lora.fan_in_fan_out;
        let want = if fifo { [d_in, d_out] } else { [d_out, d_in] };
        if e.shape.len() != 2 {
            bail!(
                "{name}: base weight {wname} is {:?}; only linear layers (2-D weights) are supported",
                e.shape
            );
        }
        ensure!(
            e.shape == want,
            "{name}: base weight {wname} is {:?}, but lora_A is {:?} and lora_B is {:?}, so it should be {want:?}{}",
            e.shape,
            m.lora_a.shape(),
            m.lora_b.shape(),
            if fifo { " (fan_in_fan_out: [d_in, d_out])" } else { " ([d_out, d_in])" }
        );
        let bname = self.bias_name(name);
        if let Some(b) = self.base.tensors.get(&bname) {
            ensure!(
                b.shape == [d_out] && crate::dtype::DType::from_safetensors(b.dtype).is_ok(),
                "{name}: base bias {bname} is {:?} {:?}, expected a float [{d_out}]",
                b.dtype,
                b.shape
            );
        }
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
            if e.shape.len() != 2 {
                continue;
            }
            let module = match &self.names {
                NameMap::Identity => base_mod.to_string(),
                NameMap::Strip(p) => format!("{p}.{base_mod}"),
                NameMap::Add(p) => match base_mod.strip_prefix(&format!("{p}.")) {
                    Some(m) => m.to_string(),
                    None => continue,
                },
            };
            if matcher.is_target(&module) && !self.adapter.modules.contains_key(&module) {
                bail!("{module}: targeted by the config (target_modules) and present in the base, but the adapter file has no tensors for it");
            }
        }
        Ok(())
    }

    /// The [`Layer`] of one module as PEFT holds it after loading: the base weight and bias
    /// read from the mapping in the base dtype, and lora_A, lora_B and the magnitude in f32
    /// (PEFT's default `autocast_adapter_dtype=True` upcasts f16/bf16 adapter parameters to
    /// f32, whatever the file stores; the values are unchanged, and so are the gradients'
    /// dtypes a training step produces).
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
    /// (PEFT's `autocast_adapter_dtype=False` on a base of the same dtype).
    ///
    /// # Errors
    /// Unknown module, or an unreadable base tensor.
    pub fn layer_as_stored(&self, module: &str) -> Result<Layer> {
        let m = self
            .adapter
            .modules
            .get(module)
            .with_context(|| format!("{module}: not a module of this adapter"))?;
        let weight = self
            .base
            .tensor(&self.weight_name(module))
            .with_context(|| module.to_string())?;
        let bname = self.bias_name(module);
        let bias = if self.base.tensors.contains_key(&bname) {
            Some(
                self.base
                    .tensor(&bname)
                    .with_context(|| module.to_string())?,
            )
        } else {
            None
        };
        let layer = Layer {
            weight,
            bias,
            lora_a: m.lora_a.clone(),
            lora_b: m.lora_b.clone(),
            magnitude: m.magnitude.clone(),
            scaling: m.scaling,
            fan_in_fan_out: self.adapter.config.lora.fan_in_fan_out,
        };
        layer.dims().with_context(|| module.to_string())?;
        Ok(layer)
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
