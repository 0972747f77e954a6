//! The device-level API over borrowed device buffers: a DoRA/LoRA layer for training loops
//! (and a simple inference forward). Inference engines use [`super::DoraLinear`] and
//! [`super::DoraAdapter`] instead (owned weights, g per adapter, typed checked views, caller
//! workspace; docs/engine.md). Everything is ordered on the backend's stream; nothing here
//! synchronises with the host or allocates once the workspaces have grown to the largest call
//! seen.
//!
//! Dtypes: W0, x, base, y, dy and grad_x share the layer dtype (f32, f16 or bf16); A and B
//! are in the layer dtype or in f32 (PEFT's default beside a 16-bit base: read as stored);
//! m, bias, n, g and the parameter gradients (grad_A, grad_B, grad_m) are f32, accumulated in
//! f32 (cast them where the optimiser wants another dtype).
//!
//! Typical use:
//! - inference: [`DoraLayer::new`] once per layer; per call [`DoraLayer::forward`] (or
//!   [`DoraLayer::forward_rows`] to finish a column slice of a fused QKV output in place);
//!   g is computed at the first call and reused until [`DoraLayer::set_adapter`] or
//!   [`DoraLayer::invalidate`];
//! - training: [`DoraLayer::forward_train`] then [`DoraLayer::backward`] per step, and
//!   [`DoraLayer::invalidate`] after the optimiser has updated A, B, m in place.
//!
//! The only allocations are workspace growth (the first call at a new largest size); a
//! workspace is freed and reallocated only then, never in the steady state.

use super::launch::{self, weight_strides};
use super::spec;
use crate::backend::{Backend, DevPtr, DeviceBuffer};
use crate::dtype::DType;
use crate::error::ensure_input;
use crate::layer::GradMode;
use anyhow::{ensure, Context, Result};
use std::marker::PhantomData;

/// Bytes of an f32 element (n, g, U, partials and the other f32 workspaces).
const F32_BYTES: usize = std::mem::size_of::<f32>();
/// Alignment of every region carved out of a workspace, and the smallest workspace
/// allocated: 256 bytes, the alignment `cudaMalloc` guarantees, so every region is as
/// aligned as a fresh allocation (16-byte vector loads included).
const WORKSPACE_ALIGN: usize = 256;

/// A typed view of device memory: an address, a length in bytes and a dtype, borrowed for
/// `'a`. Device memory is written through shared views (as with any device pointer); the
/// borrow only keeps the memory alive.
#[derive(Debug, Clone, Copy)]
pub struct DevTensor<'a> {
    ptr: DevPtr,
    bytes: usize,
    dtype: DType,
    _mem: PhantomData<&'a ()>,
}

impl<'a> DevTensor<'a> {
    /// Views a whole backend buffer as elements of `dtype`.
    pub fn of<D: DeviceBuffer>(buf: &'a D, dtype: DType) -> Self {
        Self {
            ptr: buf.ptr(),
            bytes: buf.bytes(),
            dtype,
            _mem: PhantomData,
        }
    }

    /// Views memory the caller owns elsewhere (an engine's arena, a slice of a fused QKV
    /// output).
    ///
    /// # Safety
    /// `ptr..ptr+bytes` must be device memory of the backend it is used with, valid for reads
    /// and writes for all of `'a`.
    pub unsafe fn from_raw(ptr: DevPtr, bytes: usize, dtype: DType) -> Self {
        Self {
            ptr,
            bytes,
            dtype,
            _mem: PhantomData,
        }
    }

    /// Elements `start..start+len` of this view.
    ///
    /// # Errors
    /// The range does not fit the view.
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        let sz = self.dtype.size();
        let end = start.checked_add(len);
        ensure!(
            end.and_then(|e| e.checked_mul(sz))
                .is_some_and(|b| b <= self.bytes),
            "slice {start}..{} of a {}-element {} view",
            end.map_or("(overflow)".into(), |e| e.to_string()),
            self.bytes / sz,
            self.dtype
        );
        Ok(Self {
            ptr: self.ptr.offset(start * sz),
            bytes: len * sz,
            dtype: self.dtype,
            _mem: PhantomData,
        })
    }

    /// The device address.
    pub fn ptr(&self) -> DevPtr {
        self.ptr
    }

    /// The length in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The element dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Checks a `[rows, cols]` matrix whose rows are `ld` elements apart (`ld ≥ cols`).
    fn check_rows(
        &self,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
    ) -> Result<DevPtr> {
        ensure_input!(
            ld >= cols,
            "{name}: row stride {ld} below its {cols} columns"
        );
        let span = (rows - 1) * ld + cols;
        self.check(name, dtype, &[span])
            .with_context(|| format!("{name} as [{rows}, {cols}] with row stride {ld}"))
    }

    /// Checks dtype, length (`shape` elements at least) and alignment, naming `name`.
    fn check(&self, name: &str, dtype: DType, shape: &[usize]) -> Result<DevPtr> {
        let n: usize = shape.iter().product();
        ensure_input!(
            self.dtype == dtype,
            "{name}: dtype {}, expected {dtype}",
            self.dtype
        );
        ensure_input!(
            self.bytes >= n * dtype.size(),
            "{name}: {} bytes, too small for {shape:?} {dtype} ({} bytes)",
            self.bytes,
            n * dtype.size()
        );
        ensure_input!(
            self.ptr.0 % dtype.size() as u64 == 0,
            "{name}: address {:#x} not aligned to its {dtype} elements",
            self.ptr.0
        );
        ensure_input!(self.ptr.0 != 0, "{name}: null device address");
        Ok(self.ptr)
    }
}

/// A layer's parameters on the device.
#[derive(Debug, Clone, Copy)]
pub struct DoraWeights<'w> {
    /// W0 `[d_out, d_in]`, or `[d_in, d_out]` when `fan_in_fan_out`, in the layer dtype.
    pub weight: DevTensor<'w>,
    /// W0 is stored `[d_in, d_out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// Optional bias `[d_out]` f32 (never scaled by g).
    pub bias: Option<DevTensor<'w>>,
    /// A `[r, d_in]`, in the layer dtype or f32 (with 16-bit layers: PEFT's default mix).
    pub lora_a: DevTensor<'w>,
    /// B `[d_out, r]`, in the same dtype as A.
    pub lora_b: DevTensor<'w>,
    /// m `[d_out]` f32; `None` for plain LoRA.
    pub magnitude: Option<DevTensor<'w>>,
    /// s.
    pub scaling: f32,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
}

impl DoraWeights<'_> {
    /// The layer dtype (W0's).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The adapter dtype (A's and B's): the layer dtype, or f32.
    pub fn adapter_dtype(&self) -> DType {
        self.lora_a.dtype()
    }

    /// Checks every tensor's dtype, length and alignment against the dims.
    ///
    /// # Errors
    /// The first mismatch, naming the tensor.
    pub fn validate(&self) -> Result<()> {
        let (d_in, d_out, r, dt) = (self.d_in, self.d_out, self.r, self.dtype());
        ensure_input!(
            d_in >= 1 && d_out >= 1,
            "layer dims d_in={d_in}, d_out={d_out} must be ≥ 1"
        );
        ensure_input!(
            (1..=super::spec::MAX_RANK).contains(&r),
            "rank {r} outside 1..={}",
            super::spec::MAX_RANK
        );
        ensure_input!(
            self.scaling.is_finite(),
            "scaling {} is not finite",
            self.scaling
        );
        let wshape = if self.fan_in_fan_out {
            [d_in, d_out]
        } else {
            [d_out, d_in]
        };
        self.weight.check("weight", dt, &wshape)?;
        let ad = self.adapter_dtype();
        ensure_input!(
            super::spec::suffix(dt, ad).is_some(),
            "lora_A: dtype {ad} beside a {dt} weight; adapters must be {}",
            super::spec::adapter_dtypes(dt)
        );
        self.lora_a.check("lora_A", ad, &[r, d_in])?;
        self.lora_b.check("lora_B", ad, &[d_out, r])?;
        if let Some(m) = &self.magnitude {
            m.check("magnitude", DType::F32, &[d_out])?;
        }
        if let Some(bias) = &self.bias {
            bias.check("bias", DType::F32, &[d_out])?;
        }
        Ok(())
    }
}

/// Where the base product `x·W0ᵀ` comes from.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// Computed here with the backend's GEMM (cuBLAS on CUDA).
    Compute,
    /// Supplied by the caller `[T, d_out]` contiguous, in the layer dtype.
    Supplied(DevTensor<'a>),
    /// Supplied as a column slice of a wider row-major buffer, rows `ld` elements apart:
    /// e.g. the q, k or v slice of a fused QKV GEMM's output (the view starts at the slice's
    /// first column). Read in place, never copied.
    Strided(DevTensor<'a>, usize),
    /// `y` already holds the base product and is overwritten (inference only).
    InPlace,
}

/// Where the backward writes its results.
#[derive(Debug, Clone, Copy)]
pub struct GradTargets<'a> {
    /// dL/dx `[T, d_in]` in the layer dtype.
    pub grad_x: DevTensor<'a>,
    /// dL/dA `[r, d_in]` f32.
    pub grad_lora_a: DevTensor<'a>,
    /// dL/dB `[d_out, r]` f32.
    pub grad_lora_b: DevTensor<'a>,
    /// dL/dm `[d_out]` f32 (DoRA only; must be `None` for plain LoRA).
    pub grad_magnitude: Option<DevTensor<'a>>,
}

/// A growable device scratch buffer: reallocated only when a call needs more than any call
/// before it, so the steady state allocates nothing.
struct Scratch<B: Backend> {
    buf: Option<B::Buffer>,
}

impl<B: Backend> Scratch<B> {
    fn new() -> Self {
        Self { buf: None }
    }

    /// Ensures `bytes` and returns the base address.
    fn ensure(&mut self, b: &B, bytes: usize, what: &str) -> Result<DevPtr> {
        let bytes = bytes.max(WORKSPACE_ALIGN);
        if self.buf.as_ref().map_or(true, |x| x.bytes() < bytes) {
            self.buf = None; // free first: the old contents are never needed across a grow
            self.buf = Some(
                b.alloc_zeroed(bytes)
                    .with_context(|| format!("allocating {bytes} bytes of {what} workspace"))?,
            );
        }
        Ok(self.buf.as_ref().map(|x| x.ptr()).expect("allocated above"))
    }

    fn bytes(&self) -> usize {
        self.buf.as_ref().map_or(0, |x| x.bytes())
    }
}

/// Carves [`WORKSPACE_ALIGN`]-byte-aligned regions out of one scratch buffer.
struct Carve {
    next: usize,
}

impl Carve {
    fn new() -> Self {
        Self { next: 0 }
    }
    fn take(&mut self, bytes: usize) -> usize {
        let at = self.next;
        self.next += bytes.div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN;
        at
    }
}

/// Device addresses of one forward (all checked by the caller).
pub(crate) struct FwdIo {
    pub x: DevPtr,
    /// Row stride of x (≥ d_in).
    pub ldx: usize,
    pub t: usize,
    pub u: DevPtr,
    /// U may stay as split-K slabs in `u` (compose sums them): inference.
    pub split_k: bool,
    /// With `split_k` false: where a split-K shrink writes its slabs
    /// ([`launch::shrink_splits`]`(t, r, d_in, true).0 · t · r` f32) before they are summed,
    /// in split order, into the one slab `u` that the backward reads (training). `None`: one
    /// unsplit shrink.
    pub u_part: Option<DevPtr>,
    pub base: DevPtr,
    pub ld_base: usize,
    pub y: DevPtr,
    pub ld_y: usize,
    pub g: Option<DevPtr>,
}

/// What `forward_train` left for `backward`.
#[derive(Debug, Clone, Copy)]
struct Saved {
    t: usize,
    base: DevPtr,
    u: DevPtr,
    version: u64,
}

/// One adapted linear layer on the device, with its workspaces and the cached magnitude
/// scale `g` (valid until the adapter changes: [`DoraLayer::set_adapter`] or
/// [`DoraLayer::invalidate`]).
pub struct DoraLayer<'w, B: Backend> {
    w: DoraWeights<'w>,
    version: u64,
    /// n `[d_out]` then g `[d_out]`, f32.
    scale: B::Buffer,
    scale_version: Option<u64>,
    act: Scratch<B>,
    scratch: Scratch<B>,
    exact: Scratch<B>,
    /// Partial sums of the norm split over d_in.
    norm_part: Scratch<B>,
    saved: Option<Saved>,
}

impl<'w, B: Backend> DoraLayer<'w, B> {
    /// Wraps device weights (validated) and allocates the g cache.
    ///
    /// # Errors
    /// Invalid weights (naming the tensor), or an allocation failure.
    pub fn new(b: &B, weights: DoraWeights<'w>) -> Result<Self> {
        weights.validate()?;
        let scale = b
            .alloc_zeroed(8 * weights.d_out)
            .context("allocating the n/g cache")?;
        Ok(Self {
            w: weights,
            version: 0,
            scale,
            scale_version: None,
            act: Scratch::new(),
            scratch: Scratch::new(),
            exact: Scratch::new(),
            norm_part: Scratch::new(),
            saved: None,
        })
    }

    /// The weights.
    pub fn weights(&self) -> &DoraWeights<'w> {
        &self.w
    }

    /// The adapter version: bumped by every change, compared with the cached g's.
    pub fn adapter_version(&self) -> u64 {
        self.version
    }

    /// Bytes of device workspace held now (g cache excluded).
    pub fn workspace_bytes(&self) -> usize {
        self.act.bytes() + self.scratch.bytes() + self.exact.bytes() + self.norm_part.bytes()
    }

    /// Swaps in another adapter for the same base weight (multi-adapter serving); the cached g
    /// is dropped.
    ///
    /// # Errors
    /// Shapes or dtypes that do not fit the layer, naming the tensor.
    pub fn set_adapter(
        &mut self,
        lora_a: DevTensor<'w>,
        lora_b: DevTensor<'w>,
        magnitude: Option<DevTensor<'w>>,
        scaling: f32,
    ) -> Result<()> {
        let mut w = self.w;
        w.lora_a = lora_a;
        w.lora_b = lora_b;
        w.magnitude = magnitude;
        w.scaling = scaling;
        w.validate()?;
        self.w = w;
        self.invalidate();
        Ok(())
    }

    /// Declares that the adapter's device memory changed in place (an optimiser step): the
    /// cached g is recomputed at the next inference forward.
    pub fn invalidate(&mut self) {
        self.version += 1;
        self.saved = None;
    }

    fn n_ptr(&self) -> DevPtr {
        self.scale.ptr()
    }

    fn g_ptr(&self) -> DevPtr {
        self.scale.ptr().offset(F32_BYTES * self.w.d_out)
    }

    /// Recomputes n (and g for DoRA) into the cache.
    fn compute_scale(&mut self, b: &B) -> Result<()> {
        let w = &self.w;
        let part_bytes = F32_BYTES * spec::norm_partials_len(w.d_out, w.d_in);
        let part = self.norm_part.ensure(b, part_bytes, "norm partials")?;
        let args = launch::NormArgs {
            dtype: w.dtype(),
            adapter: w.adapter_dtype(),
            w0: w.weight.ptr(),
            fan_in_fan_out: w.fan_in_fan_out,
            a: w.lora_a.ptr(),
            b: w.lora_b.ptr(),
            m: w.magnitude.map(|m| m.ptr()),
            s: w.scaling,
            d_out: w.d_out,
            d_in: w.d_in,
            r: w.r,
            n_out: self.n_ptr(),
            g_out: w.magnitude.map(|_| self.g_ptr()),
            part: Some(part),
        };
        // SAFETY: the weights were validated against (d_in, d_out, r) and the dtype; the
        // cache holds 2·d_out f32 (n, then g); part holds norm_partials_len f32.
        unsafe { launch::norm(b, &args, None) }?;
        self.scale_version = Some(self.version);
        Ok(())
    }

    /// g `[d_out]` f32 on the device, recomputed only when the adapter changed since the last
    /// computation; `None` for plain LoRA (g = 1). Stream-ordered: the address may be used by
    /// later work on the same stream at once.
    ///
    /// # Errors
    /// A launch failure.
    pub fn magnitude_scale(&mut self, b: &B) -> Result<Option<DevPtr>> {
        if self.w.magnitude.is_none() {
            return Ok(None);
        }
        if self.scale_version != Some(self.version) {
            self.compute_scale(b)?;
        }
        Ok(Some(self.g_ptr()))
    }

    fn check_x(&self, x: &DevTensor, t: usize) -> Result<DevPtr> {
        ensure_input!(t >= 1, "x: at least one token is needed");
        x.check("x", self.w.dtype(), &[t, self.w.d_in])
    }

    /// base = x·W0ᵀ into `c` (`[t, d_out]`, rows `ldc` apart).
    fn base_gemm(&self, b: &B, x: DevPtr, t: usize, c: DevPtr, ldc: usize) -> Result<()> {
        base_gemm(b, &self.w, x, t, c, ldc)
    }

    /// Inference forward `y = g ⊙ (base + s·(x·Aᵀ)·Bᵀ) + b` with the cached g (recomputed
    /// only after the adapter changed). `t` tokens; x `[t, d_in]`, y `[t, d_out]`
    /// contiguous. Three launches at most (GEMM, shrink, compose) once g is cached; with few
    /// tokens (decode) shrink splits d_in across blocks.
    ///
    /// # Errors
    /// Shape, dtype or alignment mismatches (naming the tensor), or a launch failure.
    pub fn forward(
        &mut self,
        b: &B,
        x: &DevTensor,
        t: usize,
        base: Base,
        y: &DevTensor,
    ) -> Result<()> {
        self.forward_rows(b, x, t, base, y, self.w.d_out)
    }

    /// [`DoraLayer::forward`] with y a column slice of a wider buffer, rows `ld_y` elements
    /// apart: with [`Base::InPlace`] and a fused QKV output, the engine's buffer is finished
    /// in place.
    ///
    /// # Errors
    /// As [`DoraLayer::forward`], or a row stride below d_out.
    pub fn forward_rows(
        &mut self,
        b: &B,
        x: &DevTensor,
        t: usize,
        base: Base,
        y: &DevTensor,
        ld_y: usize,
    ) -> Result<()> {
        let xp = self.check_x(x, t)?;
        let (d_in, d_out, r, dt) = (self.w.d_in, self.w.d_out, self.w.r, self.w.dtype());
        let yp = y.check_rows("y", dt, t, d_out, ld_y)?;
        let g = self.magnitude_scale(b)?;
        let (base_p, ld_base) = match base {
            Base::Compute => {
                self.base_gemm(b, xp, t, yp, ld_y)?;
                (yp, ld_y)
            }
            Base::InPlace => (yp, ld_y),
            Base::Supplied(bt) => (bt.check("base", dt, &[t, d_out])?, d_out),
            Base::Strided(bt, ld) => (bt.check_rows("base", dt, t, d_out, ld)?, ld),
        };
        let (splits, _) = launch::shrink_splits(t, r, d_in, true);
        let u = self
            .scratch
            .ensure(b, F32_BYTES * splits * t * r, "shrink")?;
        self.shrink_and_compose(
            b,
            FwdIo {
                x: xp,
                ldx: self.w.d_in,
                t,
                u,
                split_k: true,
                u_part: None,
                base: base_p,
                ld_base,
                y: yp,
                ld_y,
                g,
            },
        )
    }

    /// U = shrink(x, A) into `u`, then y = compose(base, U) with g (None: LoRA).
    fn shrink_and_compose(&self, b: &B, io: FwdIo) -> Result<()> {
        shrink_and_compose(b, &self.w, io)
    }

    /// Training forward: like [`DoraLayer::forward`] but g is recomputed (the adapter moves
    /// every step), and base and U are kept for [`DoraLayer::backward`]. A supplied base must
    /// stay unchanged until then. [`Base::InPlace`] is refused (the backward needs base).
    ///
    /// # Errors
    /// As [`DoraLayer::forward`], or an in-place base.
    pub fn forward_train(
        &mut self,
        b: &B,
        x: &DevTensor,
        t: usize,
        base: Base<'w>,
        y: &DevTensor,
    ) -> Result<()> {
        let xp = self.check_x(x, t)?;
        let (d_out, r, dt) = (self.w.d_out, self.w.r, self.w.dtype());
        let yp = y.check("y", dt, &[t, d_out])?;
        if self.w.magnitude.is_some() {
            self.compute_scale(b)?;
        }
        let g = self.w.magnitude.map(|_| self.g_ptr());
        let mut c = Carve::new();
        let u_off = c.take(F32_BYTES * t * r);
        // Split-K slabs of U (summed into u): a decode-sized T alone fills too few blocks.
        let (splits, _) = launch::shrink_splits(t, r, self.w.d_in, true);
        let part_off = (splits > 1).then(|| c.take(F32_BYTES * splits * t * r));
        let base_off = c.take(t * d_out * dt.size());
        let need_base = matches!(base, Base::Compute);
        let total = if need_base { c.next } else { base_off };
        let act = self.act.ensure(b, total, "training activation")?;
        let u = act.offset(u_off);
        let u_part = part_off.map(|o| act.offset(o));
        let base_p = match base {
            Base::Compute => {
                let p = act.offset(base_off);
                self.base_gemm(b, xp, t, p, d_out)?;
                p
            }
            Base::Supplied(bt) => bt.check("base", dt, &[t, d_out])?,
            Base::Strided(..) => anyhow::bail!("forward_train: a strided base is for inference; pass a contiguous Base::Supplied or Base::Compute"),
            Base::InPlace => anyhow::bail!("forward_train: an in-place base cannot be kept for the backward; use Base::Compute or Base::Supplied"),
        };
        self.shrink_and_compose(
            b,
            FwdIo {
                x: xp,
                ldx: self.w.d_in,
                t,
                u,
                split_k: false, // the backward reads U itself: one slab
                u_part,
                base: base_p,
                ld_base: d_out,
                y: yp,
                ld_y: d_out,
                g,
            },
        )?;
        self.saved = Some(Saved {
            t,
            base: base_p,
            u,
            version: self.version,
        });
        Ok(())
    }

    /// Backward of the last [`DoraLayer::forward_train`] (same x, same t, adapter unchanged):
    /// grad_x, grad_A, grad_B (and grad_m for DoRA), detached or exact (docs/design.md §1).
    /// Deterministic: the same inputs give the same bits.
    ///
    /// # Errors
    /// No matching forward_train, shape/dtype mismatches naming the tensor, or a launch
    /// failure.
    pub fn backward(
        &mut self,
        b: &B,
        x: &DevTensor,
        dy: &DevTensor,
        grads: &GradTargets,
        mode: GradMode,
    ) -> Result<()> {
        let saved = self
            .saved
            .filter(|s| s.version == self.version)
            .context("backward: no forward_train since the adapter last changed")?;
        let t = saved.t;
        let w = self.w;
        let (d_in, d_out, r, dt, s) = (w.d_in, w.d_out, w.r, w.dtype(), w.scaling);
        let xp = self.check_x(x, t)?;
        let dyp = dy.check("grad_y", dt, &[t, d_out])?;
        let gx = grads.grad_x.check("grad_x", dt, &[t, d_in])?;
        let ga = grads
            .grad_lora_a
            .check("grad_lora_A", DType::F32, &[r, d_in])?;
        let gb = grads
            .grad_lora_b
            .check("grad_lora_B", DType::F32, &[d_out, r])?;
        let dora = w.magnitude.is_some();
        let gm = match (dora, grads.grad_magnitude) {
            (true, Some(g)) => Some(g.check("grad_magnitude", DType::F32, &[d_out])?),
            (true, None) => anyhow::bail!("grad_magnitude is required for a DoRA layer"),
            (false, Some(_)) => anyhow::bail!("grad_magnitude given for a plain LoRA layer"),
            (false, None) => None,
        };
        let exact = dora && mode == GradMode::Exact;

        let parts = launch::bwd_dz_parts(t, r);
        let part_len = launch::tn_partials_len(t, r, d_out)
            .max(launch::tn_partials_len(t, r, d_in))
            .max(if exact {
                launch::tn_partials_len(d_out, r, d_in)
            } else {
                0
            });
        let mut c = Carve::new();
        let dz_off = c.take(if dora { t * d_out * dt.size() } else { 0 });
        let cpart_off = c.take(if dora { F32_BYTES * parts * d_out } else { 0 });
        let dzb_off = c.take(F32_BYTES * t * r);
        let dzb_part_len = launch::bwd_dz_partials_len(t, d_out, r);
        let dzb_part_off = c.take(F32_BYTES * dzb_part_len);
        let part_off = c.take(F32_BYTES * part_len);
        let kcoef_off = c.take(if exact { F32_BYTES * d_out } else { 0 });
        let ws = self.scratch.ensure(b, c.next, "backward")?;
        let dz = if dora { ws.offset(dz_off) } else { dyp };
        let dzb = ws.offset(dzb_off);
        let part = ws.offset(part_off);
        let kcoef = exact.then(|| ws.offset(kcoef_off));

        let g = dora.then(|| self.g_ptr());
        let a1 = launch::BwdDzArgs {
            dtype: dt,
            adapter: w.adapter_dtype(),
            dy: dyp,
            base: dora.then_some(saved.base),
            u: saved.u,
            b: w.lora_b.ptr(),
            g,
            s,
            t,
            d_out,
            r,
            dz: dora.then_some(dz),
            cpart: dora.then(|| ws.offset(cpart_off)),
            dzb,
            dzb_part: (dzb_part_len > 0).then(|| ws.offset(dzb_part_off)),
        };
        // SAFETY: dy [t, d_out] checked; base and U are the forward_train's (same t, same
        // adapter version); dz, cpart, dzb and the dz·B slabs carved above with these extents.
        unsafe { launch::bwd_dz(b, &a1) }?;
        if let Some(gm) = gm {
            let a = launch::MagReduceArgs {
                cpart: ws.offset(cpart_off),
                parts,
                n: self.n_ptr(),
                m: w.magnitude.expect("dora").ptr(),
                s,
                d_out,
                dm: gm,
                kcoef,
            };
            // SAFETY: cpart [parts, d_out] written by bwd_dz; n and m [d_out]; gm checked.
            unsafe { launch::mag_reduce(b, &a) }?;
        }
        // grad_B = s·dzᵀ·U = s·diag(g)·(dyᵀ·U) -> [d_out, r] (transposed sum of [r, d_out]
        // partials, scaled per column by g): from dy as given, not the rounded dz.
        let tb = launch::TnArgs {
            dtype: dt,
            l: saved.u,
            rm: dyp,
            rows: t,
            r,
            ncols: d_out,
            part,
            alpha: s,
            col_scale: g,
            transpose: true,
            accumulate: false,
            out: gb,
        };
        // SAFETY: U [t, r] f32, dy [t, d_out]; part holds the partials (sized above); g
        // [d_out]; gb [d_out, r] f32 checked.
        unsafe { launch::tn(b, &tb, None) }?;
        // grad_A = s·(dz·B)ᵀ·x -> [r, d_in]
        let ta = launch::TnArgs {
            dtype: dt,
            l: dzb,
            rm: xp,
            rows: t,
            r,
            ncols: d_in,
            part,
            alpha: s,
            col_scale: None,
            transpose: false,
            accumulate: false,
            out: ga,
        };
        // SAFETY: dzb [t, r] f32 written by bwd_dz, x [t, d_in]; ga [r, d_in] checked; the
        // previous product's partials were consumed by its sum, ordered before on the stream.
        unsafe { launch::tn(b, &ta, None) }?;
        // grad_x = dz·W0 + s·(dz·B)·A
        let gg = launch::Gemm {
            dtype: dt,
            m: t,
            n: d_in,
            k: d_out,
            x: dz,
            w: w.weight.ptr(),
            trans_w: w.fan_in_fan_out,
            c: gx,
            ldc: d_in,
            alpha: 1.0,
            beta: 0.0,
        };
        // SAFETY: dz [t, d_out], W0 [d_out, d_in] (or [d_in, d_out], transposed), gx
        // [t, d_in] checked.
        unsafe { launch::gemm(b, &gg) }.context("grad_x = dz·W0")?;
        let co = launch::ComposeArgs {
            dtype: dt,
            adapter: w.adapter_dtype(),
            base: gx,
            ld_base: d_in,
            y: gx,
            ld_y: d_in,
            u: dzb,
            u_splits: 1,
            bm: w.lora_a.ptr(),
            bm_strides: (1, d_in as i64),
            g: None,
            bias: None,
            s,
            t,
            d_out: d_in,
            r,
        };
        // SAFETY: in place on gx [t, d_in]; Bm(k, i) = A[i, k] with A [r, d_in]; dzb [t, r].
        unsafe { launch::compose(b, &co) }?;
        if exact {
            self.exact_terms(b, kcoef.expect("exact"), part, ga, gb)?;
        }
        Ok(())
    }

    /// Adds the exact-gradient terms (docs/design.md §1), written through V = W0 + s·B·A:
    /// grad_B −= s·diag(k)·V·Aᵀ and grad_A −= s·Bᵀ·diag(k)·V, with kcoef = −s·k. V is
    /// materialised in the exact workspace (d_out·d_in elements); the detached path never
    /// does.
    fn exact_terms(
        &mut self,
        b: &B,
        kcoef: DevPtr,
        part: DevPtr,
        ga: DevPtr,
        gb: DevPtr,
    ) -> Result<()> {
        let w = self.w;
        let (d_in, d_out, r, dt) = (w.d_in, w.d_out, w.r, w.dtype());
        let mut c = Carve::new();
        let v_off = c.take(d_out * d_in * dt.size());
        let bk_off = c.take(F32_BYTES * d_out * r);
        let ws = self.exact.ensure(b, c.next, "exact-gradient")?;
        let v = ws.offset(v_off);
        let bk = ws.offset(bk_off);
        let m = launch::MergedWeightArgs {
            dtype: dt,
            adapter: w.adapter_dtype(),
            w0: w.weight.ptr(),
            fan_in_fan_out: w.fan_in_fan_out,
            a: w.lora_a.ptr(),
            b: w.lora_b.ptr(),
            g: None,
            s: w.scaling,
            d_out,
            d_in,
            r,
            out: v,
            f32_out: false,
        };
        // SAFETY: weights validated; v holds d_out·d_in elements of dt.
        unsafe { launch::merged_weight(b, &m) }?;
        let sh = launch::ShrinkArgs {
            dtype: dt,
            adapter: w.adapter_dtype(),
            x: v,
            ldx: d_in,
            a: w.lora_a.ptr(),
            rows: d_out,
            d_in,
            r,
            split_k: false,
            coef: Some(kcoef),
            out: gb,
        };
        // SAFETY: V [d_out, d_in] written above, A [r, d_in]; kcoef [d_out]; gb [d_out, r]
        // f32 already holds the detached grad_B (accumulated into).
        unsafe { launch::shrink(b, &sh) }?;
        // SAFETY: B [d_out, r] in the adapter dtype, kcoef [d_out], bk [d_out, r] f32 carved above.
        unsafe { launch::scale_rows(b, w.adapter_dtype(), w.lora_b.ptr(), kcoef, (d_out, r), bk) }?;
        let t = launch::TnArgs {
            dtype: dt,
            l: bk,
            rm: v,
            rows: d_out,
            r,
            ncols: d_in,
            part,
            alpha: 1.0,
            col_scale: None,
            transpose: false,
            accumulate: true,
            out: ga,
        };
        // SAFETY: bk [d_out, r] f32, V [d_out, d_in]; part was sized for this product in
        // backward; ga [r, d_in] holds the detached grad_A (accumulated into).
        unsafe { launch::tn(b, &t, None) }
    }

    /// Writes `W' = diag(g)·(W0 + s·B·A)` `[d_out, d_in]` (g = 1 for plain LoRA) into `out`,
    /// in f32 or in the layer dtype (`out`'s dtype says which).
    ///
    /// # Errors
    /// `out` of the wrong dtype or too small, or a launch failure.
    pub fn merged_weight(&mut self, b: &B, out: &DevTensor) -> Result<()> {
        let w = self.w;
        let dt = w.dtype();
        ensure!(
            out.dtype() == DType::F32 || out.dtype() == dt,
            "merged weight: output dtype {} must be f32 or the layer's {dt}",
            out.dtype()
        );
        let op = out.check("merged weight", out.dtype(), &[w.d_out, w.d_in])?;
        let g = self.magnitude_scale(b)?;
        let m = launch::MergedWeightArgs {
            dtype: dt,
            adapter: w.adapter_dtype(),
            w0: w.weight.ptr(),
            fan_in_fan_out: w.fan_in_fan_out,
            a: w.lora_a.ptr(),
            b: w.lora_b.ptr(),
            g,
            s: w.scaling,
            d_out: w.d_out,
            d_in: w.d_in,
            r: w.r,
            out: op,
            f32_out: out.dtype() == DType::F32 && dt != DType::F32,
        };
        // SAFETY: weights validated; out checked for [d_out, d_in] of its dtype; g [d_out].
        unsafe { launch::merged_weight(b, &m) }
    }

    /// Strides `(ld_j, ld_k)` of W0 (for callers that address it themselves).
    pub fn weight_strides(&self) -> (i64, i64) {
        weight_strides(self.w.fan_in_fan_out, self.w.d_in, self.w.d_out)
    }
}

/// base = x·W0ᵀ into `c` (`[t, d_out]`, rows `ldc` apart); x contiguous `[t, d_in]`.
pub(crate) fn base_gemm<B: Backend>(
    b: &B,
    w: &DoraWeights,
    x: DevPtr,
    t: usize,
    c: DevPtr,
    ldc: usize,
) -> Result<()> {
    let g = launch::Gemm {
        dtype: w.dtype(),
        m: t,
        n: w.d_out,
        k: w.d_in,
        x,
        w: w.weight.ptr(),
        trans_w: !w.fan_in_fan_out,
        c,
        ldc,
        alpha: 1.0,
        beta: 0.0,
    };
    // SAFETY: x is [t, d_in], W0 [d_out, d_in] (or [d_in, d_out] with fan_in_fan_out,
    // hence no transpose), c [t, d_out]; all checked by the callers.
    unsafe { launch::gemm(b, &g) }.context("base product x·W0ᵀ")
}

/// U = shrink(x, A) into `io.u`, then y = compose(base, U) with g (None: LoRA).
pub(crate) fn shrink_and_compose<B: Backend>(b: &B, w: &DoraWeights, io: FwdIo) -> Result<()> {
    // Training: slabs in u_part, summed into u, when the shrink splits at all.
    let summed = match io.u_part {
        Some(part) if !io.split_k && launch::shrink_splits(io.t, w.r, w.d_in, true).0 > 1 => {
            Some(part)
        }
        _ => None,
    };
    let sh = launch::ShrinkArgs {
        dtype: w.dtype(),
        adapter: w.adapter_dtype(),
        x: io.x,
        ldx: io.ldx,
        a: w.lora_a.ptr(),
        rows: io.t,
        d_in: w.d_in,
        r: w.r,
        split_k: io.split_k || summed.is_some(),
        coef: None,
        out: summed.unwrap_or(io.u),
    };
    // SAFETY: x [t, d_in] and A [r, d_in] checked; u (inference) or u_part (training) holds
    // shrink_splits(t, r, d_in, true).0 slabs of t·r f32 (sized by the caller with the same
    // rule), u one slab.
    let mut splits = unsafe { launch::shrink(b, &sh) }?;
    if let Some(part) = summed {
        if splits > 1 {
            // SAFETY: part holds the `splits` slabs written above, u one [t, r] f32 slab.
            unsafe { launch::sum_slabs(b, part, splits, io.t, w.r, io.u) }?;
        }
        splits = 1;
    }
    let co = launch::ComposeArgs {
        dtype: w.dtype(),
        adapter: w.adapter_dtype(),
        base: io.base,
        ld_base: io.ld_base,
        y: io.y,
        ld_y: io.ld_y,
        u: io.u,
        u_splits: splits,
        bm: w.lora_b.ptr(),
        bm_strides: (w.r as i64, 1),
        g: io.g,
        bias: w.bias.map(|x| x.ptr()),
        s: w.scaling,
        t: io.t,
        d_out: w.d_out,
        r: w.r,
    };
    // SAFETY: base, y [t, d_out] with their row strides checked (possibly the same
    // memory, which compose allows); u's slabs written above; B [d_out, r], g and bias
    // [d_out] checked.
    unsafe { launch::compose(b, &co) }
}
