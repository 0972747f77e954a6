//! [`DoraLinear`]: one DoRA (or plain LoRA) adapter on one linear layer, as a candle
//! `Module`, with a `CustomOp3` for training through candle's autograd.

use super::engine::EngineLayer;
use super::{emulator, flatten_tokens, from_host, to_candle, to_host, CpuRoute, Lazy};
use crate::adapter::AdapterModule;
use crate::layer::{GradMode, Layer};
use crate::tensor::{Tensor as HostTensor, TensorData};
use anyhow::{ensure, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Device, Layout, Module, Shape, Tensor};
use std::sync::Arc;

/// A linear layer with one DoRA adapter (or plain LoRA when there is no magnitude):
/// `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b` with `g = m / max(‖W0 + s·B·A‖_row, ε)` (DoRA paper
/// eq. 5, PEFT's `DoraLinearLayer`); `g = 1` for LoRA.
///
/// Shapes: `weight` W0 `[d_out, d_in]` (candle's and PyTorch's `Linear` layout), `bias`
/// `[d_out]`, `lora_a` `[r, d_in]`, `lora_b` `[d_out, r]`, `magnitude` `[d_out]`; input
/// `[..., d_in]`, output `[..., d_out]` in the input's dtype (f32, f16 or bf16; arithmetic in
/// f32). g is computed once, at construction, for inference; a forward whose x, A, B or m is
/// tracked by autograd recomputes it and is differentiable (see the module notes).
#[derive(Debug, Clone)]
pub struct DoraLinear {
    /// Host copies of W0, bias, A, B and m (the CPU path's operands).
    layer: Arc<Layer>,
    /// A, B and m as given (they may be `Var`s being trained).
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Option<Tensor>,
    /// g `[d_out]` for DoRA, from the CPU norm at construction.
    scale: Option<Vec<f32>>,
    route: CpuRoute,
    grad_mode: GradMode,
    name: String,
    d_in: usize,
    d_out: usize,
    /// The kernels on the emulator (route [`CpuRoute::EmulatedKernels`]), built at first use.
    emu: Lazy<EngineLayer<crate::emu::EmuBackend>>,
    /// The kernels on candle's CUDA stream, for a layer built from CUDA tensors.
    #[cfg(feature = "candle-cuda")]
    cuda: Option<Arc<EngineLayer<crate::cuda::CudaBackend>>>,
}

impl DoraLinear {
    /// A layer from candle tensors (shapes in the type's notes) and the effective scaling
    /// `s` (`lora_alpha / r`, or `/ √r` with rsLoRA). g is computed here, on the CPU.
    ///
    /// # Errors
    /// A shape that disagrees with another (naming the tensor), a dtype other than f32, f16
    /// or bf16, or a non-finite scaling.
    pub fn new(
        weight: &Tensor,
        bias: Option<&Tensor>,
        lora_a: Tensor,
        lora_b: Tensor,
        magnitude: Option<Tensor>,
        scaling: f64,
    ) -> Result<Self> {
        let layer = Layer {
            weight: to_host(weight, "weight")?,
            bias: bias.map(|b| to_host(b, "bias")).transpose()?,
            lora_a: to_host(&lora_a, "lora_A")?,
            lora_b: to_host(&lora_b, "lora_B")?,
            magnitude: magnitude
                .as_ref()
                .map(|m| to_host(m, "magnitude"))
                .transpose()?,
            scaling,
            fan_in_fan_out: false,
        };
        let (d_in, d_out, _) = layer.dims()?;
        let scale = crate::cpu::magnitude_scale(&layer)?;
        #[cfg(feature = "candle-cuda")]
        let cuda = match weight.device() {
            Device::Cuda(d) => Some(Arc::new(EngineLayer::upload(
                super::cuda::backend(d)?,
                &layer,
            )?)),
            _ => None,
        };
        Ok(Self {
            layer: Arc::new(layer),
            lora_a,
            lora_b,
            magnitude,
            scale,
            route: CpuRoute::default(),
            grad_mode: GradMode::default(),
            name: "linear".to_string(),
            d_in,
            d_out,
            emu: Lazy::default(),
            #[cfg(feature = "candle-cuda")]
            cuda,
        })
    }

    /// The layer of one module of a PEFT adapter ([`crate::adapter::Adapter::load`]) on the
    /// base weight and bias loaded with candle (`VarBuilder`, `candle_core::safetensors`); the
    /// adapter tensors go to W0's device. The layer is named after the module in errors.
    ///
    /// # Errors
    /// A module PEFT did not make a `lora.Linear` (embeddings, convolutions), `lora_bias`,
    /// or shapes that disagree with the base weight; each names the module.
    pub fn from_peft(
        weight: &Tensor,
        bias: Option<&Tensor>,
        module: &AdapterModule,
    ) -> Result<Self> {
        let dev = weight.device();
        let name = &module.name;
        super::load::check_linear(module)?;
        let a = from_host(&module.lora_a, dev)?;
        let b = from_host(&module.lora_b, dev)?;
        let m = module
            .magnitude
            .as_ref()
            .map(|m| from_host(m, dev))
            .transpose()?;
        Ok(Self::new(weight, bias, a, b, m, module.scaling)
            .with_context(|| format!("module {name}"))?
            .with_name(name))
    }

    /// The same layer with CPU tensors sent along `route`.
    pub fn with_route(mut self, route: CpuRoute) -> Self {
        self.route = route;
        self
    }

    /// The same layer with the norm's gradient taken as `mode` in training (default
    /// [`GradMode::Detached`], PEFT's).
    pub fn with_grad_mode(mut self, mode: GradMode) -> Self {
        self.grad_mode = mode;
        self
    }

    /// The same layer, named `name` in its errors (a module name).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// g = m / max(n, ε) `[d_out]` as computed at construction (`None` for LoRA).
    pub fn magnitude_scale(&self) -> Option<&[f32]> {
        self.scale.as_deref()
    }

    /// `W' = diag(g)·(W0 + s·B·A)` `[d_out, d_in]` f32 on `device` (the merged weight, for a
    /// plain `candle_nn::Linear`), from the CPU path ([`crate::cpu::merged_weight`]).
    ///
    /// # Errors
    /// The CPU path's (none for a layer built by [`DoraLinear::new`]).
    pub fn merged_weight(&self, device: &Device) -> Result<Tensor> {
        let w = crate::cpu::merged_weight(&self.layer)?;
        Ok(Tensor::from_vec(w, (self.d_out, self.d_in), device)?)
    }

    /// The host layer with A, B and m taken from `x`'s call (training), W0 and bias frozen.
    fn with_adapter(&self, a: HostTensor, b: HostTensor, m: Option<HostTensor>) -> Layer {
        Layer {
            weight: self.layer.weight.clone(),
            bias: self.layer.bias.clone(),
            lora_a: a,
            lora_b: b,
            magnitude: m,
            scaling: self.layer.scaling,
            fan_in_fan_out: false,
        }
    }

    /// Inference on a CPU tensor `[T, d_in]`.
    fn forward_host(&self, x: &Tensor) -> Result<Tensor> {
        let xh = to_host(x, "x")?;
        let y = match self.route {
            CpuRoute::CpuPath => {
                crate::cpu::forward_with_scale(&self.layer, &xh, self.scale.as_deref())?
            }
            CpuRoute::EmulatedKernels => {
                let e = self
                    .emu
                    .get_or_try(|| EngineLayer::upload(Arc::new(emulator()?), &self.layer))?;
                super::on_host_by_dtype!(e.backend(), e.dtype(), &xh, self.d_out, |x, y| e
                    .forward(x, y))?
            }
        };
        Ok(from_host(&y, x.device())?)
    }

    /// Inference on a CUDA tensor `[T, d_in]`: the kernels on candle's stream.
    #[cfg(feature = "candle-cuda")]
    fn forward_cuda(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.cuda {
            Some(e) => super::cuda::forward_linear(e, x, (self.d_in, self.d_out), &self.name),
            None => Err(candle_core::Error::Msg(format!(
                "layer {}: x is a CUDA tensor but the layer was built from CPU tensors",
                self.name
            ))),
        }
    }

    fn tracked(&self, x: &Tensor) -> bool {
        x.track_op()
            || self.lora_a.track_op()
            || self.lora_b.track_op()
            || self.magnitude.as_ref().is_some_and(Tensor::track_op)
    }
}

impl Module for DoraLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (x, lead) = flatten_tokens(xs, self.d_in, &self.name)?;
        let y = if self.tracked(xs) {
            if !x.device().is_cpu() {
                return Err(candle_core::Error::Msg(format!(
                    "layer {}: training on {:?} tensors is not supported (CPU tensors only); \
                     detach the inputs for inference",
                    self.name,
                    x.device()
                )));
            }
            // [B | m]: one argument, so candle's cat splits the gradient back into B's and m's.
            let bm = match &self.magnitude {
                Some(m) => Tensor::cat(&[&self.lora_b, &m.unsqueeze(1)?], 1)?,
                None => self.lora_b.clone(),
            };
            let op = DoraOp {
                linear: self.clone(),
            };
            x.contiguous()?
                .apply_op3(&self.lora_a.contiguous()?, &bm.contiguous()?, op)?
        } else {
            match x.device() {
                Device::Cpu => self
                    .forward_host(&x)
                    .with_context(|| format!("layer {}", self.name))
                    .map_err(to_candle)?,
                #[cfg(feature = "candle-cuda")]
                Device::Cuda(_) => self.forward_cuda(&x)?,
                d => {
                    return Err(candle_core::Error::Msg(format!(
                        "layer {}: {d:?} tensors are not supported by this build (CPU tensors; \
                         CUDA tensors with the feature candle-cuda)",
                        self.name
                    )))
                }
            }
        };
        let mut dims = lead;
        dims.push(self.d_out);
        y.reshape(dims)
    }
}

/// The DoRA layer as a candle `CustomOp3` over `(x [T, d_in], A [r, d_in], [B | m]
/// [d_out, r+1])` (`[d_out, r]`, B alone, for LoRA): forward and backward by dorafuse.
struct DoraOp {
    linear: DoraLinear,
}

impl DoraOp {
    /// The layer with this call's A, B, m (split from `[B | m]`).
    fn layer(&self, a: HostTensor, bm: HostTensor) -> Result<Layer> {
        let dora = self.linear.magnitude.is_some();
        let (b, m) = if dora {
            split_last_column(&bm)?
        } else {
            (bm, None)
        };
        Ok(self.linear.with_adapter(a, b, m))
    }

    fn run(
        &self,
        layer: &Layer,
        x: &HostTensor,
        gy: Option<&HostTensor>,
    ) -> Result<crate::Outputs> {
        match self.linear.route {
            CpuRoute::CpuPath => crate::cpu::run(layer, x, gy, self.linear.grad_mode),
            CpuRoute::EmulatedKernels => {
                crate::kernels::run(&emulator()?, layer, x, gy, self.linear.grad_mode)
            }
        }
    }
}

/// `[d_out, r+1]` as `B [d_out, r]` and `m [d_out]` (the last column).
fn split_last_column(bm: &HostTensor) -> Result<(HostTensor, Option<HostTensor>)> {
    let s = bm.shape();
    ensure!(
        s.len() == 2 && s[1] >= 2,
        "[lora_B | magnitude] is {s:?}, expected [d_out, r + 1]"
    );
    let (rows, cols) = (s[0], s[1]);
    fn split<T: Copy>(v: &[T], rows: usize, cols: usize) -> (Vec<T>, Vec<T>) {
        let mut b = Vec::with_capacity(rows * (cols - 1));
        let mut m = Vec::with_capacity(rows);
        for row in v.chunks_exact(cols) {
            b.extend_from_slice(&row[..cols - 1]);
            m.push(row[cols - 1]);
        }
        (b, m)
    }
    let (b, m) = match bm.data() {
        TensorData::F32(v) => {
            let (b, m) = split(v, rows, cols);
            (TensorData::F32(b), TensorData::F32(m))
        }
        TensorData::F16(v) => {
            let (b, m) = split(v, rows, cols);
            (TensorData::F16(b), TensorData::F16(m))
        }
        TensorData::BF16(v) => {
            let (b, m) = split(v, rows, cols);
            (TensorData::BF16(b), TensorData::BF16(m))
        }
    };
    Ok((
        HostTensor::new(vec![rows, cols - 1], b)?,
        Some(HostTensor::new(vec![rows], m)?),
    ))
}

/// A contiguous CPU storage as a host tensor, naming it.
fn storage_to_host(s: &CpuStorage, l: &Layout, name: &str) -> Result<HostTensor> {
    let (a, b) = l
        .contiguous_offsets()
        .with_context(|| format!("{name} is not contiguous"))?;
    let data = match s {
        CpuStorage::F32(v) => TensorData::F32(v[a..b].to_vec()),
        CpuStorage::F16(v) => TensorData::F16(v[a..b].to_vec()),
        CpuStorage::BF16(v) => TensorData::BF16(v[a..b].to_vec()),
        other => anyhow::bail!(
            "{name} is {:?}: dorafuse takes f32, f16 or bf16",
            other.dtype()
        ),
    };
    HostTensor::new(l.dims().to_vec(), data)
}

fn host_to_storage(t: HostTensor) -> CpuStorage {
    match t.data().clone() {
        TensorData::F32(v) => CpuStorage::F32(v),
        TensorData::F16(v) => CpuStorage::F16(v),
        TensorData::BF16(v) => CpuStorage::BF16(v),
    }
}

impl candle_core::CustomOp3 for DoraOp {
    fn name(&self) -> &'static str {
        "dorafuse-dora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let run = || -> Result<(CpuStorage, Shape)> {
            let x = storage_to_host(s1, l1, "x")?;
            let layer = self.layer(
                storage_to_host(s2, l2, "lora_A")?,
                storage_to_host(s3, l3, "[lora_B | magnitude]")?,
            )?;
            let y = self.run(&layer, &x, None)?.y;
            let shape = Shape::from(y.shape().to_vec());
            Ok((host_to_storage(y), shape))
        };
        run()
            .with_context(|| format!("layer {} (forward)", self.linear.name))
            .map_err(to_candle)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        bm: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let run = || -> Result<(Tensor, Tensor, Tensor)> {
            let dev = x.device();
            let xh = to_host(x, "x")?;
            let layer = self.layer(to_host(a, "lora_A")?, to_host(bm, "[lora_B | magnitude]")?)?;
            let gy = to_host(&grad_res.contiguous()?, "grad_y")?.cast(xh.dtype());
            let out = self.run(&layer, &xh, Some(&gy))?;
            let g = out.grads.context("the backward returned no gradients")?;
            let gx = from_host(&g.grad_x, dev)?;
            let ga = from_host(&g.grad_lora_a, dev)?;
            let gb = from_host(&g.grad_lora_b, dev)?;
            let gbm = match &g.grad_magnitude {
                Some(gm) => Tensor::cat(&[&gb, &from_host(gm, dev)?.unsqueeze(1)?], 1)?,
                None => gb,
            };
            Ok((gx, ga, gbm))
        };
        let (gx, ga, gbm) = run()
            .with_context(|| format!("layer {} (backward)", self.linear.name))
            .map_err(to_candle)?;
        Ok((Some(gx), Some(ga), Some(gbm)))
    }
}
