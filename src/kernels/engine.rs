//! The API an inference engine links: layers that live in the engine's structs, adapters
//! whose g is computed once at load, typed views, and workspace the engine plans.
//!
//! - [`DoraLinear`]: one frozen linear module (W0 and its bias) bound to a backend, that is to
//!   one stream (`Arc<B>`; on CUDA a [`CudaBackend`](crate::cuda::CudaBackend) made from the
//!   engine's own `CudaStream`, whose cuBLAS handle every layer on that stream shares). It
//!   holds its weights through `Arc`s, so the engine keeps sharing them.
//! - [`DoraAdapter`]: one module's adapter (lora_A, lora_B, the magnitude m, the scaling s)
//!   with its `g = m / max(‖W0 + s·B·A‖, ε)`, computed once by
//!   [`DoraAdapter::compute_scale`] with the norm kernel (never building `B·A`), into memory
//!   it allocates or the caller supplies. A forward takes the adapter by reference:
//!   switching adapters between calls costs nothing.
//! - Views: [`DevView`](super::DevView) / [`DevViewMut`](super::DevViewMut), checked at
//!   every call (device, shape, length, alignment, overlap), each error naming the tensor.
//! - Workspace: [`DoraLinear::workspace_len`] says how much a token count needs;
//!   [`DoraLinear::forward_with_workspace`] takes the engine's memory, and
//!   [`DoraLinear::forward`] grows an owned one (the convenience path).
//!
//! docs/engine.md walks through a complete program (examples/engine).

use super::device::{base_gemm, shrink_and_compose, DevTensor, DoraWeights, FwdIo};
use super::launch;
use super::view::{check_disjoint, check_memory, Checked, DevView, DevViewMut, MatShape};
use crate::adapter::AdapterModule;
use crate::backend::{Backend, DevPtr, DeviceId, DeviceMemory, Elem, MemoryInfo};
use crate::dtype::DType;
use crate::error::{ensure_input, invalid};
use crate::layer::Layer;
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Checks held memory at construction: its device and that it holds `len` elements of `dtype`.
/// `a·b` elements of `name`, refused when it overflows.
fn elems(name: &str, a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(n) => Ok(n),
        None => crate::error::invalid!("{name}: {a}×{b} elements overflow"),
    }
}

fn check_held(
    name: &str,
    m: &MemoryInfo,
    device: DeviceId,
    dtype: DType,
    len: usize,
) -> Result<()> {
    ensure_input!(
        m.device == device,
        "{name}: memory of {}, but the backend runs on {device}",
        m.device
    );
    ensure_input!(
        m.dtype == dtype,
        "{name}: dtype {}, expected {dtype}",
        m.dtype
    );
    ensure_input!(
        m.len >= len,
        "{name}: too short: {len} elements needed, the slice has {}",
        m.len
    );
    Ok(())
}

/// A held tensor's byte range, for the overlap checks.
fn span(m: &MemoryInfo, len: usize) -> Checked {
    Checked {
        ptr: m.ptr,
        ld: len,
        lo: m.ptr.0,
        hi: m.ptr.0 + (len * m.dtype.size()) as u64,
    }
}

/// Uploads a host tensor cast to `T` (PEFT tensors of any dtype; round-to-nearest-even).
pub(crate) fn upload_as<B: Backend, T: Elem>(
    b: &B,
    t: &Tensor,
    name: &str,
) -> Result<Arc<B::Slice<T>>> {
    let c = t.cast(T::DTYPE);
    let host: &[T] = bytemuck::cast_slice(c.as_bytes());
    Ok(Arc::new(b.upload_slice(host).with_context(|| {
        format!("uploading {name} {:?}", t.shape())
    })?))
}

/// Uploads a host tensor in `dtype`, held type-erased.
fn upload_erased<B: Backend>(
    b: &B,
    t: &Tensor,
    dtype: DType,
    name: &str,
) -> Result<Arc<dyn DeviceMemory>> {
    Ok(match dtype {
        DType::F32 => upload_as::<B, f32>(b, t, name)?,
        DType::F16 => upload_as::<B, half::f16>(b, t, name)?,
        DType::BF16 => upload_as::<B, half::bf16>(b, t, name)?,
    })
}

/// Device memory a layer or adapter holds, with where it lies read once (on CUDA, asking a
/// `CudaSlice` for its address records a cudarc event: not something to do per call).
struct Held {
    info: MemoryInfo,
    _mem: Arc<dyn DeviceMemory>,
}

impl Held {
    fn new(mem: Arc<dyn DeviceMemory>) -> Held {
        Held {
            info: mem.info(),
            _mem: mem,
        }
    }

    fn info(&self) -> MemoryInfo {
        self.info
    }
}

static NEXT_LINEAR_ID: AtomicU64 = AtomicU64::new(1);

/// Where [`DoraLinear::forward`] gets the base layer's result `x·W0ᵀ` (PEFT's `base_result`,
/// without the bias: the layer adds the bias after the DoRA scale, as PEFT does).
pub enum BaseResult<'a, T: Elem> {
    /// Computed by the layer with the backend's GEMM (cuBLAS on CUDA) straight into y; x must
    /// be contiguous.
    Compute,
    /// Computed by the engine, `[t, d_out]` (any row stride); read, never written. It may not
    /// overlap y: to finish the engine's buffer in place, use [`BaseResult::InPlace`].
    Given(DevView<'a, T>),
    /// y already holds the base result (e.g. the q, k or v columns of the engine's fused QKV
    /// GEMM output) and is finished in place.
    InPlace,
}

/// One frozen linear module on one backend (see the module doc): W0 `[d_out, d_in]` (or
/// `[d_in, d_out]` with `fan_in_fan_out`) in the layer dtype (f32, f16 or bf16), and an
/// optional bias `[d_out]` f32.
pub struct DoraLinear<B: Backend> {
    backend: Arc<B>,
    weight: Held,
    bias: Option<Held>,
    dtype: DType,
    fan_in_fan_out: bool,
    d_in: usize,
    d_out: usize,
    /// Identifies this layer to the g its adapters computed.
    id: u64,
    /// The owned workspace of [`DoraLinear::forward`] and its length (grown, never shrunk).
    workspace: Option<(B::Slice<f32>, usize)>,
}

impl<B: Backend> DoraLinear<B> {
    /// A layer over the engine's weights, bound to `backend` (its stream orders every call).
    /// W0 is `[d_out, d_in]` of `T`, or `[d_in, d_out]` with `fan_in_fan_out` (GPT-2 `Conv1D`);
    /// the bias `[d_out]` is f32. The backend's stream first waits for the last writes of both
    /// (cudarc's events); the weights must not change afterwards, or the adapters' g is stale.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput): empty dims, memory of
    /// another device, or a slice shorter than its shape, naming `weight` or `bias`.
    pub fn new<T: Elem>(
        backend: Arc<B>,
        weight: Arc<B::Slice<T>>,
        bias: Option<Arc<B::Slice<f32>>>,
        d_out: usize,
        d_in: usize,
        fan_in_fan_out: bool,
    ) -> Result<Self> {
        backend.wait_for_writes(&weight)?;
        if let Some(b) = &bias {
            backend.wait_for_writes(b)?;
        }
        Self::from_held(
            backend,
            weight,
            bias.map(|b| b as Arc<dyn DeviceMemory>),
            T::DTYPE,
            d_out,
            d_in,
            fan_in_fan_out,
        )
    }

    /// Uploads a host layer's W0 (in its own dtype) and bias (f32); the adapter part of `layer`
    /// is ignored (see [`DoraAdapter::upload`]).
    ///
    /// # Errors
    /// Inconsistent shapes (naming the tensor), or a device error.
    pub fn upload(backend: Arc<B>, layer: &Layer) -> Result<Self> {
        let (d_in, d_out, _) = layer.dims()?;
        let dtype = layer.weight.dtype();
        let weight = upload_erased(&*backend, &layer.weight, dtype, "weight")?;
        let bias = layer
            .bias
            .as_ref()
            .map(|b| upload_erased(&*backend, b, DType::F32, "bias"))
            .transpose()?;
        Self::from_held(
            backend,
            weight,
            bias,
            dtype,
            d_out,
            d_in,
            layer.fan_in_fan_out,
        )
    }

    fn from_held(
        backend: Arc<B>,
        weight: Arc<dyn DeviceMemory>,
        bias: Option<Arc<dyn DeviceMemory>>,
        dtype: DType,
        d_out: usize,
        d_in: usize,
        fan_in_fan_out: bool,
    ) -> Result<Self> {
        ensure_input!(
            d_in >= 1 && d_out >= 1,
            "weight: dims d_out={d_out}, d_in={d_in} must be ≥ 1"
        );
        let dev = backend.device();
        let weight = Held::new(weight);
        let bias = bias.map(Held::new);
        check_held(
            "weight",
            &weight.info(),
            dev,
            dtype,
            elems("weight", d_out, d_in)?,
        )?;
        if let Some(b) = &bias {
            check_held("bias", &b.info(), dev, DType::F32, d_out)?;
        }
        Ok(Self {
            backend,
            weight,
            bias,
            dtype,
            fan_in_fan_out,
            d_in,
            d_out,
            id: NEXT_LINEAR_ID.fetch_add(1, Ordering::Relaxed),
            workspace: None,
        })
    }

    /// The backend (stream) every call is ordered on.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The layer dtype (W0's; x, y and a given base result share it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Input features.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output features.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// f32 elements of workspace a forward of up to `max_tokens` tokens with an adapter of
    /// rank up to `r` needs (the shrink's partial products `U`, split over d_in at decode
    /// sizes; the split count depends on T and r, so the need is the largest over every
    /// `T ≤ max_tokens` and rank `≤ r`). Allocate it once for the largest batch and rank the
    /// engine serves.
    pub fn workspace_len(&self, max_tokens: usize, r: usize) -> usize {
        (1..=max_tokens)
            .flat_map(|t| (1..=r).map(move |rank| (t, rank)))
            .map(|(t, rank)| self.workspace_need(t, rank))
            .max()
            .unwrap_or(1)
    }

    /// f32 elements of workspace one forward of `t` tokens with a rank-`r` adapter uses (what
    /// a call checks; [`DoraLinear::workspace_len`] plans for every call up to a size).
    fn workspace_need(&self, t: usize, r: usize) -> usize {
        (launch::shrink_splits(t, r, self.d_in, true).0 * t * r).max(1)
    }

    /// The weights as the launchers take them, with `adapter`'s factors.
    fn weights(&self, a: &DoraAdapter<B>) -> DoraWeights<'_> {
        let raw = |m: &MemoryInfo, len: usize| {
            // SAFETY: `m` describes memory held by `self` or `a` (an Arc'd DeviceMemory, which
            // guarantees it stays allocated on this device), checked at construction to hold
            // `len` elements of its dtype; the view is used only while both are borrowed.
            unsafe { DevTensor::from_raw(m.ptr, len * m.dtype.size(), m.dtype) }
        };
        DoraWeights {
            weight: raw(&self.weight.info(), self.d_out * self.d_in),
            fan_in_fan_out: self.fan_in_fan_out,
            bias: self.bias.as_ref().map(|b| raw(&b.info(), self.d_out)),
            lora_a: raw(&a.lora_a.info(), a.r * a.d_in),
            lora_b: raw(&a.lora_b.info(), a.d_out * a.r),
            magnitude: a.magnitude.as_ref().map(|m| raw(&m.info(), a.d_out)),
            scaling: a.scaling,
            d_in: self.d_in,
            d_out: self.d_out,
            r: a.r,
        }
    }

    /// Every tensor the layer and `a` hold, for the overlap checks of outputs.
    fn held_spans(&self, a: &DoraAdapter<B>) -> Vec<(&'static str, Checked)> {
        let mut v = vec![
            ("weight", span(&self.weight.info(), self.d_out * self.d_in)),
            ("lora_A", span(&a.lora_a.info(), a.r * a.d_in)),
            ("lora_B", span(&a.lora_b.info(), a.d_out * a.r)),
        ];
        if let Some(b) = &self.bias {
            v.push(("bias", span(&b.info(), self.d_out)));
        }
        if let Some(m) = &a.magnitude {
            v.push(("magnitude", span(&m.info(), a.d_out)));
        }
        if let Some(s) = &a.scale {
            v.push(("g", span(&s.info, 2 * a.d_out)));
        }
        v
    }

    /// Checks that `adapter` fits this layer and, for DoRA, that its g was computed for it.
    fn check_adapter(&self, a: &DoraAdapter<B>) -> Result<Option<DevPtr>> {
        ensure_input!(
            a.device == self.backend.device(),
            "adapter: uploaded to {}, but the layer runs on {}",
            a.device,
            self.backend.device()
        );
        ensure_input!(
            a.d_in == self.d_in && a.d_out == self.d_out,
            "adapter: lora_A/lora_B for d_in={}, d_out={}, but the layer is d_in={}, d_out={}",
            a.d_in,
            a.d_out,
            self.d_in,
            self.d_out
        );
        ensure_input!(
            super::spec::suffix(self.dtype, a.dtype).is_some(),
            "adapter: lora_A is {} beside a {} weight; adapters must be {}",
            a.dtype,
            self.dtype,
            super::spec::adapter_dtypes(self.dtype)
        );
        if a.magnitude.is_none() {
            return Ok(None);
        }
        match &a.scale {
            Some(s) if s.linear == self.id => Ok(Some(s.info.ptr.offset(4 * a.d_out))),
            Some(_) => invalid!(
                "adapter: its g was computed for another layer; call compute_scale with this one"
            ),
            None => invalid!("adapter: g not computed; call DoraAdapter::compute_scale at load"),
        }
    }

    /// `y = x·W0ᵀ`, the base result alone (no adapter, no bias), with the backend's GEMM: what
    /// an engine's own GEMM computes before [`BaseResult::InPlace`]. x `[t, d_in]`
    /// contiguous, y `[t, d_out]` (any row stride).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) naming `x` or `y`, or
    /// a GEMM failure.
    pub fn base_product<T: Elem>(&self, x: &DevView<T>, y: &mut DevViewMut<T>) -> Result<()> {
        let (dev, t) = (self.backend.device(), x.shape().rows);
        self.check_dtype::<T>()?;
        ensure_input!(t >= 1, "x: at least one token is needed");
        let xc = x.check("x", dev, t, self.d_in)?;
        ensure_input!(
            xc.ld == self.d_in,
            "x: must be contiguous (row stride {}, d_in {})",
            xc.ld,
            self.d_in
        );
        let yc = y.check("y", dev, t, self.d_out)?;
        check_disjoint("y", &yc, "x", &xc)?;
        check_disjoint(
            "y",
            &yc,
            "weight",
            &span(&self.weight.info(), self.d_out * self.d_in),
        )?;
        let w = self.weight.info();
        // SAFETY: W0 held by self and checked at construction (see `weights`).
        let weight = unsafe {
            DevTensor::from_raw(
                w.ptr,
                self.d_out * self.d_in * self.dtype.size(),
                self.dtype,
            )
        };
        let dw = DoraWeights {
            weight,
            fan_in_fan_out: self.fan_in_fan_out,
            bias: None,
            lora_a: weight,
            lora_b: weight,
            magnitude: None,
            scaling: 0.0,
            d_in: self.d_in,
            d_out: self.d_out,
            r: 1,
        };
        base_gemm(&*self.backend, &dw, xc.ptr, t, yc.ptr, yc.ld)
    }

    fn check_dtype<T: Elem>(&self) -> Result<()> {
        ensure_input!(
            T::DTYPE == self.dtype,
            "x: {} activations for a layer whose weight is {}",
            T::DTYPE,
            self.dtype
        );
        Ok(())
    }

    /// The DoRA forward `y = g ⊙ (base + s·(x·Aᵀ)·Bᵀ) + bias` (plain LoRA: g = 1) with
    /// `adapter`'s precomputed g and the caller's `workspace` (at least
    /// [`DoraLinear::workspace_len`]`(t, r)` f32 elements). x `[t, d_in]`, y `[t, d_out]`; both
    /// may be column slices of wider matrices (row strides). Three launches at most (GEMM,
    /// shrink, compose), all on the layer's stream; nothing synchronises or allocates.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput), one line naming the
    /// tensor: a dtype other than the layer's, a view of another device, a wrong shape, a view
    /// too short for its shape, a misaligned address, an output (`y`, `workspace`)
    /// overlapping an input or a weight, an adapter that does not fit or whose g is missing;
    /// or [`ErrorKind::Launch`](crate::error::ErrorKind::Launch) naming the kernel.
    pub fn forward_with_workspace<T: Elem>(
        &self,
        adapter: &DoraAdapter<B>,
        x: &DevView<T>,
        base: BaseResult<T>,
        y: &mut DevViewMut<T>,
        workspace: &mut DevViewMut<f32>,
    ) -> Result<()> {
        let (dev, t, r) = (self.backend.device(), x.shape().rows, adapter.r);
        self.check_dtype::<T>()?;
        let g = self.check_adapter(adapter)?;
        ensure_input!(t >= 1, "x: at least one token is needed");
        let xc = x.check("x", dev, t, self.d_in)?;
        let yc = y.check("y", dev, t, self.d_out)?;
        let need = self.workspace_need(t, r);
        let wsm = workspace.memory();
        let wc = check_memory("workspace", &wsm, MatShape::new(1, need), dev, 1, need)
            .context("workspace: see DoraLinear::workspace_len")?;
        let bc = match &base {
            BaseResult::Given(v) => Some(v.check("base", dev, t, self.d_out)?),
            _ => None,
        };
        check_disjoint("y", &yc, "x", &xc)?;
        check_disjoint("workspace", &wc, "x", &xc)?;
        check_disjoint("workspace", &wc, "y", &yc)?;
        if let Some(bc) = &bc {
            check_disjoint("y", &yc, "base", bc)?;
            check_disjoint("workspace", &wc, "base", bc)?;
        }
        for (name, h) in self.held_spans(adapter) {
            check_disjoint("y", &yc, name, &h)?;
            check_disjoint("workspace", &wc, name, &h)?;
        }
        let w = self.weights(adapter);
        let b = &*self.backend;
        let (base_p, ld_base) = match base {
            BaseResult::Compute => {
                ensure_input!(
                    xc.ld == self.d_in,
                    "x: must be contiguous to compute the base result (row stride {}, d_in {})",
                    xc.ld,
                    self.d_in
                );
                base_gemm(b, &w, xc.ptr, t, yc.ptr, yc.ld)?;
                (yc.ptr, yc.ld)
            }
            BaseResult::InPlace => (yc.ptr, yc.ld),
            BaseResult::Given(_) => {
                let bc = bc.expect("checked above");
                (bc.ptr, bc.ld)
            }
        };
        shrink_and_compose(
            b,
            &w,
            FwdIo {
                x: xc.ptr,
                ldx: xc.ld,
                t,
                u: wc.ptr,
                split_k: true,
                u_part: None,
                base: base_p,
                ld_base,
                y: yc.ptr,
                ld_y: yc.ld,
                g,
            },
        )
    }

    /// [`DoraLinear::forward_with_workspace`] with a workspace the layer owns, grown at the
    /// first call at a new largest token count (the only allocation), never shrunk.
    ///
    /// # Errors
    /// As [`DoraLinear::forward_with_workspace`], or an allocation failure.
    pub fn forward<T: Elem>(
        &mut self,
        adapter: &DoraAdapter<B>,
        x: &DevView<T>,
        base: BaseResult<T>,
        y: &mut DevViewMut<T>,
    ) -> Result<()> {
        let (t, r) = (x.shape().rows.max(1), adapter.r);
        // The exact need on every call; the plan for every call up to this size (a loop over
        // T and r) only when the workspace grows.
        let (mut ws, len) = match self.workspace.take() {
            Some((w, len)) if len >= self.workspace_need(t, r) => (w, len),
            _ => {
                let plan = self.workspace_len(t, r);
                let w = (self.backend.alloc_slice::<f32>(plan))
                    .context("allocating the forward workspace")?;
                (w, plan)
            }
        };
        let r = {
            let backend = self.backend.clone();
            let mut view = backend.view_mut(&mut ws, MatShape::new(1, len));
            self.forward_with_workspace(adapter, x, base, y, &mut view)
        };
        self.workspace = Some((ws, len));
        r
    }

    /// f32 elements of the owned workspace (0 before the first [`DoraLinear::forward`]).
    pub fn owned_workspace_len(&self) -> usize {
        self.workspace.as_ref().map_or(0, |w| w.1)
    }

    /// This layer's identity (which g an adapter computed for it) and its bias address.
    pub(crate) fn pool_parts(&self) -> (u64, Option<DevPtr>) {
        (self.id, self.bias.as_ref().map(|b| b.info().ptr))
    }
}

/// What an adapter pool's slot table needs of a [`DoraAdapter`].
pub(crate) struct SlotParts {
    pub lora_a: DevPtr,
    pub lora_b: DevPtr,
    /// g's address and the layer it was computed for (DoRA with g computed).
    pub g: Option<(DevPtr, u64)>,
    pub dora: bool,
    pub dtype: DType,
    pub r: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub device: DeviceId,
    pub scaling: f32,
}

/// n then g `[2, d_out]` f32 on the device, for the layer `linear`.
struct Scale<B: Backend> {
    mem: B::Slice<f32>,
    info: MemoryInfo,
    linear: u64,
}

/// One module's adapter on the device (see the module doc): lora_A `[r, d_in]` and lora_B
/// `[d_out, r]` in the layer dtype or f32 (PEFT's default beside 16-bit weights), the
/// magnitude `[d_out]` f32 (absent: plain LoRA), the scaling s, and g once computed.
pub struct DoraAdapter<B: Backend> {
    lora_a: Held,
    lora_b: Held,
    magnitude: Option<Held>,
    scaling: f32,
    dtype: DType,
    r: usize,
    d_in: usize,
    d_out: usize,
    device: DeviceId,
    scale: Option<Scale<B>>,
}

impl<B: Backend> DoraAdapter<B> {
    /// An adapter over the engine's device tensors (held through their `Arc`s). `backend`'s
    /// stream first waits for their last writes.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::error::ErrorKind::InvalidInput) naming `lora_A`,
    /// `lora_B` or `magnitude`: a rank outside 1..=256, a non-finite scaling, memory of another
    /// device, or a slice shorter than its shape.
    #[allow(clippy::too_many_arguments)]
    pub fn new<T: Elem>(
        backend: &B,
        lora_a: Arc<B::Slice<T>>,
        lora_b: Arc<B::Slice<T>>,
        magnitude: Option<Arc<B::Slice<f32>>>,
        scaling: f32,
        r: usize,
        d_in: usize,
        d_out: usize,
    ) -> Result<Self> {
        backend.wait_for_writes(&lora_a)?;
        backend.wait_for_writes(&lora_b)?;
        if let Some(m) = &magnitude {
            backend.wait_for_writes(m)?;
        }
        Self::from_held(
            backend,
            lora_a,
            lora_b,
            magnitude.map(|m| m as Arc<dyn DeviceMemory>),
            T::DTYPE,
            scaling,
            (r, d_in, d_out),
        )
    }

    /// Uploads one module of a PEFT adapter ([`crate::adapter::Adapter::load`]): lora_A and
    /// lora_B cast to `dtype` (f32, as PEFT holds them by default, or the layer dtype), the
    /// magnitude in f32, the module's scaling.
    ///
    /// # Errors
    /// Inconsistent shapes (naming the module), or a device error.
    pub fn upload(backend: &B, module: &AdapterModule, dtype: DType) -> Result<Self> {
        let ctx = || format!("adapter module {}", module.name);
        let (d_in, d_out, r) = module.checked_dims().with_context(ctx)?;
        let a = upload_erased(backend, &module.lora_a, dtype, "lora_A").with_context(ctx)?;
        let b = upload_erased(backend, &module.lora_b, dtype, "lora_B").with_context(ctx)?;
        let m = module
            .magnitude
            .as_ref()
            .map(|m| upload_erased(backend, m, DType::F32, "magnitude"))
            .transpose()
            .with_context(ctx)?;
        Self::from_held(
            backend,
            a,
            b,
            m,
            dtype,
            module.scaling as f32,
            (r, d_in, d_out),
        )
        .with_context(ctx)
    }

    fn from_held(
        backend: &B,
        lora_a: Arc<dyn DeviceMemory>,
        lora_b: Arc<dyn DeviceMemory>,
        magnitude: Option<Arc<dyn DeviceMemory>>,
        dtype: DType,
        scaling: f32,
        (r, d_in, d_out): (usize, usize, usize),
    ) -> Result<Self> {
        ensure_input!(
            (1..=super::spec::MAX_RANK).contains(&r),
            "lora_A: rank {r} outside 1..={}",
            super::spec::MAX_RANK
        );
        ensure_input!(scaling.is_finite(), "scaling {scaling} is not finite");
        ensure_input!(
            d_in >= 1 && d_out >= 1,
            "lora_A/lora_B: empty dims d_in={d_in}, d_out={d_out}"
        );
        let dev = backend.device();
        let (lora_a, lora_b) = (Held::new(lora_a), Held::new(lora_b));
        let magnitude = magnitude.map(Held::new);
        check_held(
            "lora_A",
            &lora_a.info(),
            dev,
            dtype,
            elems("lora_A", r, d_in)?,
        )?;
        check_held(
            "lora_B",
            &lora_b.info(),
            dev,
            dtype,
            elems("lora_B", d_out, r)?,
        )?;
        if let Some(m) = &magnitude {
            check_held("magnitude", &m.info(), dev, DType::F32, d_out)?;
        }
        Ok(Self {
            lora_a,
            lora_b,
            magnitude,
            scaling,
            dtype,
            r,
            d_in,
            d_out,
            device: dev,
            scale: None,
        })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The scaling s.
    pub fn scaling(&self) -> f32 {
        self.scaling
    }

    /// True for DoRA (a magnitude is present), false for plain LoRA.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// f32 elements [`DoraAdapter::compute_scale_into`] needs: n then g, `2·d_out`.
    pub fn scale_len(&self) -> usize {
        2 * self.d_out
    }

    /// Computes `n = ‖W0 + s·B·A‖` (row-wise) and `g = m / max(n, ε)` for `linear`'s W0 with
    /// the norm kernel on `linear`'s stream (`B·A` is built tile by tile in registers, never in
    /// memory), into memory this adapter allocates once. Forwards with `linear` then use it
    /// until it is recomputed. Plain LoRA has no g: nothing is done. Stream-ordered: a forward
    /// queued after it on the same stream sees g.
    ///
    /// # Errors
    /// An adapter that does not fit the layer (naming the tensor), or a launch failure.
    pub fn compute_scale(&mut self, linear: &DoraLinear<B>) -> Result<()> {
        let stream = linear.backend.clone();
        self.compute_scale_on(linear, &stream)
    }

    /// [`DoraAdapter::compute_scale`] on `stream` instead of `linear`'s: a side stream of the
    /// same device (an adapter pool loads adapters there, so serving on `linear`'s stream never
    /// waits for a load). A forward on another stream must be ordered after it (an event).
    ///
    /// # Errors
    /// As [`DoraAdapter::compute_scale`], or `stream` on another device.
    pub fn compute_scale_on(&mut self, linear: &DoraLinear<B>, stream: &B) -> Result<()> {
        if self.magnitude.is_none() {
            return Ok(());
        }
        let mem = match self.scale.take() {
            Some(s) => s.mem,
            None => stream
                .alloc_slice::<f32>(self.scale_len())
                .context("allocating n and g")?,
        };
        self.compute_scale_into_on(linear, mem, stream)
    }

    /// [`DoraAdapter::compute_scale`] into `memory` the caller supplies (at least
    /// [`DoraAdapter::scale_len`] f32 elements: n, then g), which the adapter keeps until
    /// [`DoraAdapter::take_scale_memory`].
    ///
    /// # Errors
    /// `memory` of another device or too short (naming `g`), an adapter that does not fit the
    /// layer, or a launch failure.
    pub fn compute_scale_into(
        &mut self,
        linear: &DoraLinear<B>,
        memory: B::Slice<f32>,
    ) -> Result<()> {
        let stream = linear.backend.clone();
        self.compute_scale_into_on(linear, memory, &stream)
    }

    fn compute_scale_into_on(
        &mut self,
        linear: &DoraLinear<B>,
        memory: B::Slice<f32>,
        stream: &B,
    ) -> Result<()> {
        self.scale = None;
        let dev = linear.backend.device();
        ensure_input!(
            stream.device() == dev,
            "g: stream of {}, but the layer runs on {dev}",
            stream.device()
        );
        let info = memory.info();
        check_held("g", &info, dev, DType::F32, self.scale_len())?;
        // The norm reads what it is given: check the adapter against the layer first.
        ensure_input!(
            self.device == dev,
            "adapter: uploaded to {}, but the layer runs on {dev}",
            self.device
        );
        ensure_input!(
            self.d_in == linear.d_in && self.d_out == linear.d_out,
            "adapter: lora_A/lora_B for d_in={}, d_out={}, but the layer is d_in={}, d_out={}",
            self.d_in,
            self.d_out,
            linear.d_in,
            linear.d_out
        );
        let gs = span(&info, self.scale_len());
        for (name, h) in linear.held_spans(self) {
            check_disjoint("g", &gs, name, &h)?;
        }
        let Some(m) = &self.magnitude else {
            self.scale = Some(Scale {
                mem: memory,
                info,
                linear: linear.id,
            });
            return Ok(());
        };
        let w = linear.weights(self);
        ensure_input!(
            super::spec::suffix(w.dtype(), self.dtype).is_some(),
            "lora_A: dtype {} beside a {} weight; adapters must be {}",
            self.dtype,
            w.dtype(),
            super::spec::adapter_dtypes(w.dtype())
        );
        let n_out = info.ptr;
        // The partial sums of the norm split over d_in (the tuned launch), sized by the same
        // spec function the launcher checks; allocated on `stream` and dropped after the
        // launches are queued (stream-ordered free), so the adapter keeps only n and g.
        let part = stream
            .alloc_slice::<f32>(super::spec::norm_partials_len(self.d_out, self.d_in))
            .context("allocating the norm's partial sums")?;
        let args = launch::NormArgs {
            dtype: w.dtype(),
            adapter: self.dtype,
            w0: w.weight.ptr(),
            fan_in_fan_out: w.fan_in_fan_out,
            a: w.lora_a.ptr(),
            b: w.lora_b.ptr(),
            m: Some(m.info().ptr),
            s: self.scaling,
            d_out: self.d_out,
            d_in: self.d_in,
            r: self.r,
            n_out,
            g_out: Some(n_out.offset(4 * self.d_out)),
            part: Some(part.info().ptr),
        };
        // SAFETY: W0, A, B and m are held by `linear` and `self`, checked at construction for
        // these dims and dtypes on this device; `memory` holds 2·d_out f32 (checked above) and
        // overlaps none of them; `part` holds norm_partials_len f32 on this device, freshly
        // allocated (disjoint from all), and is freed on `stream` after the launches.
        unsafe { launch::norm(stream, &args, None) }?;
        self.scale = Some(Scale {
            mem: memory,
            info,
            linear: linear.id,
        });
        Ok(())
    }

    /// The addresses and facts an adapter pool's slot table needs.
    pub(crate) fn slot_parts(&self) -> SlotParts {
        SlotParts {
            lora_a: self.lora_a.info().ptr,
            lora_b: self.lora_b.info().ptr,
            g: self
                .scale
                .as_ref()
                .map(|s| (s.info.ptr.offset(4 * self.d_out), s.linear)),
            dora: self.magnitude.is_some(),
            dtype: self.dtype,
            r: self.r,
            d_in: self.d_in,
            d_out: self.d_out,
            device: self.device,
            scaling: self.scaling,
        }
    }

    /// n then g (`[2, d_out]` f32) once computed, for callers that read them.
    pub fn scale_memory(&self) -> Option<&B::Slice<f32>> {
        self.scale.as_ref().map(|s| &s.mem)
    }

    /// Gives back the memory holding n and g; the adapter needs [`DoraAdapter::compute_scale`]
    /// again before its next DoRA forward.
    pub fn take_scale_memory(&mut self) -> Option<B::Slice<f32>> {
        self.scale.take().map(|s| s.mem)
    }
}

/// The host tensor of a backend slice's elements (tests and examples compare with the CPU
/// path through it).
///
/// # Errors
/// A device error.
pub fn download_tensor<B: Backend, T: Elem>(
    b: &B,
    slice: &B::Slice<T>,
    shape: Vec<usize>,
) -> Result<Tensor> {
    let v = b.download_slice(slice)?;
    let n: usize = shape.iter().product();
    ensure_input!(
        v.len() >= n,
        "download: {} elements for shape {shape:?}",
        v.len()
    );
    Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(&v[..n]))
}
