//! The multi-adapter forward for serving (`kernels/multi.cu`): a batch whose tokens each use
//! their own adapter (or none), finished in place over the base output the engine computed.
//!
//! ```text
//! multi_shrink  U[t, :r_k] = x_t·A_kᵀ                          k = adapter_index[t] (device)
//! multi_expand  y_t = g_k ⊙ (base_t + s_k·U_t·B_kᵀ) + b        −1: y_t = base_t + b
//! ```
//!
//! Adapters are reached through [`SlotTables`]: device arrays of per-slot addresses (A_k, B_k,
//! g_k), ranks and scalings, in the manner of S-LoRA's unified pool and Punica's BGMV, so the
//! adapters may live in memory the engine owns. One launch serves both shapes engines use:
//! segments of tokens on one adapter (prefill) and one token per request with arbitrary slots
//! (decode); indices need not be sorted.
//!
//! **Capturable in a CUDA graph.** [`forward`] reads no index on the host, allocates nothing
//! and does not synchronise: its grids depend on T (and d_out, the tables' r_max) only, so an
//! engine captures one graph per T it pads to. Indices outside −1..slots−1, or naming an empty
//! slot, cannot be refused on the host without reading them: the kernels finish such a token
//! as base-only and set a flag in the tables' device error word ([`ERR_INDEX`], [`ERR_EMPTY`]),
//! which [`SlotTables::check_errors`] reads (it synchronises: call it where the engine waits
//! anyway). [`run_multi`] (host tensors, for replay and tests) checks it after every batch.
//!
//! **Batch invariance.** Each output of token t is computed from token t's data alone, with a
//! reduction order fixed by d_in and r_k (never by T, the neighbours' adapters or their order),
//! so a token's y is bit-identical served alone or in any batch (tests/kernels/multi_adapter.rs).
//!
//! **Hot swap.** [`SlotTables::stage_slot`] uploads a new table image on a side stream and
//! [`SlotTables::commit`] copies it over the live tables with one launch on the serving stream
//! (after an event): batches queued before read the old slot, batches queued after the new one,
//! and the host never waits for the serving stream. [`super::AdapterPool`] does this for its
//! adapters. [`SlotTables::set_slot`] is the set-up path (an upload that synchronises on CUDA).

use super::launch;
use super::spec;
use crate::backend::{Backend, DevPtr, DeviceBuffer, KernelArg, LaunchDims};
use crate::case_multi::{adapter_dtype, MultiLayer, INDEX_NAME};
use crate::dtype::DType;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};

/// Error flag: a token's slot index is outside −1..slots−1 (mirrors `MULTI_ERR_INDEX` in
/// kernels/multi.cu).
pub const ERR_INDEX: i32 = 1;
/// Error flag: a token names an empty slot (rank 0) (mirrors `MULTI_ERR_EMPTY`).
pub const ERR_EMPTY: i32 = 2;
/// The rank a slot table stores for [`SlotContent::BaseOnly`] (`MULTI_BASE_ONLY`).
pub const BASE_ONLY_RANK: i32 = -1;
/// Ranks per `multi_shrink` block (one warp each; `MS_WARPS` in kernels/multi.cu).
pub const SHRINK_RANKS: usize = 8;
/// Output columns per `multi_expand` block (one per thread).
pub const EXPAND_COLS: usize = spec::THREADS;

/// One occupied slot: where its adapter lives and what it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlotAdapter {
    /// A `[rank, d_in]` row-major, in the tables' adapter dtype.
    pub lora_a: DevPtr,
    /// B `[d_out, rank]` row-major, in the tables' adapter dtype.
    pub lora_b: DevPtr,
    /// g = m / max(‖W0 + s·B·A‖, ε) `[d_out]` f32 for DoRA (e.g. from the norm kernel at
    /// load), `None` for plain LoRA.
    pub g: Option<DevPtr>,
    /// The rank, 1..=the tables' r_max.
    pub rank: usize,
    /// The effective scaling s.
    pub scaling: f32,
}

/// What one slot of a [`SlotTables`] holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SlotContent {
    /// Nothing: a token naming it is flagged ([`ERR_EMPTY`]) and finished base-only.
    Empty,
    /// An adapter that does not adapt this module (it adapts others of the model): its tokens
    /// get `base + b`, unflagged, so one index serves every module of a model.
    BaseOnly,
    /// An adapter.
    Adapter(SlotAdapter),
}

impl From<Option<SlotAdapter>> for SlotContent {
    fn from(s: Option<SlotAdapter>) -> Self {
        s.map_or(SlotContent::Empty, SlotContent::Adapter)
    }
}

/// The per-slot tables of one adapted module on the device, and its error word.
///
/// Layout: one buffer of `32·n` bytes for `n` slots: addresses u64 `[3, n]` (A, then B, then g
/// or 0), ranks i32 `[n]` (0 = empty), scalings f32 `[n]`; and the error word i32 `[1]`. The
/// tables stay at one address for their life, so a CUDA graph captured over [`forward`] serves
/// every later swap.
pub struct SlotTables<B: Backend> {
    table: B::Buffer,
    err: B::Buffer,
    host: Vec<SlotContent>,
    generation: u64,
    adapter: DType,
    d_in: usize,
    d_out: usize,
    r_max: usize,
}

/// A new image of a [`SlotTables`] with one slot changed, uploaded by
/// [`SlotTables::stage_slot`] (on a side stream) and made live by [`SlotTables::commit`].
pub struct StagedTable<B: Backend> {
    image: B::Buffer,
    k: usize,
    slot: SlotContent,
    generation: u64,
}

/// `n` as a kernel `int`, naming `what`.
fn int(what: &str, n: usize) -> Result<KernelArg> {
    let v = i32::try_from(n).with_context(|| format!("{what} = {n} does not fit a kernel int"))?;
    Ok(KernelArg::I32(v))
}

/// The bytes of the tables for `host` (layout in [`SlotTables`]).
fn table_image(host: &[SlotContent]) -> Vec<u8> {
    let n = host.len().max(1);
    let mut ptrs = vec![0u64; 3 * n];
    let mut ranks = vec![0i32; n];
    let mut scales = vec![0f32; n];
    for (k, s) in host.iter().enumerate() {
        match s {
            SlotContent::Empty => {}
            SlotContent::BaseOnly => ranks[k] = BASE_ONLY_RANK,
            SlotContent::Adapter(s) => {
                ptrs[k] = s.lora_a.0;
                ptrs[n + k] = s.lora_b.0;
                ptrs[2 * n + k] = s.g.map_or(0, |g| g.0);
                ranks[k] = s.rank as i32;
                scales[k] = s.scaling;
            }
        }
    }
    let mut v = Vec::with_capacity(32 * n);
    v.extend_from_slice(bytemuck::cast_slice(&ptrs));
    v.extend_from_slice(bytemuck::cast_slice(&ranks));
    v.extend_from_slice(bytemuck::cast_slice(&scales));
    v
}

impl<B: Backend> SlotTables<B> {
    /// Tables for `slots` slots (each `None` = empty) of adapters in `adapter` dtype for a
    /// module of `d_in` inputs and `d_out` outputs, with ranks up to `r_max` (1..=256: the U
    /// workspace of a batch is `T·r_max` f32). Set-up work: on CUDA the upload synchronises
    /// `b`'s stream.
    ///
    /// # Safety
    /// Every address in `slots` must be device memory of `b` holding the tensor described
    /// ([`SlotAdapter`]), and stay valid as long as batches using these tables may run.
    ///
    /// # Errors
    /// `r_max` outside 1..=256, a slot's rank outside 1..=r_max (naming the slot), or a
    /// device failure.
    pub unsafe fn new(
        b: &B,
        adapter: DType,
        (d_in, d_out): (usize, usize),
        r_max: usize,
        slots: &[Option<SlotAdapter>],
    ) -> Result<Self> {
        crate::error::ensure_input!(
            (1..=spec::MAX_RANK).contains(&r_max),
            "adapter pool: largest rank {r_max} outside 1..={}",
            spec::MAX_RANK
        );
        crate::error::ensure_input!(
            d_in >= 1 && d_out >= 1,
            "adapter pool: d_in and d_out must be at least 1"
        );
        let n = slots.len().max(1);
        let mut t = Self {
            table: b
                .alloc_zeroed(32 * n)
                .context("allocating the slot tables")?,
            err: b
                .alloc_zeroed(4)
                .context("allocating the slot tables' error word")?,
            host: vec![SlotContent::Empty; slots.len()],
            generation: 0,
            adapter,
            d_in,
            d_out,
            r_max,
        };
        for (k, s) in slots.iter().enumerate() {
            let s = SlotContent::from(*s);
            t.check_slot(k, &s)?;
            t.host[k] = s;
        }
        b.upload(&mut t.table, &table_image(&t.host))
            .context("uploading the slot tables")?;
        Ok(t)
    }

    fn check_slot(&self, k: usize, s: &SlotContent) -> Result<()> {
        ensure!(
            k < self.host.len(),
            "slot {k} outside the pool's {} slots",
            self.host.len()
        );
        if let SlotContent::Adapter(s) = s {
            ensure!(
                (1..=self.r_max).contains(&s.rank),
                "slot {k}: rank {} outside 1..={} (the pool's largest rank)",
                s.rank,
                self.r_max
            );
            ensure!(
                s.scaling.is_finite(),
                "slot {k}: scaling {} is not finite",
                s.scaling
            );
        }
        Ok(())
    }

    /// Replaces slot `k` (`None` empties it) by an upload on `b`'s stream: batches queued
    /// before read the old adapter, batches queued after read the new one. Set-up work: on
    /// CUDA the upload synchronises the stream (a serving engine swaps through
    /// [`SlotTables::stage_slot`] and [`SlotTables::commit`] instead, which never block it).
    ///
    /// # Safety
    /// As for [`Self::new`], for the new slot's addresses.
    ///
    /// # Errors
    /// `k` outside the tables, a rank outside 1..=r_max, or a device failure.
    pub unsafe fn set_slot(&mut self, b: &B, k: usize, slot: Option<SlotAdapter>) -> Result<()> {
        let slot = SlotContent::from(slot);
        self.check_slot(k, &slot)?;
        let mut host = self.host.clone();
        host[k] = slot;
        b.upload(&mut self.table, &table_image(&host))
            .context("uploading the slot tables")?;
        self.host = host;
        self.generation += 1;
        Ok(())
    }

    /// Uploads, on `side` (a stream of the same device), the image of these tables with slot
    /// `k` holding `slot`; nothing live changes until [`SlotTables::commit`]. On CUDA the
    /// upload synchronises `side` only.
    ///
    /// # Errors
    /// `k` outside the tables, a rank outside 1..=r_max, or a device failure.
    pub fn stage_slot(&self, side: &B, k: usize, slot: SlotContent) -> Result<StagedTable<B>> {
        self.check_slot(k, &slot)?;
        let mut host = self.host.clone();
        host[k] = slot;
        let bytes = table_image(&host);
        let mut image = side
            .alloc_zeroed(bytes.len())
            .context("allocating a staged slot table")?;
        side.upload(&mut image, &bytes)
            .context("uploading a staged slot table")?;
        Ok(StagedTable {
            image,
            k,
            slot,
            generation: self.generation,
        })
    }

    /// Makes `staged` live with one launch (`dora_multi_copy_table`) on `main`, the stream the
    /// batches run on: batches queued on `main` before it read the old tables, batches queued
    /// after it the new ones; the host does not wait. `main` must already be ordered after the
    /// staging (e.g. [`Backend::wait_event`] on an event `side` recorded after
    /// [`SlotTables::stage_slot`]), and `staged` must stay allocated until the copy has run.
    ///
    /// # Safety
    /// The staged slot's addresses must satisfy [`Self::new`]'s contract, on `main` once the
    /// wait above is queued.
    ///
    /// # Errors
    /// A staged table built before another change of these tables, or a launch failure.
    pub unsafe fn commit(&mut self, main: &B, staged: &StagedTable<B>) -> Result<()> {
        ensure!(
            staged.generation == self.generation,
            "adapter pool: slot {} was staged before another change of the tables; stage it again",
            staged.k
        );
        let words = self.table.bytes().min(staged.image.bytes()) / 4;
        let args = [
            KernelArg::Ptr(staged.image.ptr()),
            KernelArg::Ptr(self.table.ptr()),
            int("table words", words)?,
        ];
        let dims = LaunchDims {
            grid: [words.div_ceil(spec::THREADS) as u32, 1, 1],
            block: [spec::THREADS as u32, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: matches `dora_multi_copy_table(src, dst, words)`; both buffers hold at least
        // `words` 32-bit words (the smaller of the two sizes), and they are distinct
        // allocations; the caller orders `main` after the staging upload.
        unsafe { main.launch("dora_multi_copy_table", dims, &args) }
            .context("launching dora_multi_copy_table")?;
        self.host[staged.k] = staged.slot;
        self.generation += 1;
        Ok(())
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.host.len()
    }

    /// What slot `k` holds, as last set (`Empty` for `k` outside the tables).
    pub fn slot(&self, k: usize) -> SlotContent {
        self.host.get(k).copied().unwrap_or(SlotContent::Empty)
    }

    /// The largest rank a slot may hold (the U workspace is `T·r_max` f32).
    pub fn r_max(&self) -> usize {
        self.r_max
    }

    /// Inputs and outputs of the module, `(d_in, d_out)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_in, self.d_out)
    }

    /// The adapters' storage dtype.
    pub fn adapter_dtype(&self) -> DType {
        self.adapter
    }

    /// Reads and clears the device error word (this waits for the queued work).
    ///
    /// # Errors
    /// A flag was set since the last check (one line saying which), or a device failure.
    pub fn check_errors(&mut self, b: &B) -> Result<()> {
        let mut w = [0u8; 4];
        b.download(&self.err, &mut w)
            .context("reading the multi-adapter error word")?;
        let flags = i32::from_le_bytes(w);
        if flags == 0 {
            return Ok(());
        }
        b.upload(&mut self.err, &[0u8; 4])
            .context("clearing the multi-adapter error word")?;
        let mut what = Vec::new();
        if flags & ERR_INDEX != 0 {
            what.push(format!(
                "a token's {INDEX_NAME} is outside -1..={}",
                self.host.len() as i64 - 1
            ));
        }
        if flags & ERR_EMPTY != 0 {
            what.push("a token names an empty slot".to_string());
        }
        bail!(
            "{} (flagged on the device; those tokens were finished as base-only)",
            what.join("; ")
        )
    }
}

/// One batch for [`forward`], as device addresses.
#[derive(Clone, Copy, Debug)]
pub struct MultiBatch {
    /// The dtype of x, base and y (f32, f16 or bf16).
    pub dtype: DType,
    /// x `[t, d_in]`, rows `ldx` elements apart.
    pub x: DevPtr,
    /// Row stride of x (≥ d_in).
    pub ldx: usize,
    /// The slot of each token, i32 `[t]`; −1 = base layer only.
    pub index: DevPtr,
    /// Tokens.
    pub t: usize,
    /// base `[t, d_out]` (x·W0ᵀ), rows `ld_base` apart; may be a column slice of a wider
    /// output, and may equal `y` (in place).
    pub base: DevPtr,
    /// Row stride of base (≥ d_out).
    pub ld_base: usize,
    /// y `[t, d_out]`, rows `ld_y` apart.
    pub y: DevPtr,
    /// Row stride of y (≥ d_out).
    pub ld_y: usize,
    /// bias `[d_out]` f32, or `None`.
    pub bias: Option<DevPtr>,
    /// Workspace for U: [`workspace_len`] f32.
    pub u: DevPtr,
}

/// f32 elements of the U workspace for `t` tokens with tables of largest rank `r_max`.
pub fn workspace_len(t: usize, r_max: usize) -> usize {
    t * r_max
}

/// Runs the multi-adapter forward over `batch` with `tables`: two launches, stream-ordered,
/// no host synchronisation, no allocation, no host read of the indices.
///
/// # Safety
/// Every address in `batch` must be device memory of `b` valid for the extents stated beside
/// it (y writable); the tables' addresses must still be valid (see [`SlotTables::new`]).
///
/// # Errors
/// Strides below the widths, a dtype pair no kernel is stamped for, sizes over the kernels'
/// limits, or a launch failure naming the kernel.
pub unsafe fn forward<B: Backend>(b: &B, tables: &SlotTables<B>, batch: &MultiBatch) -> Result<()> {
    let (d_in, d_out, x) = (tables.d_in, tables.d_out, batch);
    ensure!(
        x.ldx >= d_in && x.ld_base >= d_out && x.ld_y >= d_out,
        "multi-adapter batch: row strides x {}, base {}, y {} below d_in {d_in} / d_out {d_out}",
        x.ldx,
        x.ld_base,
        x.ld_y
    );
    if x.t == 0 {
        return Ok(());
    }
    let sfx = spec::suffix(x.dtype, tables.adapter).with_context(|| {
        format!(
            "multi-adapter: no kernel for {} activations with {} adapters",
            x.dtype, tables.adapter
        )
    })?;
    let n = tables.host.len();
    let ptrs = tables.table.ptr();
    let nt = n.max(1);
    let (ranks, scales) = (ptrs.offset(24 * nt), ptrs.offset(28 * nt));
    let t_blocks = u32::try_from(x.t)
        .ok()
        .filter(|&v| v <= i32::MAX as u32)
        .with_context(|| format!("multi-adapter: T = {} over the grid limit", x.t))?;

    let shrink = format!("dora_multi_shrink_{sfx}");
    let (slots, r_max) = (int("slots", n)?, int("r_max", tables.r_max)?);
    let args = [
        KernelArg::Ptr(x.x),
        KernelArg::I64(x.ldx as i64),
        KernelArg::Ptr(x.index),
        KernelArg::Ptr(ptrs),
        KernelArg::Ptr(ranks),
        slots,
        r_max,
        int("T", x.t)?,
        int("d_in", d_in)?,
        KernelArg::Ptr(x.u),
        KernelArg::I64(tables.r_max as i64),
        KernelArg::Ptr(tables.err.ptr()),
    ];
    let dims = LaunchDims {
        grid: [t_blocks, tables.r_max.div_ceil(SHRINK_RANKS) as u32, 1],
        block: [spec::THREADS as u32, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: matches `dora_multi_shrink_<sfx>(x, ldx, index, a_ptrs, ranks, slots, r_max,
    // t_rows, d_in, u, ldu, err)` in kernels/multi.cu; a_ptrs is the first row of the [3, n]
    // address table; the caller guarantees x [t, d_in] (ldx), index [t] and u [t, r_max]; the
    // tables' addresses are valid by SlotTables' contract and each slot's rank ≤ r_max
    // (checked when set), so every A row read and every U element written is in bounds.
    unsafe { b.launch(&shrink, dims, &args) }.with_context(|| format!("launching {shrink}"))?;

    let expand = format!("dora_multi_expand_{sfx}");
    let args = [
        KernelArg::Ptr(x.base),
        KernelArg::I64(x.ld_base as i64),
        KernelArg::Ptr(x.y),
        KernelArg::I64(x.ld_y as i64),
        KernelArg::Ptr(x.u),
        KernelArg::I64(tables.r_max as i64),
        KernelArg::Ptr(x.index),
        KernelArg::Ptr(ptrs.offset(8 * nt)),
        KernelArg::Ptr(ptrs.offset(16 * nt)),
        KernelArg::Ptr(ranks),
        KernelArg::Ptr(scales),
        slots,
        r_max,
        KernelArg::Ptr(x.bias.unwrap_or(DevPtr(0))),
        int("T", x.t)?,
        int("d_out", d_out)?,
        KernelArg::Ptr(tables.err.ptr()),
    ];
    let col_blocks = d_out.div_ceil(EXPAND_COLS);
    ensure!(
        col_blocks <= 65_535,
        "multi-adapter: d_out = {d_out} needs {col_blocks} column blocks, over the grid limit"
    );
    let dims = LaunchDims {
        grid: [t_blocks, col_blocks as u32, 1],
        block: [spec::THREADS as u32, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: matches `dora_multi_expand_<sfx>(base, ld_base, y, ld_y, u, ldu, index, b_ptrs,
    // g_ptrs, ranks, scales, slots, r_max, bias, t_rows, d_out, err)`; b_ptrs and g_ptrs are
    // rows 1 and 2 of the [3, n] address table (n ≥ 1 entries each, allocated for max(n, 1));
    // base and y may alias (each element is read, then written, by one thread); U rows were
    // written by the shrink above for every rank < r_k of every adapted token, which is all the
    // expand reads; the grid covers every (token, column).
    unsafe { b.launch(&expand, dims, &args) }.with_context(|| format!("launching {expand}"))
}

/// Where the base output of [`run_multi`] comes from.
#[derive(Clone, Copy, Debug)]
pub enum MultiBase<'a> {
    /// Computed here: `x·W0ᵀ` by the backend's GEMM; the result is y `[T, d_out]`.
    Compute,
    /// Given by the caller: columns `col0..col0 + d_out` of `out [T, ld]` (in x's dtype) hold
    /// the base output (one slice of a fused QKV product, say) and are finished in place; the
    /// result is the whole of `out`, its other columns untouched.
    Given {
        /// The wider output `[T, ld]`.
        out: &'a Tensor,
        /// The first column of the slice.
        col0: usize,
    },
}

/// Uploads `t` cast to `dtype`, naming it.
fn upload<B: Backend>(b: &B, t: &Tensor, dtype: DType, name: &str) -> Result<B::Buffer> {
    upload_bytes(b, t.cast(dtype).as_bytes(), name)
}

fn upload_bytes<B: Backend>(b: &B, bytes: &[u8], name: &str) -> Result<B::Buffer> {
    let mut buf = b
        .alloc_zeroed(bytes.len().max(4))
        .with_context(|| format!("allocating {name}"))?;
    b.upload(&mut buf, bytes)
        .with_context(|| format!("uploading {name}"))?;
    Ok(buf)
}

/// Runs the multi-adapter layer on `b` with host tensors in and out (replay, tests): uploads
/// the base and every adapter, computes g per DoRA adapter with the norm kernel (once, as at
/// adapter load), builds the slot tables, computes or takes the base output, runs
/// [`forward`] in place and reads the result back. The computation dtype is x's (the weight
/// is cast to it; adapters per [`adapter_dtype`]; m and bias in f32).
///
/// # Errors
/// An invalid layer, x or index length (naming the tensor), an index outside −1..K−1 (flagged
/// on the device, then named by token), a rank over 256, or a device failure naming the
/// kernel.
pub fn run_multi<B: Backend>(
    b: &B,
    layer: &MultiLayer,
    x: &Tensor,
    adapter_index: &[i32],
    base: MultiBase<'_>,
) -> Result<Tensor> {
    let (d_in, d_out) = layer.dims()?;
    let xs = x.shape();
    ensure!(
        xs.len() == 2 && xs[1] == d_in && xs[0] >= 1,
        "x is {xs:?}, expected [T, {d_in}] (T ≥ 1, d_in from weight)"
    );
    let t = xs[0];
    ensure!(
        adapter_index.len() == t,
        "{INDEX_NAME} has {} entries, expected T = {t}",
        adapter_index.len()
    );
    let dt = x.dtype();
    let ad = adapter_dtype(layer, dt);
    let r_max = layer.adapters.iter().map(|a| a.rank()).max().unwrap_or(1);
    for (k, a) in layer.adapters.iter().enumerate() {
        ensure!(
            a.rank() <= spec::MAX_RANK,
            "adapters.{k}: rank {} above the limit {}",
            a.rank(),
            spec::MAX_RANK
        );
    }
    let weight = upload(b, &layer.weight, dt, "weight")?;
    let bias = layer
        .bias
        .as_ref()
        .map(|t| upload(b, t, DType::F32, "bias"))
        .transpose()?;
    struct Up<Buf> {
        a: Buf,
        b: Buf,
        g: Option<Buf>,
    }
    let mut ups = Vec::with_capacity(layer.adapters.len());
    for (k, a) in layer.adapters.iter().enumerate() {
        let name = |s: &str| format!("adapters.{k}.{s}");
        let up = Up {
            a: upload(b, &a.lora_a, ad, &name("lora_A"))?,
            b: upload(b, &a.lora_b, ad, &name("lora_B"))?,
            g: None,
        };
        let g = match &a.magnitude {
            None => None,
            Some(m) => {
                let m = upload(b, m, DType::F32, &name("magnitude"))?;
                let ng = b
                    .alloc_zeroed(8 * d_out)
                    .with_context(|| format!("allocating n and g of adapter {k}"))?;
                // The partial sums of the tuned norm's split over d_in.
                let part = b
                    .alloc_zeroed(4 * super::spec::norm_partials_len(d_out, d_in))
                    .with_context(|| format!("allocating the norm partials of adapter {k}"))?;
                let args = launch::NormArgs {
                    dtype: dt,
                    adapter: ad,
                    w0: weight.ptr(),
                    fan_in_fan_out: layer.fan_in_fan_out,
                    a: up.a.ptr(),
                    b: up.b.ptr(),
                    m: Some(m.ptr()),
                    s: a.scaling as f32,
                    d_out,
                    d_in,
                    r: a.rank(),
                    n_out: ng.ptr(),
                    g_out: Some(ng.ptr().offset(4 * d_out)),
                    part: Some(part.ptr()),
                };
                // SAFETY: W0 holds d_out·d_in elements of `dt` in the layout fan_in_fan_out
                // says, A and B r·d_in and d_out·r of `ad`, m d_out f32 (shapes validated by
                // layer.dims()), `ng` 2·d_out f32 (n, then g), `part` norm_partials_len f32.
                unsafe { launch::norm(b, &args, None) }
                    .with_context(|| format!("the norm of adapter {k}"))?;
                Some(ng)
            }
        };
        ups.push(Up { g, ..up });
    }
    let slots: Vec<Option<SlotAdapter>> = layer
        .adapters
        .iter()
        .zip(&ups)
        .map(|(a, u)| {
            Some(SlotAdapter {
                lora_a: u.a.ptr(),
                lora_b: u.b.ptr(),
                g: u.g.as_ref().map(|g| g.ptr().offset(4 * d_out)),
                rank: a.rank(),
                scaling: a.scaling as f32,
            })
        })
        .collect();
    // SAFETY: every address points into a buffer of `ups`, which outlives the tables' use
    // below, holding the tensor SlotAdapter describes (A, B in `ad`; g after n in `ng`).
    let mut tables = unsafe { SlotTables::new(b, ad, (d_in, d_out), r_max, &slots) }?;

    let xb = upload(b, x, dt, "x")?;
    let index = upload_bytes(b, bytemuck::cast_slice(adapter_index), INDEX_NAME)?;
    let u = b
        .alloc_zeroed(4 * workspace_len(t, r_max))
        .context("allocating the U workspace")?;
    let sz = dt.size();
    let (out, ld, col0, shape) = match base {
        MultiBase::Compute => {
            let out = b.alloc_zeroed(t * d_out * sz).context("allocating y")?;
            let g = launch::Gemm {
                dtype: dt,
                m: t,
                n: d_out,
                k: d_in,
                x: xb.ptr(),
                w: weight.ptr(),
                trans_w: !layer.fan_in_fan_out,
                c: out.ptr(),
                ldc: d_out,
                alpha: 1.0,
                beta: 0.0,
            };
            // SAFETY: x [t, d_in], W0 [d_out, d_in] (or [d_in, d_out] with fan_in_fan_out,
            // hence trans_w only without it) and out [t, d_out], all dense in `dt`.
            unsafe { launch::gemm(b, &g) }.context("the base product x·W0ᵀ")?;
            (out, d_out, 0, vec![t, d_out])
        }
        MultiBase::Given { out, col0 } => {
            let s = out.shape();
            ensure!(
                s.len() == 2 && s[0] == t && col0 + d_out <= s[1],
                "base output is {s:?}: expected [{t}, ld] with columns {col0}..{} inside",
                col0 + d_out
            );
            ensure!(
                out.dtype() == dt,
                "base output is {}, expected x's dtype {dt}",
                out.dtype()
            );
            (upload(b, out, dt, "base output")?, s[1], col0, s.to_vec())
        }
    };
    let slice = out.ptr().offset(col0 * sz);
    let batch = MultiBatch {
        dtype: dt,
        x: xb.ptr(),
        ldx: d_in,
        index: index.ptr(),
        t,
        base: slice,
        ld_base: ld,
        y: slice,
        ld_y: ld,
        bias: bias.as_ref().map(|b| b.ptr()),
        u: u.ptr(),
    };
    // SAFETY: x [t, d_in], index [t] i32, out [t, ld] with the slice col0..col0+d_out inside,
    // u [t, r_max] f32 and bias [d_out] f32 were allocated above at those sizes; the tables'
    // buffers (`ups`) are alive.
    unsafe { forward(b, &tables, &batch) }?;
    let mut bytes = vec![0u8; shape.iter().product::<usize>() * sz];
    b.download(&out, &mut bytes).context("downloading y")?;
    if let Err(e) = tables.check_errors(b) {
        // The device flagged it; the host has the indices here, so name the token too.
        crate::case_multi::check_index(adapter_index, layer.adapters.len())?;
        return Err(e);
    }
    drop(ups);
    Tensor::from_bytes(dt, shape, &bytes).context("reading back y")
}
