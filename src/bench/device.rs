//! The device side of the benchmark, generic over a [`Backend`]: CUDA (timed with CUDA
//! events, L2 flushed before every timed run, ceilings measured in the same run) or the CPU
//! emulator (marked as such; its times say nothing about GPU speed).
//!
//! Rows per shape, rank and T:
//! - **base**: `Backend::gemm` alone (cuBLAS on CUDA): `x·W0ᵀ`, and `dy·W0` for the backward;
//! - **dorafuse**: [`DoraLayer`] (the fused kernels) for plain LoRA and DoRA: the norm
//!   (`magnitude_scale` after `invalidate`), the epilogue (`forward` with the base product
//!   supplied and g cached), the training forward (`forward_train`), the backward, both, and
//!   the inference forward with cached g;
//! - **unfused**: DoRA as PEFT runs it, one pass per PyTorch operation: `Backend::gemm` for
//!   every product and `kernels/baseline.cu` for the elementwise and reduction passes
//!   (materialised `B·A`, `V = W0 + s·B·A`, row norms, `(g − 1)·base`, `g·s·lora`, two adds;
//!   the backward likewise).

use super::formula::{LayerKind, Op};
use super::inputs::SplitMix;
use super::measure::{measure_with_setup, rotation_sets, Clock, SyncClock};
use super::report::{imp, series_label, Ceilings, DeviceInfo, Report, Row, Settings};
use super::suite::Config;
use crate::backend::{Backend, DevPtr, DeviceBuffer, GemmDesc, KernelArg, LaunchDims};
use crate::dtype::DType;
use crate::kernels::{Base, DevTensor, DoraLayer, DoraWeights, GradTargets};
use crate::layer::{GradMode, Shape, NORM_EPS};
use crate::tensor::Tensor;
use anyhow::{Context, Result};

/// The (implementation, kind, op) rows measured per shape, rank and T, in order.
/// `Norm` rows are measured once per shape and rank (`t = 0`).
pub fn device_rows(ops: &[Op]) -> Vec<(&'static str, LayerKind, Op)> {
    let all = [
        (imp::BASE, LayerKind::Base, Op::Forward),
        (imp::DORAFUSE, LayerKind::Lora, Op::Forward),
        (imp::UNFUSED, LayerKind::Dora, Op::Forward),
        (imp::DORAFUSE, LayerKind::Dora, Op::Forward),
        (imp::DORAFUSE, LayerKind::Dora, Op::Epilogue),
        (imp::DORAFUSE, LayerKind::Dora, Op::Inference),
        (imp::BASE, LayerKind::Base, Op::Backward),
        (imp::DORAFUSE, LayerKind::Dora, Op::Backward),
        (imp::BASE, LayerKind::Base, Op::ForwardBackward),
        (imp::DORAFUSE, LayerKind::Lora, Op::ForwardBackward),
        (imp::UNFUSED, LayerKind::Dora, Op::ForwardBackward),
        (imp::DORAFUSE, LayerKind::Dora, Op::ForwardBackward),
    ];
    all.into_iter()
        .filter(|(_, _, o)| ops.contains(o))
        .collect()
}

/// Rows a device run of `cfg` measures (for the progress bar).
pub fn row_count(cfg: &Config) -> usize {
    let norm = if cfg.ops.contains(&Op::Norm) { 2 } else { 0 };
    cfg.shapes.len() * cfg.ranks.len() * (norm + device_rows(&cfg.ops).len() * cfg.tokens.len())
}

/// Random non-zero bytes of `n` elements of `dtype`, uniform in `[-scale, scale)`.
fn random_bytes(rng: &mut SplitMix, n: usize, dtype: DType, scale: f32) -> Result<Vec<u8>> {
    let v = rng.fill(n, scale);
    Ok(Tensor::from_f32(dtype, vec![n], &v)?.as_bytes().to_vec())
}

fn upload_new<B: Backend>(b: &B, bytes: &[u8], what: &str) -> Result<B::Buffer> {
    let mut buf = b
        .alloc_zeroed(bytes.len())
        .with_context(|| format!("allocating {what} ({} bytes)", bytes.len()))?;
    b.upload(&mut buf, bytes)
        .with_context(|| format!("uploading {what}"))?;
    Ok(buf)
}

/// One rotated input set on the device.
struct DevSet<B: Backend> {
    w: B::Buffer,
    a: B::Buffer,
    bm: B::Buffer,
    m: B::Buffer,
    x: B::Buffer,
    dy: B::Buffer,
}

impl<B: Backend> DevSet<B> {
    fn new(b: &B, s: Shape, dt: DType, seed: u64) -> Result<Self> {
        let mut rng = SplitMix::new(seed);
        let ws = 1.0 / (s.d_in as f32).sqrt();
        let m: Vec<f32> = (0..s.d_out)
            .map(|_| (1.0 / 3f32.sqrt()) * (1.0 + rng.uniform(0.1)))
            .collect();
        Ok(DevSet {
            w: upload_new(
                b,
                &random_bytes(&mut rng, s.d_out * s.d_in, dt, ws)?,
                "weight",
            )?,
            a: upload_new(b, &random_bytes(&mut rng, s.r * s.d_in, dt, ws)?, "lora_A")?,
            bm: upload_new(
                b,
                &random_bytes(&mut rng, s.d_out * s.r, dt, 0.5 / (s.r as f32).sqrt())?,
                "lora_B",
            )?,
            m: upload_new(b, bytemuck::cast_slice(&m), "magnitude")?,
            x: upload_new(b, &random_bytes(&mut rng, s.t * s.d_in, dt, 1.0)?, "x")?,
            dy: upload_new(
                b,
                &random_bytes(&mut rng, s.t * s.d_out, dt, 1.0)?,
                "grad_y",
            )?,
        })
    }

    fn bytes(s: Shape, dt: DType) -> usize {
        dt.size() * (s.d_out * s.d_in + s.r * (s.d_in + s.d_out) + s.t * (s.d_in + s.d_out))
            + 4 * s.d_out
    }

    fn weights(&self, s: Shape, dt: DType, dora: bool) -> DoraWeights<'_> {
        DoraWeights {
            weight: DevTensor::of(&self.w, dt),
            fan_in_fan_out: false,
            bias: None,
            lora_a: DevTensor::of(&self.a, dt),
            lora_b: DevTensor::of(&self.bm, dt),
            magnitude: dora.then(|| DevTensor::of(&self.m, DType::F32)),
            scaling: 2.0,
            d_in: s.d_in,
            d_out: s.d_out,
            r: s.r,
        }
    }
}

/// Outputs and the unfused baseline's temporaries, shared by every set.
struct Scratch<B: Backend> {
    y: B::Buffer,
    base: B::Buffer,
    gx: B::Buffer,
    ga: B::Buffer,
    gb: B::Buffer,
    gm: B::Buffer,
    // Unfused temporaries (layer dtype unless noted).
    ba: B::Buffer,
    v: B::Buffer,
    n: B::Buffer, // f32
    g: B::Buffer, // f32
    u: B::Buffer,
    lora: B::Buffer,
    tmp: B::Buffer,
    tmp2: B::Buffer,
    dbase: B::Buffer,
    dlora: B::Buffer,
    du: B::Buffer,
    uga: B::Buffer,
    ugb: B::Buffer,
}

impl<B: Backend> Scratch<B> {
    fn new(b: &B, s: Shape, dt: DType) -> Result<Self> {
        let e = dt.size();
        let al = |n: usize, what: &str| {
            b.alloc_zeroed(n.max(1))
                .with_context(|| format!("allocating {what} ({n} bytes) for {s}"))
        };
        let to = s.t * s.d_out * e;
        Ok(Scratch {
            y: al(to, "y")?,
            base: al(to, "base")?,
            gx: al(s.t * s.d_in * e, "grad_x")?,
            ga: al(4 * s.r * s.d_in, "grad_lora_A")?,
            gb: al(4 * s.d_out * s.r, "grad_lora_B")?,
            gm: al(4 * s.d_out, "grad_magnitude")?,
            ba: al(s.d_out * s.d_in * e, "unfused B·A")?,
            v: al(s.d_out * s.d_in * e, "unfused V")?,
            n: al(4 * s.d_out, "unfused n")?,
            g: al(4 * s.d_out, "unfused g")?,
            u: al(s.t * s.r * e, "unfused U")?,
            lora: al(to, "unfused lora")?,
            tmp: al(to, "unfused tmp")?,
            tmp2: al(to, "unfused tmp2")?,
            dbase: al(to, "unfused dbase")?,
            dlora: al(to, "unfused dlora")?,
            du: al(s.t * s.r * e, "unfused dU")?,
            uga: al(s.r * s.d_in * e, "unfused grad_A")?,
            ugb: al(s.d_out * s.r * e, "unfused grad_B")?,
        })
    }

    /// Bytes of the unfused temporaries at `t` tokens (what PEFT's graph allocates beyond
    /// the inputs and outputs).
    fn unfused_extra(s: Shape, dt: DType, backward: bool) -> usize {
        let e = dt.size();
        // Forward: B·A and V, n and g, U, and lora, (g − 1)·base, g·s·lora, result_dora.
        let fwd = 2 * s.d_out * s.d_in * e + 8 * s.d_out + s.t * s.r * e + 4 * s.t * s.d_out * e;
        // Backward: d(lora) and dU (the other [T, d_out] temporaries are reused).
        let bwd = s.t * s.d_out * e + s.t * s.r * e;
        fwd + if backward { bwd } else { 0 }
    }
}

/// `C = alpha·op(A)·op(B) + beta·C`, row-major, every operand in `dt`.
#[allow(clippy::too_many_arguments)]
fn gemm<B: Backend>(
    b: &B,
    dt: DType,
    (m, n, k): (usize, usize, usize),
    a: DevPtr,
    trans_a: bool,
    bp: DevPtr,
    trans_b: bool,
    c: DevPtr,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let g = GemmDesc {
        m,
        n,
        k,
        a,
        a_dtype: dt,
        lda: if trans_a { m } else { k },
        trans_a,
        b: bp,
        b_dtype: dt,
        ldb: if trans_b { k } else { n },
        trans_b,
        c,
        c_dtype: dt,
        ldc: n,
        alpha,
        beta,
    };
    // SAFETY: every caller passes buffers allocated for exactly these shapes in `dt`
    // (DevSet and Scratch are sized from the same Shape), row-major and contiguous.
    unsafe { b.gemm(&g) }.with_context(|| format!("gemm {m}x{n}x{k}"))
}

/// Grid for a grid-stride loop over `n` elements: enough blocks to fill a large GPU, no
/// more than needed.
fn stride_dims(n: usize) -> LaunchDims {
    LaunchDims {
        grid: [n.div_ceil(256).clamp(1, 8192) as u32, 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
    }
}

/// The baseline kernels of `kernels/baseline.cu`, with their argument lists in one place.
struct Baseline {
    sfx: &'static str,
}

impl Baseline {
    /// `out = alpha·a + beta·b` over `n` elements.
    #[allow(clippy::too_many_arguments)]
    fn axpby<B: Backend>(
        &self,
        b: &B,
        out: DevPtr,
        a: DevPtr,
        bb: DevPtr,
        alpha: f32,
        beta: f32,
        n: usize,
    ) -> Result<()> {
        let args = [
            KernelArg::Ptr(out),
            KernelArg::Ptr(a),
            KernelArg::Ptr(bb),
            KernelArg::F32(alpha),
            KernelArg::F32(beta),
            KernelArg::I64(n as i64),
        ];
        // SAFETY: matches `baseline_axpby_<dt>(T* out, const T* a, const T* b, float alpha,
        // float beta, long long n)`; out, a and b hold n elements of the dtype (callers pass
        // Scratch/DevSet buffers of that size); a grid-stride loop writes every out[e < n].
        unsafe {
            b.launch(
                &format!("baseline_axpby_{}", self.sfx),
                stride_dims(n),
                &args,
            )
        }
    }

    /// `out[t, j] = alpha·(g[j] + shift)·a[t, j]`.
    #[allow(clippy::too_many_arguments)]
    fn scale_cols<B: Backend>(
        &self,
        b: &B,
        out: DevPtr,
        a: DevPtr,
        g: DevPtr,
        shift: f32,
        alpha: f32,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let args = [
            KernelArg::Ptr(out),
            KernelArg::Ptr(a),
            KernelArg::Ptr(g),
            KernelArg::F32(shift),
            KernelArg::F32(alpha),
            KernelArg::I64(rows as i64),
            KernelArg::I32(i32::try_from(cols).context("scale_cols: too many columns")?),
        ];
        // SAFETY: matches `baseline_scale_cols_<dt>(T* out, const T* a, const float* g, float
        // shift, float alpha, long long rows, int cols)`; out and a hold rows·cols elements, g
        // holds cols f32.
        unsafe {
            b.launch(
                &format!("baseline_scale_cols_{}", self.sfx),
                stride_dims(rows * cols),
                &args,
            )
        }
    }

    /// `n_j = ‖v_j‖`, `g_j = m_j / max(n_j, ε)`.
    #[allow(clippy::too_many_arguments)]
    fn row_norm<B: Backend>(
        &self,
        b: &B,
        v: DevPtr,
        m: DevPtr,
        rows: usize,
        cols: usize,
        n: DevPtr,
        g: DevPtr,
    ) -> Result<()> {
        let args = [
            KernelArg::Ptr(v),
            KernelArg::Ptr(m),
            KernelArg::I32(i32::try_from(cols).context("row_norm: too many columns")?),
            KernelArg::F32(NORM_EPS as f32),
            KernelArg::Ptr(n),
            KernelArg::Ptr(g),
        ];
        // One block of 256 threads (the kernel's SMALL_THREADS, a warp multiple) per row.
        let dims = LaunchDims {
            grid: [
                u32::try_from(rows).context("row_norm: too many rows")?,
                1,
                1,
            ],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: matches `baseline_row_norm_<dt>(const T* v, const float* m, int cols, float
        // eps, float* n, float* g)`; v holds rows·cols elements, m, n, g hold rows f32; the
        // block size equals the kernel's shared-array sizing (256 threads).
        unsafe { b.launch(&format!("baseline_row_norm_{}", self.sfx), dims, &args) }
    }

    /// `out[j] = Σ_t a[t, j]·b[t, j] / max(n_j, ε)`.
    #[allow(clippy::too_many_arguments)]
    fn col_dot<B: Backend>(
        &self,
        b: &B,
        a: DevPtr,
        bb: DevPtr,
        n: DevPtr,
        rows: usize,
        cols: usize,
        out: DevPtr,
    ) -> Result<()> {
        let args = [
            KernelArg::Ptr(a),
            KernelArg::Ptr(bb),
            KernelArg::Ptr(n),
            KernelArg::F32(NORM_EPS as f32),
            KernelArg::I32(i32::try_from(rows).context("col_dot: too many rows")?),
            KernelArg::I32(i32::try_from(cols).context("col_dot: too many columns")?),
            KernelArg::Ptr(out),
        ];
        let dims = LaunchDims {
            grid: [cols.div_ceil(256) as u32, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        // SAFETY: matches `baseline_col_dot_<dt>(const T* a, const T* b, const float* n, float
        // eps, int rows, int cols, float* out)`; a and b hold rows·cols elements, n and out
        // cols f32; threads with j ≥ cols return before any access.
        unsafe { b.launch(&format!("baseline_col_dot_{}", self.sfx), dims, &args) }
    }
}

/// PEFT's norm passes: materialise `B·A`, `V = W0 + s·B·A`, row norms and g.
fn unfused_norm<B: Backend>(
    b: &B,
    k: &Baseline,
    s: Shape,
    dt: DType,
    set: &DevSet<B>,
    sc: &Scratch<B>,
) -> Result<()> {
    let (i, o, r) = (s.d_in, s.d_out, s.r);
    gemm(
        b,
        dt,
        (o, i, r),
        set.bm.ptr(),
        false,
        set.a.ptr(),
        false,
        sc.ba.ptr(),
        1.0,
        0.0,
    )?;
    k.axpby(b, sc.v.ptr(), set.w.ptr(), sc.ba.ptr(), 1.0, 2.0, o * i)?;
    k.row_norm(b, sc.v.ptr(), set.m.ptr(), o, i, sc.n.ptr(), sc.g.ptr())
}

/// PEFT's forward: the norm passes, then `base`, `lora`, `(g − 1)·base`, `g·s·lora`, two adds.
fn unfused_forward<B: Backend>(
    b: &B,
    k: &Baseline,
    s: Shape,
    dt: DType,
    set: &DevSet<B>,
    sc: &Scratch<B>,
) -> Result<()> {
    let (t, i, o, r) = (s.t, s.d_in, s.d_out, s.r);
    unfused_norm(b, k, s, dt, set, sc)?;
    gemm(
        b,
        dt,
        (t, o, i),
        set.x.ptr(),
        false,
        set.w.ptr(),
        true,
        sc.base.ptr(),
        1.0,
        0.0,
    )?;
    gemm(
        b,
        dt,
        (t, r, i),
        set.x.ptr(),
        false,
        set.a.ptr(),
        true,
        sc.u.ptr(),
        1.0,
        0.0,
    )?;
    gemm(
        b,
        dt,
        (t, o, r),
        sc.u.ptr(),
        false,
        set.bm.ptr(),
        true,
        sc.lora.ptr(),
        1.0,
        0.0,
    )?;
    k.scale_cols(b, sc.tmp.ptr(), sc.base.ptr(), sc.g.ptr(), -1.0, 1.0, t, o)?;
    k.scale_cols(b, sc.tmp2.ptr(), sc.lora.ptr(), sc.g.ptr(), 0.0, 2.0, t, o)?;
    // result_dora into its own buffer (the kernel's pointers are __restrict__: no aliasing).
    k.axpby(
        b,
        sc.dbase.ptr(),
        sc.tmp.ptr(),
        sc.tmp2.ptr(),
        1.0,
        1.0,
        t * o,
    )?;
    k.axpby(
        b,
        sc.y.ptr(),
        sc.base.ptr(),
        sc.dbase.ptr(),
        1.0,
        1.0,
        t * o,
    )
}

/// The backward autograd runs for PEFT's graph (norm detached), after `unfused_forward`.
fn unfused_backward<B: Backend>(
    b: &B,
    k: &Baseline,
    s: Shape,
    dt: DType,
    set: &DevSet<B>,
    sc: &Scratch<B>,
) -> Result<()> {
    let (t, i, o, r) = (s.t, s.d_in, s.d_out, s.r);
    // d(base) = dy + (g − 1)·dy; d(lora) = g·s·dy; dm = Σ_t dy⊙(base + s·lora) / n.
    k.scale_cols(b, sc.tmp.ptr(), set.dy.ptr(), sc.g.ptr(), -1.0, 1.0, t, o)?;
    k.axpby(
        b,
        sc.dbase.ptr(),
        set.dy.ptr(),
        sc.tmp.ptr(),
        1.0,
        1.0,
        t * o,
    )?;
    k.scale_cols(b, sc.dlora.ptr(), set.dy.ptr(), sc.g.ptr(), 0.0, 2.0, t, o)?;
    k.axpby(
        b,
        sc.tmp2.ptr(),
        sc.base.ptr(),
        sc.lora.ptr(),
        1.0,
        2.0,
        t * o,
    )?;
    k.col_dot(
        b,
        set.dy.ptr(),
        sc.tmp2.ptr(),
        sc.n.ptr(),
        t,
        o,
        sc.gm.ptr(),
    )?;
    // dx = d(base)·W0 + (d(lora)·B)·A; dB = d(lora)ᵀ·U; dA = (d(lora)·B)ᵀ·x.
    gemm(
        b,
        dt,
        (t, i, o),
        sc.dbase.ptr(),
        false,
        set.w.ptr(),
        false,
        sc.gx.ptr(),
        1.0,
        0.0,
    )?;
    gemm(
        b,
        dt,
        (t, r, o),
        sc.dlora.ptr(),
        false,
        set.bm.ptr(),
        false,
        sc.du.ptr(),
        1.0,
        0.0,
    )?;
    gemm(
        b,
        dt,
        (t, i, r),
        sc.du.ptr(),
        false,
        set.a.ptr(),
        false,
        sc.gx.ptr(),
        1.0,
        1.0,
    )?;
    gemm(
        b,
        dt,
        (o, r, t),
        sc.dlora.ptr(),
        true,
        sc.u.ptr(),
        false,
        sc.ugb.ptr(),
        1.0,
        0.0,
    )?;
    gemm(
        b,
        dt,
        (r, i, t),
        sc.du.ptr(),
        true,
        set.x.ptr(),
        false,
        sc.uga.ptr(),
        1.0,
        0.0,
    )
}

/// What a device run needs besides the backend: its clock, ceilings and description.
pub struct DeviceRun<'c> {
    /// The clock (CUDA events with an L2 flush, or synchronize + host clock).
    pub clock: &'c mut dyn Clock,
    /// Ceilings measured in this run (None on the emulator).
    pub ceilings: Option<Ceilings>,
    /// The device.
    pub device: DeviceInfo,
    /// Cache bytes the rotated sets must exceed twice (L2 on a GPU).
    pub cache_bytes: usize,
    /// How the cache is kept out (for the report).
    pub cache_policy: String,
    /// Notes for the report.
    pub notes: Vec<String>,
}

/// Runs `cfg` on backend `b`.
///
/// # Errors
/// A failure in any row, naming it.
pub fn run_backend<B: Backend>(
    b: &B,
    cfg: &Config,
    run: DeviceRun<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    cfg.validate()?;
    let DeviceRun {
        clock,
        ceilings,
        device,
        cache_bytes,
        cache_policy,
        notes,
    } = run;
    let dt = cfg.dtype;
    let mut report = Report::new(
        device,
        Settings {
            clock: clock.describe(),
            warmup: cfg.plan.warmup,
            min_reps: cfg.plan.min_reps,
            max_reps: cfg.plan.max_reps,
            budget_s: cfg.plan.budget_s.is_finite().then_some(cfg.plan.budget_s),
            cache_policy,
        },
        ceilings.clone(),
    );
    report.notes.extend(notes);
    let k = Baseline { sfx: dt.name() };
    let rows = device_rows(&cfg.ops);
    let kind = report.device.kind.clone();
    for &(d_in, d_out) in &cfg.shapes {
        for &r in &cfg.ranks {
            let t_max = *cfg.tokens.iter().max().expect("validated");
            let full = Shape {
                t: t_max,
                d_in,
                d_out,
                r,
            };
            let n_sets = rotation_sets(DevSet::<B>::bytes(full, dt), cache_bytes, 4);
            let sets: Vec<DevSet<B>> = (0..n_sets)
                .map(|i| DevSet::new(b, full, dt, 7000 + i as u64))
                .collect::<Result<_>>()
                .with_context(|| format!("inputs for {full}"))?;
            let sc = Scratch::new(b, full, dt)?;
            let mut dora: Vec<DoraLayer<'_, B>> = sets
                .iter()
                .map(|s| DoraLayer::new(b, s.weights(full, dt, true)))
                .collect::<Result<_>>()?;
            let mut lora: Vec<DoraLayer<'_, B>> = sets
                .iter()
                .map(|s| DoraLayer::new(b, s.weights(full, dt, false)))
                .collect::<Result<_>>()?;
            let push = |report: &mut Report,
                        im: &str,
                        kd: LayerKind,
                        op: Op,
                        shape: Shape,
                        st,
                        extra: Option<(usize, &str)>|
             -> Result<()> {
                let mut row = Row::new(im, kd, op, shape, dt, st, ceilings.as_ref())?;
                if let Some((bytes, src)) = extra {
                    row.extra_mem_bytes = Some(bytes as u64);
                    row.extra_mem_source = Some(src.to_string());
                }
                report.rows.push(row);
                Ok(())
            };
            if cfg.ops.contains(&Op::Norm) {
                let shape = Shape { t: 0, ..full };
                let label = format!("{kind} DoRA unfused norm {d_in}x{d_out} r={r}");
                progress(&label);
                let st = measure_with_setup(
                    &mut *clock,
                    &cfg.plan,
                    n_sets,
                    |_| Ok(()),
                    |i| unfused_norm(b, &k, full, dt, &sets[i], &sc),
                )
                .with_context(|| label.clone())?;
                let extra = 2 * d_out * d_in * dt.size() + 8 * d_out;
                push(
                    &mut report,
                    imp::UNFUSED,
                    LayerKind::Dora,
                    Op::Norm,
                    shape,
                    st,
                    Some((extra, "allocated temporaries (B·A, V, n, g)")),
                )?;
                let label = format!("{kind} DoRA fused norm {d_in}x{d_out} r={r}");
                progress(&label);
                // invalidate() only bumps a host-side version number: nothing on the device.
                let st = measure_with_setup(
                    &mut *clock,
                    &cfg.plan,
                    n_sets,
                    |_| Ok(()),
                    |i| {
                        dora[i].invalidate();
                        dora[i].magnitude_scale(b).map(|_| ())
                    },
                )
                .with_context(|| label.clone())?;
                push(
                    &mut report,
                    imp::DORAFUSE,
                    LayerKind::Dora,
                    Op::Norm,
                    shape,
                    st,
                    Some((
                        0,
                        "workspace_bytes (the n/g cache of 8·d_out bytes is the output)",
                    )),
                )?;
            }
            for &t in &cfg.tokens {
                // Views of the first t tokens.
                let xv: Vec<DevTensor<'_>> = sets
                    .iter()
                    .map(|s| DevTensor::of(&s.x, dt).slice(0, t * d_in))
                    .collect::<Result<_>>()?;
                let dyv: Vec<DevTensor<'_>> = sets
                    .iter()
                    .map(|s| DevTensor::of(&s.dy, dt).slice(0, t * d_out))
                    .collect::<Result<_>>()?;
                let y = DevTensor::of(&sc.y, dt).slice(0, t * d_out)?;
                let base_v = DevTensor::of(&sc.base, dt).slice(0, t * d_out)?;
                let grads = GradTargets {
                    grad_x: DevTensor::of(&sc.gx, dt).slice(0, t * d_in)?,
                    grad_lora_a: DevTensor::of(&sc.ga, DType::F32),
                    grad_lora_b: DevTensor::of(&sc.gb, DType::F32),
                    grad_magnitude: Some(DevTensor::of(&sc.gm, DType::F32)),
                };
                let lora_grads = GradTargets {
                    grad_magnitude: None,
                    ..grads
                };
                // The base product once, for the epilogue rows (its value is realistic).
                gemm(
                    b,
                    dt,
                    (t, d_out, d_in),
                    sets[0].x.ptr(),
                    false,
                    sets[0].w.ptr(),
                    true,
                    sc.base.ptr(),
                    1.0,
                    0.0,
                )?;
                let ts = Shape { t, ..full };
                for &(im, kd, op) in &rows {
                    let label = format!(
                        "{kind} {} {} {d_in}x{d_out} r={r} T={t}",
                        series_label(im, kd),
                        op.name()
                    );
                    progress(&label);
                    let base_fwd = |i: usize| {
                        gemm(
                            b,
                            dt,
                            (t, d_out, d_in),
                            sets[i].x.ptr(),
                            false,
                            sets[i].w.ptr(),
                            true,
                            sc.y.ptr(),
                            1.0,
                            0.0,
                        )
                    };
                    let base_bwd = |i: usize| {
                        gemm(
                            b,
                            dt,
                            (t, d_in, d_out),
                            sets[i].dy.ptr(),
                            false,
                            sets[i].w.ptr(),
                            false,
                            sc.gx.ptr(),
                            1.0,
                            0.0,
                        )
                    };
                    let (st, extra): (_, Option<(usize, &str)>) = match (im, kd, op) {
                        (imp::BASE, _, Op::Forward) => (measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), base_fwd), None),
                        (imp::BASE, _, Op::Backward) => (measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), base_bwd), None),
                        (imp::BASE, _, Op::ForwardBackward) => (
                            measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                base_fwd(i)?;
                                base_bwd(i)
                            }),
                            None,
                        ),
                        (imp::UNFUSED, _, Op::Forward) => (
                            measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| unfused_forward(b, &k, ts, dt, &sets[i], &sc)),
                            Some((Scratch::<B>::unfused_extra(ts, dt, false), "allocated temporaries (B·A, V, n, g, U, lora, two [T, d_out] passes)")),
                        ),
                        (imp::UNFUSED, _, Op::ForwardBackward) => (
                            measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                unfused_forward(b, &k, ts, dt, &sets[i], &sc)?;
                                unfused_backward(b, &k, ts, dt, &sets[i], &sc)
                            }),
                            Some((Scratch::<B>::unfused_extra(ts, dt, true), "allocated temporaries")),
                        ),
                        (imp::DORAFUSE, _, _) => {
                            let layers = if kd == LayerKind::Dora { &mut dora } else { &mut lora };
                            let gr = if kd == LayerKind::Dora { &grads } else { &lora_grads };
                            // Cached g for the inference and epilogue rows.
                            for l in layers.iter_mut() {
                                l.magnitude_scale(b)?;
                            }
                            let st = match op {
                                Op::Epilogue => measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                    layers[i].forward(b, &xv[i], t, Base::Supplied(base_v), &y)
                                }),
                                Op::Inference => measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                    layers[i].forward(b, &xv[i], t, Base::Compute, &y)
                                }),
                                Op::Forward => measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                    layers[i].forward_train(b, &xv[i], t, Base::Compute, &y)
                                }),
                                Op::Backward => {
                                    // The forward is set-up (untimed); the layer keeps its saved
                                    // tensors for the timed backward.
                                    let cell = std::cell::RefCell::new(&mut *layers);
                                    measure_with_setup(
                                        &mut *clock,
                                        &cfg.plan,
                                        n_sets,
                                        |i| cell.borrow_mut()[i].forward_train(b, &xv[i], t, Base::Compute, &y),
                                        |i| cell.borrow_mut()[i].backward(b, &xv[i], &dyv[i], gr, GradMode::Detached),
                                    )
                                }
                                Op::ForwardBackward => measure_with_setup(&mut *clock, &cfg.plan, n_sets, |_| Ok(()), |i| {
                                    layers[i].forward_train(b, &xv[i], t, Base::Compute, &y)?;
                                    layers[i].backward(b, &xv[i], &dyv[i], gr, GradMode::Detached)
                                }),
                                Op::Norm => unreachable!("norm rows are measured per shape"),
                            };
                            let ws = layers.iter().map(|l| l.workspace_bytes()).max().unwrap_or(0);
                            (st, Some((ws, "DoraLayer::workspace_bytes after the runs")))
                        }
                        _ => unreachable!("device_rows lists only these"),
                    };
                    let st = st.with_context(|| label.clone())?;
                    push(&mut report, im, kd, op, ts, st, extra)?;
                }
            }
            drop(dora);
            drop(lora);
        }
    }
    Ok(report)
}

/// Runs `cfg` on the CPU emulator: the same kernels and launch code as on a GPU, timed with
/// the host clock; no ceilings (they would mean nothing).
///
/// # Errors
/// A failure in any row, naming it.
pub fn run_emu(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let b = crate::emu::EmuBackend::from_env()?;
    let mut clock = SyncClock::new(|| b.synchronize());
    let cpu = super::report::host_cpu();
    run_backend(
        &b,
        cfg,
        DeviceRun {
            clock: &mut clock,
            ceilings: None,
            device: DeviceInfo {
                kind: "emu".into(),
                name: format!("CUDA emulator on {}", cpu.name),
                units: cpu.units,
                memory_bytes: cpu.memory_bytes,
            },
            cache_bytes: 0,
            cache_policy: "none (emulator)".into(),
            notes: vec![
                "emulator: the CUDA kernels run on the CPU emulator; emulator times say nothing about GPU speed".into(),
            ],
        },
        progress,
    )
}

pub use super::cuda::run_cuda;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::Plan;

    #[test]
    fn counts_rows() {
        let cfg = Config::default_gpu();
        assert_eq!(device_rows(&cfg.ops).len(), 12);
        assert_eq!(row_count(&cfg), 3 * 2 * (2 + 12 * 5));
    }

    #[test]
    fn emulator_run_has_every_row_and_the_unfused_result_is_right() {
        let cfg = Config {
            shapes: vec![(40, 24)],
            tokens: vec![1, 3],
            ranks: vec![2],
            dtype: DType::F32,
            ops: Op::ALL.to_vec(),
            plan: Plan::fixed(0, 1),
        };
        let rep = run_emu(&cfg, &mut |_| {}).unwrap();
        assert_eq!(rep.rows.len(), row_count(&cfg));
        assert_eq!(rep.device.kind, "emu");
        assert!(rep.ceilings.is_none());
        assert!(rep
            .notes
            .iter()
            .any(|n| n.contains("say nothing about GPU speed")));
    }

    #[test]
    fn unfused_device_composition_matches_the_cpu_baseline() {
        // The unfused passes on the emulator against the CPU unfused baseline (itself checked
        // against f64 truth in bench::cpu), on a shape off every tile.
        let b = crate::emu::EmuBackend::new(3);
        let s = Shape {
            t: 5,
            d_in: 37,
            d_out: 21,
            r: 3,
        };
        for dt in [DType::F32, DType::BF16] {
            let set = DevSet::new(&b, s, dt, 42).unwrap();
            let sc = Scratch::new(&b, s, dt).unwrap();
            let k = Baseline { sfx: dt.name() };
            unfused_forward(&b, &k, s, dt, &set, &sc).unwrap();
            unfused_backward(&b, &k, s, dt, &set, &sc).unwrap();
            let get = |buf: &crate::emu::EmuBuffer, d: DType, shape: Vec<usize>| {
                let n: usize = shape.iter().product();
                let mut v = vec![0u8; n * d.size()];
                b.download(buf, &mut v).unwrap();
                Tensor::from_bytes(d, shape, &v).unwrap()
            };
            let layer = crate::layer::Layer {
                weight: get(&set.w, dt, vec![s.d_out, s.d_in]),
                bias: None,
                lora_a: get(&set.a, dt, vec![s.r, s.d_in]),
                lora_b: get(&set.bm, dt, vec![s.d_out, s.r]),
                magnitude: Some(get(&set.m, DType::F32, vec![s.d_out])),
                scaling: 2.0,
                fan_in_fan_out: false,
            };
            let host = super::super::inputs::InputSet {
                layer,
                x: get(&set.x, dt, vec![s.t, s.d_in]),
                dy: get(&set.dy, dt, vec![s.t, s.d_out]),
            };
            let mut ws = super::super::cpu::Workspace::new(s.t, s.d_in, s.d_out, s.r);
            super::super::cpu::unfused_forward(&host, &mut ws).unwrap();
            super::super::cpu::unfused_backward(&host, &mut ws).unwrap();
            let (y, g) = super::super::cpu::unfused_outputs(&host, &ws, true).unwrap();
            let [dx, _, _, dm] = g.unwrap();
            // The device rounds every intermediate to the dtype, as PEFT does: bf16 tolerances.
            let tol = if dt == DType::F32 { 1e-5 } else { 3e-2 };
            for (name, got, want) in [
                ("y", get(&sc.y, dt, vec![s.t, s.d_out]), y),
                ("grad_x", get(&sc.gx, dt, vec![s.t, s.d_in]), dx),
                ("grad_m", get(&sc.gm, DType::F32, vec![s.d_out]), dm),
            ] {
                let e = crate::tensor::rel_l2(&got.to_f64(), &want.to_f64());
                assert!(e < tol, "{name} {dt}: rel-L2 {e:e}");
            }
        }
    }
}
