//! The adapter pool of one adapted module, for serving: a fixed number of slots, each holding
//! one [`DoraAdapter`] (its own rank 1..=the pool's `r_max`, its scaling, DoRA with the g its
//! norm kernel computed at load, or plain LoRA), and the multi-adapter forward over a batch
//! whose tokens each name a slot on the device (`kernels/multi.cu`, [`super::multi`]).
//!
//! ```text
//! y_t = g_k ⊙ (base_t + s_k·(x_t·A_kᵀ)·B_kᵀ) + b     k = adapter_index[t] (device), g_k = 1 for LoRA
//! y_t = base_t + b                                   k = −1
//! ```
//!
//! **Streams.** The pool serves on the stream of its module's [`DoraLinear`] (the main stream).
//! [`AdapterPool::load`], [`AdapterPool::replace`] and [`AdapterPool::clear`] run on a stream
//! the caller names (a side stream: a second backend on another stream of the same device):
//! there the adapter's g is computed by the norm kernel ([`DoraAdapter::compute_scale_on`]) and
//! the new slot table is uploaded; the side stream then records an event, the main stream
//! waits on it ([`Backend::wait_event`]: the host does not wait) and one launch on the main
//! stream copies the new table over the live one. So:
//! - a batch queued on the main stream **before** the swap reads the old slot: the old adapter
//!   entirely (its memory is kept until an event recorded after the swap completes), never a
//!   mix, and never waits for the side stream;
//! - a batch queued **after** the swap reads the new adapter entirely; the main stream waits
//!   for the side stream's load only through that event, and no forward waits on any event.
//!
//! The calling host thread waits for the side stream's own work (the uploads synchronise it on
//! CUDA), never for the main stream.
//!
//! **CUDA graphs.** [`AdapterPool::forward`] reads no index on the host, allocates nothing and
//! synchronises nothing: a GEMM (with [`BaseResult::Compute`]) and two launches. Its grids and
//! the workspace ([`AdapterPool::workspace_len`] = `T·r_max` f32) depend on T (and on the
//! pool's d_out and r_max), nothing else; the slot tables stay at one address, so a graph
//! captured once per padded T serves every later swap. Bad indices are flagged on the device
//! and surfaced by [`AdapterPool::check_errors`] where the engine synchronises anyway.
//!
//! **Batch invariance.** A token's output is bit-identical alone or in any batch, whatever T,
//! its neighbours' slots or their order (see [`super::multi`]).

use super::engine::{BaseResult, DoraAdapter, DoraLinear};
use super::multi::{self, MultiBatch, SlotAdapter, SlotContent, SlotTables, StagedTable};
use super::view::{
    check_disjoint, check_memory, check_region, Checked, DevView, DevViewMut, MatShape, Region,
};
use crate::backend::{Backend, DevPtr, DeviceBuffer, DeviceId, Elem};
use crate::dtype::DType;
use crate::error::ensure_input;
use anyhow::{Context, Result};
use std::marker::PhantomData;
use std::sync::Arc;

/// The per-token slot indices of a batch on the device: i32 `[T]`, −1 = base layer only.
/// Read by the kernels only; never by the host.
#[derive(Clone, Copy, Debug)]
pub struct SlotIndex<'a> {
    ptr: DevPtr,
    len: usize,
    device: DeviceId,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> SlotIndex<'a> {
    /// The first `len` i32 of a backend buffer (e.g. uploaded with [`Backend::upload`]).
    ///
    /// # Errors
    /// A buffer shorter than `len` i32 (naming `adapter_index`).
    pub fn from_buffer<B: Backend>(b: &B, buf: &'a B::Buffer, len: usize) -> Result<Self> {
        ensure_input!(
            buf.bytes() >= 4 * len,
            "adapter_index: {} bytes hold fewer than {len} i32",
            buf.bytes()
        );
        // SAFETY: the buffer is device memory of `b` of at least 4·len bytes, borrowed for 'a.
        Ok(unsafe { Self::from_raw(buf.ptr(), len, b.device()) })
    }

    /// `len` i32 at `ptr` on `device` (an engine's own allocation, e.g. a `CudaSlice<i32>`).
    ///
    /// # Safety
    /// `ptr` must address `len` i32 of device memory of `device`, valid while the view lives.
    pub unsafe fn from_raw(ptr: DevPtr, len: usize, device: DeviceId) -> Self {
        SlotIndex {
            ptr,
            len,
            device,
            _borrow: PhantomData,
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the index has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a swap replaced, kept until the main stream has passed the swap.
struct Retired<B: Backend> {
    done: B::Event,
    _adapter: Option<DoraAdapter<B>>,
    _staged: StagedTable<B>,
}

/// The adapter pool of one adapted module (see the module doc).
pub struct AdapterPool<B: Backend> {
    main: Arc<B>,
    tables: SlotTables<B>,
    held: Vec<Option<DoraAdapter<B>>>,
    retired: Vec<Retired<B>>,
    /// What a swap replaced when no event could be recorded behind it: kept until drop.
    #[allow(clippy::type_complexity)]
    kept: Vec<(Option<DoraAdapter<B>>, StagedTable<B>)>,
    linear: u64,
    dtype: DType,
}

impl<B: Backend> AdapterPool<B> {
    /// An empty pool of `slots` slots for `linear`'s module, serving on `linear`'s stream,
    /// holding adapters of rank 1..=`r_max` (≤ 256) stored in `adapter_dtype` (the layer dtype,
    /// or f32 beside a 16-bit layer: PEFT's default). Set-up work: the empty tables are uploaded
    /// on `linear`'s stream (which synchronises it on CUDA).
    ///
    /// # Errors
    /// `slots` of 0 or over `i32::MAX`, `r_max` outside 1..=256, an adapter dtype the kernels
    /// have no variant for, or a device failure.
    pub fn new(
        linear: &DoraLinear<B>,
        slots: usize,
        r_max: usize,
        adapter_dtype: DType,
    ) -> Result<Self> {
        ensure_input!(
            (1..=i32::MAX as usize).contains(&slots),
            "adapter pool: {slots} slots (1..={} allowed)",
            i32::MAX
        );
        ensure_input!(
            super::spec::suffix(linear.dtype(), adapter_dtype).is_some(),
            "adapter pool: {adapter_dtype} adapters beside a {} layer; adapters must be {}",
            linear.dtype(),
            super::spec::adapter_dtypes(linear.dtype())
        );
        let main = linear.backend().clone();
        let empty = vec![None; slots];
        // SAFETY: no slot holds an address yet.
        let tables = unsafe {
            SlotTables::new(
                &*main,
                adapter_dtype,
                (linear.d_in(), linear.d_out()),
                r_max,
                &empty,
            )
        }?;
        Ok(Self {
            main,
            tables,
            held: (0..slots).map(|_| None).collect(),
            retired: Vec::new(),
            kept: Vec::new(),
            linear: linear.pool_parts().0,
            dtype: linear.dtype(),
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.held.len()
    }

    /// The largest rank a slot may hold.
    pub fn r_max(&self) -> usize {
        self.tables.r_max()
    }

    /// The adapters' storage dtype.
    pub fn adapter_dtype(&self) -> DType {
        self.tables.adapter_dtype()
    }

    /// The adapter slot `k` holds, if any.
    pub fn adapter(&self, k: usize) -> Option<&DoraAdapter<B>> {
        self.held.get(k).and_then(|a| a.as_ref())
    }

    /// f32 elements of workspace a batch of `t` tokens needs: `t·r_max` (the shrink's U).
    pub fn workspace_len(&self, t: usize) -> usize {
        multi::workspace_len(t, self.tables.r_max()).max(1)
    }

    fn check_linear(&self, linear: &DoraLinear<B>) -> Result<()> {
        ensure_input!(
            linear.pool_parts().0 == self.linear,
            "adapter pool: called with another module's layer than the one it was made for"
        );
        Ok(())
    }

    /// Loads `adapter` into slot `k`, which holds no adapter (see [`AdapterPool::replace`]).
    ///
    /// # Errors
    /// Slot `k` occupied, or as [`AdapterPool::replace`].
    pub fn load(
        &mut self,
        linear: &DoraLinear<B>,
        side: &B,
        k: usize,
        adapter: DoraAdapter<B>,
    ) -> Result<()> {
        ensure_input!(
            self.adapter(k).is_none(),
            "slot {k}: already holds an adapter (replace it, or clear it first)"
        );
        self.replace(linear, side, k, adapter)
    }

    /// Puts `adapter` into slot `k` (whatever it held): computes its g for `linear` on `side`
    /// (DoRA; the adapter's memory, pool-owned or the engine's, is used where it lies), stages
    /// the new slot table on `side`, and commits it on `linear`'s stream after an event (the
    /// module doc says what batches before and after see). The slot's old adapter is dropped
    /// once the main stream has passed the swap ([`AdapterPool::reclaim`]).
    ///
    /// `side` must be a stream of the same device; `linear`'s weights must be visible to it
    /// (written before the layer was made, as the engine API requires).
    ///
    /// # Errors
    /// One line naming the slot: `k` outside the pool, an adapter of another device, other
    /// d_in/d_out than the module, another dtype than the pool's, a rank above the pool's
    /// `r_max`; or a device failure.
    pub fn replace(
        &mut self,
        linear: &DoraLinear<B>,
        side: &B,
        k: usize,
        mut adapter: DoraAdapter<B>,
    ) -> Result<()> {
        self.check_linear(linear)?;
        ensure_input!(
            k < self.slots(),
            "slot {k} outside the pool's {} slots",
            self.slots()
        );
        let p = adapter.slot_parts();
        ensure_input!(
            p.device == self.main.device() && side.device() == self.main.device(),
            "slot {k}: adapter on {} and side stream on {}, but the pool serves on {}",
            p.device,
            side.device(),
            self.main.device()
        );
        let (d_in, d_out) = self.tables.dims();
        ensure_input!(
            p.d_in == d_in && p.d_out == d_out,
            "slot {k}: adapter for d_in={}, d_out={}, but the module is d_in={d_in}, d_out={d_out}",
            p.d_in,
            p.d_out
        );
        ensure_input!(
            p.dtype == self.adapter_dtype(),
            "slot {k}: adapter stored in {}, but the pool holds {} adapters",
            p.dtype,
            self.adapter_dtype()
        );
        ensure_input!(
            p.r <= self.r_max(),
            "slot {k}: rank {} above the pool's largest rank {}",
            p.r,
            self.r_max()
        );
        adapter
            .compute_scale_on(linear, side)
            .with_context(|| format!("slot {k}: computing g"))?;
        let p = adapter.slot_parts();
        let g = match (p.dora, p.g) {
            (false, _) => None,
            (true, Some((g, id))) if id == self.linear => Some(g),
            _ => unreachable!("compute_scale_on sets g for this layer"),
        };
        let slot = SlotAdapter {
            lora_a: p.lora_a,
            lora_b: p.lora_b,
            g,
            rank: p.r,
            scaling: p.scaling,
        };
        self.swap(side, k, SlotContent::Adapter(slot), Some(adapter))
    }

    /// Marks slot `k` as an adapter that does not adapt this module (it adapts other modules
    /// of the model): its tokens get `base + b`, unflagged, so one index array serves every
    /// module's pool. Ordered as a swap.
    ///
    /// # Errors
    /// `k` outside the pool, or a device failure.
    pub fn set_base_only(&mut self, side: &B, k: usize) -> Result<()> {
        ensure_input!(
            k < self.slots(),
            "slot {k} outside the pool's {} slots",
            self.slots()
        );
        self.swap(side, k, SlotContent::BaseOnly, None)
    }

    /// Empties slot `k` (its tokens then fail as an empty slot), ordered as a swap.
    ///
    /// # Errors
    /// `k` outside the pool, or a device failure.
    pub fn clear(&mut self, side: &B, k: usize) -> Result<()> {
        ensure_input!(
            k < self.slots(),
            "slot {k} outside the pool's {} slots",
            self.slots()
        );
        self.swap(side, k, SlotContent::Empty, None)
    }

    /// Stages `slot` on `side`, orders the main stream after it through an event and commits
    /// it there; the slot's old adapter is retired behind an event recorded after the commit.
    /// On an error nothing live changed and the slot keeps its adapter.
    fn swap(
        &mut self,
        side: &B,
        k: usize,
        slot: SlotContent,
        adapter: Option<DoraAdapter<B>>,
    ) -> Result<()> {
        self.reclaim()?;
        let staged = self.tables.stage_slot(side, k, slot)?;
        let staged_done = side
            .record_event()
            .context("recording the end of a slot load")?;
        self.main
            .wait_event(&staged_done)
            .context("ordering the serving stream after a slot load")?;
        // SAFETY: the slot's addresses are memory of `adapter`, which this pool holds from now
        // on (or none); the main stream waits for the side stream's load (above) before the copy.
        unsafe { self.tables.commit(&self.main, &staged) }?;
        let old = std::mem::replace(&mut self.held[k], adapter);
        match self.main.record_event() {
            Ok(done) => {
                self.retired.push(Retired {
                    done,
                    _adapter: old,
                    _staged: staged,
                });
                Ok(())
            }
            Err(e) => {
                // Without the event the old adapter cannot be retired safely: keep it until drop.
                self.kept.push((old, staged));
                Err(e.context("recording the end of a slot swap"))
            }
        }
    }

    /// Drops what earlier swaps replaced once the main stream has passed them (never waits);
    /// returns how many are still pending. Called by every swap.
    ///
    /// # Errors
    /// A fault in the main stream's work.
    pub fn reclaim(&mut self) -> Result<usize> {
        let mut keep = Vec::new();
        for r in self.retired.drain(..) {
            if !self.main.event_complete(&r.done)? {
                keep.push(r);
            }
        }
        self.retired = keep;
        Ok(self.retired.len())
    }

    /// Serves one batch on `linear`'s stream: x `[T, d_in]`, `index` `[T]` (slot per token,
    /// −1 = base only, read on the device), y `[T, d_out]` (any row stride: a column slice of a
    /// fused QKV or gate/up output), `workspace` at least [`AdapterPool::workspace_len`]`(T)`
    /// f32. With [`BaseResult::Compute`] the layer's GEMM writes `x·W0ᵀ` into y first; with
    /// [`BaseResult::InPlace`] y already holds it; with [`BaseResult::Given`] it is read from
    /// the view. Then `y_t = g_k ⊙ (base_t + s_k·(x_t·A_kᵀ)·B_kᵀ) + b`. No host
    /// synchronisation, no allocation, no host read of `index` (module doc: CUDA graphs).
    ///
    /// # Errors
    /// One line naming the tensor: a dtype other than the layer's, a wrong shape or device, a
    /// view too short, an output overlapping an input; a launch failure naming the kernel.
    /// Indices outside −1..slots−1 or naming an empty slot are flagged on the device
    /// ([`AdapterPool::check_errors`]).
    pub fn forward<T: Elem>(
        &self,
        linear: &DoraLinear<B>,
        x: &DevView<T>,
        index: &SlotIndex,
        base: BaseResult<T>,
        y: &mut DevViewMut<T>,
        workspace: &mut DevViewMut<f32>,
    ) -> Result<()> {
        self.check_linear(linear)?;
        ensure_input!(
            T::DTYPE == self.dtype,
            "x: {} activations for a layer whose weight is {}",
            T::DTYPE,
            self.dtype
        );
        let (dev, t) = (self.main.device(), x.shape().rows);
        let (d_in, d_out) = self.tables.dims();
        ensure_input!(t >= 1, "x: at least one token is needed");
        let xc = x.check("x", dev, t, d_in)?;
        let yc = y.check("y", dev, t, d_out)?;
        let index_region = Region {
            ptr: index.ptr,
            len: index.len,
            device: index.device,
            elem_bytes: 4,
            elem: "i32",
        };
        let ic = check_region(
            "adapter_index",
            &index_region,
            MatShape::new(1, t),
            dev,
            1,
            t,
        )?;
        let need = self.workspace_len(t);
        let wc = check_memory(
            "workspace",
            &workspace.memory(),
            MatShape::new(1, need),
            dev,
            1,
            need,
        )
        .context("workspace: see AdapterPool::workspace_len")?;
        let bc: Option<Checked> = match &base {
            BaseResult::Given(v) => Some(v.check("base", dev, t, d_out)?),
            _ => None,
        };
        check_disjoint("y", &yc, "x", &xc)?;
        check_disjoint("y", &yc, "adapter_index", &ic)?;
        check_disjoint("workspace", &wc, "x", &xc)?;
        check_disjoint("workspace", &wc, "y", &yc)?;
        check_disjoint("workspace", &wc, "adapter_index", &ic)?;
        if let Some(bc) = &bc {
            check_disjoint("y", &yc, "base", bc)?;
            check_disjoint("workspace", &wc, "base", bc)?;
        }
        let (base_p, ld_base) = match base {
            BaseResult::Compute => {
                linear.base_product(x, y)?;
                (yc.ptr, yc.ld)
            }
            BaseResult::InPlace => (yc.ptr, yc.ld),
            BaseResult::Given(_) => {
                let bc = bc.expect("checked above");
                (bc.ptr, bc.ld)
            }
        };
        let batch = MultiBatch {
            dtype: self.dtype,
            x: xc.ptr,
            ldx: xc.ld,
            index: ic.ptr,
            t,
            base: base_p,
            ld_base,
            y: yc.ptr,
            ld_y: yc.ld,
            bias: linear.pool_parts().1,
            u: wc.ptr,
        };
        // SAFETY: every view was checked above for this device, its shape and its length (x
        // [t, d_in], index [t], base and y [t, d_out] with their strides, U [t, r_max]); the
        // bias is held by `linear` ([d_out] f32); the tables' addresses are memory of the
        // adapters this pool holds (or of retired ones kept until the main stream passes them).
        unsafe { multi::forward(&*self.main, &self.tables, &batch) }
    }

    /// Reads and clears the device error word of the batches served so far (this waits for
    /// the main stream): one line saying which kind of index was bad.
    ///
    /// # Errors
    /// A flagged index, or a device failure.
    pub fn check_errors(&mut self) -> Result<()> {
        let main = self.main.clone();
        self.tables.check_errors(&main)
    }
}

impl<B: Backend> Drop for AdapterPool<B> {
    /// Waits for the main stream before the adapters go: batches queued on it read their memory
    /// through the tables, which their allocating (side) stream does not know about.
    fn drop(&mut self) {
        // An error here is a fault of earlier work, already reported by the calls that queued it.
        let _ = self.main.synchronize();
    }
}
