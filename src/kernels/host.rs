//! Host tensors in, host tensors out, through the fused kernels: what `replay --device` and
//! the tests call. Each call uploads the layer, runs [`DoraLayer`] and downloads the results;
//! it is the convenience path, not the steady-state one.

use super::device::{Base, DevTensor, DoraLayer, DoraWeights, GradTargets};
use super::launch;
use super::spec::Variant;
use crate::backend::{Backend, DeviceBuffer};
use crate::dtype::DType;
use crate::layer::{GradMode, Grads, Layer, Outputs};
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// Bytes of one f32 element (gradients, n, g and the f32 merged weight are f32).
const F32_BYTES: usize = DType::F32.size();

/// Uploads `t` cast to `dtype`.
fn upload<B: Backend>(b: &B, t: &Tensor, dtype: DType, name: &str) -> Result<B::Buffer> {
    let c = t.cast(dtype);
    let mut buf = b
        .alloc_zeroed(c.as_bytes().len())
        .with_context(|| format!("allocating {name} {:?} {dtype}", t.shape()))?;
    b.upload(&mut buf, c.as_bytes())
        .with_context(|| format!("uploading {name}"))?;
    Ok(buf)
}

fn download<B: Backend>(
    b: &B,
    buf: &B::Buffer,
    dtype: DType,
    shape: Vec<usize>,
    name: &str,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut bytes = vec![0u8; n * dtype.size()];
    b.download(buf, &mut bytes)
        .with_context(|| format!("downloading {name}"))?;
    Tensor::from_bytes(dtype, shape, &bytes).with_context(|| format!("reading back {name}"))
}

/// The adapter dtype the kernels get for computation dtype `dt`: `dt` when A and B are both
/// stored in it, else f32 (a lossless widening; PEFT's default keeps f32 adapters beside
/// 16-bit base weights, and the `_a32` kernels read them as they are).
fn adapter_dtype(layer: &Layer, dt: DType) -> DType {
    if layer.lora_a.dtype() == dt && layer.lora_b.dtype() == dt {
        dt
    } else {
        DType::F32
    }
}

/// The layer's parameters uploaded in the computation dtype (adapters per
/// [`adapter_dtype`], m and bias in f32).
struct Uploaded<B: Backend> {
    weight: B::Buffer,
    bias: Option<B::Buffer>,
    a: B::Buffer,
    b: B::Buffer,
    m: Option<B::Buffer>,
}

impl<B: Backend> Uploaded<B> {
    fn new(b: &B, layer: &Layer, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: upload(b, &layer.weight, dtype, "weight")?,
            bias: layer
                .bias
                .as_ref()
                .map(|t| upload(b, t, DType::F32, "bias"))
                .transpose()?,
            a: upload(b, &layer.lora_a, adapter_dtype(layer, dtype), "lora_A")?,
            b: upload(b, &layer.lora_b, adapter_dtype(layer, dtype), "lora_B")?,
            m: layer
                .magnitude
                .as_ref()
                .map(|t| upload(b, t, DType::F32, "magnitude"))
                .transpose()?,
        })
    }

    fn weights(&self, layer: &Layer, dtype: DType) -> Result<DoraWeights<'_>> {
        let (d_in, d_out, r) = layer.dims()?;
        Ok(DoraWeights {
            weight: DevTensor::of(&self.weight, dtype),
            fan_in_fan_out: layer.fan_in_fan_out,
            bias: self.bias.as_ref().map(|x| DevTensor::of(x, DType::F32)),
            lora_a: DevTensor::of(&self.a, adapter_dtype(layer, dtype)),
            lora_b: DevTensor::of(&self.b, adapter_dtype(layer, dtype)),
            magnitude: self.m.as_ref().map(|x| DevTensor::of(x, DType::F32)),
            scaling: layer.scaling as f32,
            d_in,
            d_out,
            r,
        })
    }
}

/// Runs `layer` on `x` (forward, and backward when `grad_y` is given) through the fused
/// kernels on `b`. The computation dtype is x's (weights are cast to it, m and bias to f32);
/// y and grad_x come back in x's dtype, each parameter gradient in its parameter's dtype
/// (docs/design.md §2).
///
/// # Errors
/// An invalid layer or input (naming the tensor and shape), or a device failure naming the
/// kernel.
pub fn run<B: Backend>(
    b: &B,
    layer: &Layer,
    x: &Tensor,
    grad_y: Option<&Tensor>,
    mode: GradMode,
) -> Result<Outputs> {
    let shape = layer.call_shape(x, grad_y)?;
    let dt = x.dtype();
    let up = Uploaded::new(b, layer, dt)?;
    let mut dl = DoraLayer::new(b, up.weights(layer, dt)?)?;
    let xb = upload(b, x, dt, "x")?;
    let yb = b
        .alloc_zeroed(shape.t * shape.d_out * dt.size())
        .context("allocating y")?;
    let xt = DevTensor::of(&xb, dt);
    dl.forward_train(b, &xt, shape.t, Base::Compute, &DevTensor::of(&yb, dt))
        .with_context(|| format!("forward at {shape}"))?;
    let y = download(b, &yb, dt, vec![shape.t, shape.d_out], "y")?;
    let Some(gy) = grad_y else {
        return Ok(Outputs { y, grads: None });
    };
    let dyb = upload(b, gy, dt, "grad_y")?;
    let gx = b.alloc_zeroed(shape.t * shape.d_in * dt.size())?;
    let ga = b.alloc_zeroed(F32_BYTES * shape.r * shape.d_in)?;
    let gb = b.alloc_zeroed(F32_BYTES * shape.d_out * shape.r)?;
    let gm = if layer.is_dora() {
        Some(b.alloc_zeroed(F32_BYTES * shape.d_out)?)
    } else {
        None
    };
    let targets = GradTargets {
        grad_x: DevTensor::of(&gx, dt),
        grad_lora_a: DevTensor::of(&ga, DType::F32),
        grad_lora_b: DevTensor::of(&gb, DType::F32),
        grad_magnitude: gm.as_ref().map(|x| DevTensor::of(x, DType::F32)),
    };
    dl.backward(b, &xt, &DevTensor::of(&dyb, dt), &targets, mode)
        .with_context(|| format!("backward ({mode:?}) at {shape}"))?;
    let grads = Grads {
        grad_x: download(b, &gx, dt, vec![shape.t, shape.d_in], "grad_x")?,
        grad_lora_a: download(b, &ga, DType::F32, vec![shape.r, shape.d_in], "grad_lora_A")?
            .cast(layer.lora_a.dtype()),
        grad_lora_b: download(
            b,
            &gb,
            DType::F32,
            vec![shape.d_out, shape.r],
            "grad_lora_B",
        )?
        .cast(layer.lora_b.dtype()),
        grad_magnitude: match (&gm, &layer.magnitude) {
            (Some(buf), Some(m)) => Some(
                download(b, buf, DType::F32, vec![shape.d_out], "grad_magnitude")?.cast(m.dtype()),
            ),
            _ => None,
        },
    };
    Ok(Outputs {
        y,
        grads: Some(grads),
    })
}

/// `W' = diag(g)·(W0 + s·B·A)` as `[d_out, d_in]` row-major f32 (g = 1 for plain LoRA),
/// computed on `b` in the weight's dtype with f32 accumulation (for `merge` on a GPU).
///
/// # Errors
/// An invalid layer (naming the tensor), or a device failure naming the kernel.
pub fn merged_weight<B: Backend>(b: &B, layer: &Layer) -> Result<Vec<f32>> {
    let (d_in, d_out, _) = layer.dims()?;
    let dt = layer.weight.dtype();
    let up = Uploaded::new(b, layer, dt)?;
    let mut dl = DoraLayer::new(b, up.weights(layer, dt)?)?;
    let out = b
        .alloc_zeroed(F32_BYTES * d_out * d_in)
        .context("allocating the merged weight")?;
    dl.merged_weight(b, &DevTensor::of(&out, DType::F32))?;
    let t = download(b, &out, DType::F32, vec![d_out, d_in], "merged weight")?;
    debug_assert_eq!(out.bytes(), F32_BYTES * d_out * d_in);
    Ok(t.to_f32())
}

/// The column norm `n` and, for DoRA, `g = m / max(n, ε)` (both `[d_out]` f32) of `layer`,
/// computed on `b` in the weight's dtype (adapters as stored when f32) by `variant` (or the dispatcher's choice when
/// `None`; tests force each variant of [`super::spec::VARIANTS`] in turn).
///
/// # Errors
/// An invalid layer (naming the tensor), a variant that cannot run this dtype and rank, or
/// a device failure naming the kernel.
pub fn norm<B: Backend>(
    b: &B,
    layer: &Layer,
    variant: Option<&'static Variant>,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (d_in, d_out, r) = layer.dims()?;
    let dt = layer.weight.dtype();
    let up = Uploaded::new(b, layer, dt)?;
    let w = up.weights(layer, dt)?;
    w.validate()?;
    let out = b
        .alloc_zeroed(2 * F32_BYTES * d_out)
        .context("allocating n and g")?;
    let part = b
        .alloc_zeroed(F32_BYTES * super::spec::norm_partials_len(d_out, d_in))
        .context("allocating the norm partials")?;
    let n_ptr = out.ptr();
    let g_ptr = out.ptr().offset(F32_BYTES * d_out);
    let args = launch::NormArgs {
        dtype: dt,
        adapter: w.adapter_dtype(),
        w0: w.weight.ptr(),
        fan_in_fan_out: w.fan_in_fan_out,
        a: w.lora_a.ptr(),
        b: w.lora_b.ptr(),
        m: w.magnitude.map(|m| m.ptr()),
        s: w.scaling,
        d_out,
        d_in,
        r,
        n_out: n_ptr,
        g_out: w.magnitude.map(|_| g_ptr),
        part: Some(part.ptr()),
    };
    // SAFETY: the weights were validated against (d_in, d_out, r) and dtype; `out` holds
    // 2·d_out f32 (n, then g), `part` norm_partials_len f32.
    unsafe { launch::norm(b, &args, variant) }?;
    let both = download(b, &out, DType::F32, vec![2 * d_out], "n and g")?.to_f32();
    let (n, g) = both.split_at(d_out);
    Ok((n.to_vec(), layer.is_dora().then(|| g.to_vec())))
}
