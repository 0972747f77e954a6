//! [`MultiDoraLinear`]: one base linear layer with several adapters, each token on its own
//! adapter or none (docs/design.md §2b), as a candle `Module` once given the batch's indices.

use super::engine::EnginePool;
use super::{emulator, flatten_tokens, from_host, to_candle, to_host, CpuRoute, Lazy};
use crate::case_multi::{AdapterWeights, MultiLayer};
use anyhow::{ensure, Context, Result};
use candle_core::{DType as CDType, Device, Module, Tensor};
use std::sync::Arc;

/// A linear layer serving several adapters at once:
/// `y_t = g_k ⊙ (x_t·W0ᵀ + s_k·(x_t·A_kᵀ)·B_kᵀ) + b` for the adapter k of token t, and
/// `y_t = x_t·W0ᵀ + b` for a token on no adapter (index −1); `g_k = m_k / max(‖W0 +
/// s_k·B_k·A_k‖_row, ε)` for DoRA, 1 for LoRA (PEFT's per-adapter layer, token by token).
///
/// Adapter slots: the layer has one slot per adapter of the model ([`AdapterSet`]'s order);
/// a slot may be empty when that adapter does not target this module, and its tokens then
/// take the base path. Shapes: W0 `[d_out, d_in]`, bias `[d_out]`, input `[..., d_in]` with
/// one index per token (the leading dimensions flattened), output `[..., d_out]` in the
/// input's dtype. g is computed once per adapter at construction (the CPU norm).
///
/// [`AdapterSet`]: super::AdapterSet
#[derive(Debug, Clone)]
pub struct MultiDoraLinear {
    /// The base and the adapters present, in slot order.
    layer: MultiLayer,
    /// W0ᵀ as an f32 candle tensor `[d_in, d_out]` (a transposed view): the base product.
    weight_t: Tensor,
    /// slot → index into `layer.adapters`, or −1 for an empty slot.
    local: Vec<i32>,
    /// g per present adapter.
    scales: Vec<Option<Vec<f32>>>,
    route: CpuRoute,
    name: String,
    d_in: usize,
    d_out: usize,
    /// The adapter pool on the emulator (route [`CpuRoute::EmulatedKernels`]), built at
    /// first use.
    emu: Lazy<EnginePool<crate::emu::EmuBackend>>,
    /// The adapter pool on candle's CUDA stream, for a layer built from CUDA tensors.
    #[cfg(feature = "candle-cuda")]
    cuda: Option<Arc<EnginePool<crate::cuda::CudaBackend>>>,
}

impl MultiDoraLinear {
    /// A layer over the base `weight [d_out, d_in]` and `bias [d_out]` (candle tensors) with
    /// one entry per adapter slot: `Some` adapter (host tensors, as [`crate::adapter`] loads
    /// them) or `None` (that adapter leaves this module alone). Named `name` in errors.
    ///
    /// # Errors
    /// A shape that disagrees with the base (naming `adapters.k.<tensor>`), a dtype other
    /// than f32, f16 or bf16, or a non-finite scaling; all prefixed with the layer's name.
    pub fn new(
        name: &str,
        weight: &Tensor,
        bias: Option<&Tensor>,
        slots: Vec<Option<AdapterWeights>>,
    ) -> Result<Self> {
        let build = || -> Result<Self> {
            let mut local = Vec::with_capacity(slots.len());
            let mut adapters = Vec::new();
            for s in slots {
                match s {
                    Some(a) => {
                        local.push(adapters.len() as i32);
                        adapters.push(a);
                    }
                    None => local.push(-1),
                }
            }
            let layer = MultiLayer {
                weight: to_host(weight, "weight")?,
                bias: bias.map(|b| to_host(b, "bias")).transpose()?,
                fan_in_fan_out: false,
                adapters,
            };
            let (d_in, d_out) = layer.dims()?;
            let scales = crate::cpu::multi::magnitude_scales(&layer)?;
            #[cfg(feature = "candle-cuda")]
            let cuda = match weight.device() {
                Device::Cuda(d) => Some(Arc::new(EnginePool::upload(
                    super::cuda::backend(d)?,
                    &layer,
                    local.len(),
                    &slot_of(&local),
                )?)),
                _ => None,
            };
            Ok(Self {
                weight_t: weight.to_dtype(CDType::F32)?.t()?,
                layer,
                local,
                scales,
                route: CpuRoute::default(),
                name: name.to_string(),
                d_in,
                d_out,
                emu: Lazy::default(),
                #[cfg(feature = "candle-cuda")]
                cuda,
            })
        };
        build().with_context(|| format!("layer {name}"))
    }

    /// The same layer with CPU tensors sent along `route`.
    pub fn with_route(mut self, route: CpuRoute) -> Self {
        self.route = route;
        self
    }

    /// Adapter slots (the model's adapter count).
    pub fn slots(&self) -> usize {
        self.local.len()
    }

    /// How many slots hold an adapter on this module.
    pub fn adapters(&self) -> usize {
        self.layer.adapters.len()
    }

    /// The forward for `xs [..., d_in]` with `adapter_index`, one slot per token (−1 = the
    /// base layer only).
    ///
    /// # Errors
    /// A mis-shaped `xs`, an index of another length than the tokens, or an index outside
    /// −1..slots−1 (naming the token); each prefixed with the layer's name.
    pub fn forward_indexed(
        &self,
        xs: &Tensor,
        adapter_index: &[i32],
    ) -> candle_core::Result<Tensor> {
        let (x, lead) = flatten_tokens(xs, self.d_in, &self.name)?;
        let y = match x.device() {
            Device::Cpu => self
                .forward_host(&x, adapter_index)
                .with_context(|| format!("layer {}", self.name))
                .map_err(to_candle)?,
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(_) => self.forward_cuda(&x, adapter_index)?,
            d => {
                return Err(candle_core::Error::Msg(format!(
                    "layer {}: {d:?} tensors are not supported by this build (CPU tensors; \
                     CUDA tensors with the feature candle-cuda)",
                    self.name
                )))
            }
        };
        let mut dims = lead;
        dims.push(self.d_out);
        y.reshape(dims)
    }

    /// This layer as a `Module` for one batch: `adapter_index` holds one slot per token.
    pub fn with_index<'a>(&'a self, adapter_index: &'a [i32]) -> Indexed<'a> {
        Indexed {
            layer: self,
            adapter_index,
        }
    }

    /// The slots of the batch as indices into this module's adapters.
    fn local_index(&self, index: &[i32]) -> Result<Vec<i32>> {
        index
            .iter()
            .enumerate()
            .map(|(t, &k)| {
                ensure!(
                    k >= -1 && (k as i64) < self.local.len() as i64,
                    "adapter_index[{t}] is {k}, outside -1..={} (-1 = base layer only, {} adapter slots)",
                    self.local.len() as i64 - 1,
                    self.local.len()
                );
                Ok(if k < 0 { -1 } else { self.local[k as usize] })
            })
            .collect()
    }

    fn forward_host(&self, x: &Tensor, index: &[i32]) -> Result<Tensor> {
        let t = x.dims()[0];
        ensure!(
            index.len() == t,
            "adapter_index has {} entries, expected one per token ({t})",
            index.len()
        );
        let local = self.local_index(index)?;
        let xh = to_host(x, "x")?;
        let y = match self.route {
            CpuRoute::CpuPath => {
                let base = x.to_dtype(CDType::F32)?.matmul(&self.weight_t)?;
                let base: Vec<f32> = base.flatten_all()?.to_vec1()?;
                crate::cpu::multi::forward_on_base(&self.layer, &xh, &local, &base, &self.scales)?
            }
            CpuRoute::EmulatedKernels => {
                let p = self.emu.get_or_try(|| {
                    EnginePool::upload(
                        Arc::new(emulator()?),
                        &self.layer,
                        self.local.len(),
                        &slot_of(&self.local),
                    )
                })?;
                super::on_host_by_dtype!(p.backend(), p.dtype(), &xh, self.d_out, |x, y| p
                    .forward(x, index, y))?
            }
        };
        Ok(from_host(&y, x.device())?)
    }

    /// The forward of a CUDA tensor `[T, d_in]`: the adapter pool on candle's stream.
    #[cfg(feature = "candle-cuda")]
    fn forward_cuda(&self, x: &Tensor, index: &[i32]) -> candle_core::Result<Tensor> {
        let check = || -> Result<()> {
            let t = x.dims()[0];
            ensure!(
                index.len() == t,
                "adapter_index has {} entries, expected one per token ({t})",
                index.len()
            );
            self.local_index(index)?;
            Ok(())
        };
        check()
            .with_context(|| format!("layer {}", self.name))
            .map_err(to_candle)?;
        match &self.cuda {
            Some(p) => super::cuda::forward_pool(p, x, index, (self.d_in, self.d_out), &self.name),
            None => Err(candle_core::Error::Msg(format!(
                "layer {}: x is a CUDA tensor but the layer was built from CPU tensors",
                self.name
            ))),
        }
    }
}

/// The model slot of each present adapter: `local[k] = j` puts adapter j in slot k.
fn slot_of(local: &[i32]) -> Vec<usize> {
    let mut v = vec![0; local.iter().filter(|&&j| j >= 0).count()];
    for (k, &j) in local.iter().enumerate() {
        if j >= 0 {
            v[j as usize] = k;
        }
    }
    v
}

/// A [`MultiDoraLinear`] bound to one batch's adapter indices: a `candle_core::Module`.
#[derive(Debug, Clone, Copy)]
pub struct Indexed<'a> {
    layer: &'a MultiDoraLinear,
    adapter_index: &'a [i32],
}

impl Module for Indexed<'_> {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.layer.forward_indexed(xs, self.adapter_index)
    }
}
