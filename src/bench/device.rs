//! The device target, generic over a [`Backend`]: the fused kernels through [`DoraLayer`]
//! (plain LoRA and DoRA), `Backend::gemm` alone as the base layer (cuBLAS on CUDA), and
//! PEFT's unfused DoRA from `Backend::gemm` and the passes of `kernels/baseline.cu`, every
//! intermediate rounded to the layer dtype as PyTorch does. [`run_emu`] runs it on the CPU
//! emulator (its times say nothing about GPU speed); `cuda::run_cuda` on a GPU.

use super::inputs::{random_set, InputSet};
use super::measure::SyncClock;
use super::report::{host_cpu, imp, DeviceInfo, Report};
use super::runner::{self, Config, Layer, Machine, RowSpec, Target, WithLayer};
use super::unfused::{self, Passes, T};
use crate::backend::{Backend, DevPtr, DeviceBuffer, GemmDesc, KernelArg, LaunchDims};
use crate::dtype::DType;
use crate::formula::{LayerKind, Op};
use crate::kernels::{Base, DevTensor, DoraLayer, DoraWeights, GradTargets};
use crate::layer::{GradMode, Shape, NORM_EPS};
use anyhow::{Context, Result};

/// Whether a device target has `row`: every row.
pub fn has(_row: RowSpec) -> bool {
    true
}

/// The kernels on `backend`.
pub struct DeviceTarget<'b, B: Backend> {
    /// Where the kernels run.
    pub backend: &'b B,
}

/// Threads per block of the baseline kernels (their `SMALL_THREADS`, a warp multiple).
const BASELINE_THREADS: u32 = 256;

/// One input set on the device: the layer's tensors, x and dy at the largest T.
struct DevSet<B: Backend> {
    w: B::Buffer,
    a: B::Buffer,
    bm: B::Buffer,
    m: B::Buffer,
    x: B::Buffer,
    dy: B::Buffer,
    scaling: f32,
}

impl<B: Backend> DevSet<B> {
    fn upload(b: &B, set: &InputSet) -> Result<Self> {
        let l = &set.layer;
        let up = |t: &crate::tensor::Tensor, what: &str| -> Result<B::Buffer> {
            let bytes = t.as_bytes();
            let mut buf = (b.alloc_zeroed(bytes.len().max(1)))
                .with_context(|| format!("allocating {what} ({} bytes)", bytes.len()))?;
            b.upload(&mut buf, bytes)
                .with_context(|| format!("uploading {what}"))?;
            Ok(buf)
        };
        Ok(DevSet {
            w: up(&l.weight, "weight")?,
            a: up(&l.lora_a, "lora_A")?,
            bm: up(&l.lora_b, "lora_B")?,
            m: up(l.magnitude.as_ref().context("a DoRA layer")?, "magnitude")?,
            x: up(&set.x, "x")?,
            dy: up(&set.dy, "grad_y")?,
            scaling: l.scaling as f32,
        })
    }
}

/// The fused layer, DoRA and plain LoRA over one set: the one place the bench calls the
/// [`DoraLayer`] API, so a change of it is a change here.
struct Fused<'w, B: Backend> {
    dora: DoraLayer<'w, B>,
    lora: DoraLayer<'w, B>,
}

/// What a fused call reads and writes: views of the first T tokens.
struct Io<'a> {
    t: usize,
    x: DevTensor<'a>,
    dy: DevTensor<'a>,
    y: DevTensor<'a>,
    base: DevTensor<'a>,
    grads: GradTargets<'a>,
}

impl<'w, B: Backend> Fused<'w, B> {
    fn new(b: &B, set: &'w DevSet<B>, s: Shape, dt: DType) -> Result<Self> {
        let w = |dora: bool| DoraWeights {
            weight: DevTensor::of(&set.w, dt),
            fan_in_fan_out: false,
            bias: None,
            lora_a: DevTensor::of(&set.a, dt),
            lora_b: DevTensor::of(&set.bm, dt),
            magnitude: dora.then(|| DevTensor::of(&set.m, DType::F32)),
            scaling: set.scaling,
            d_in: s.d_in,
            d_out: s.d_out,
            r: s.r,
        };
        Ok(Fused {
            dora: DoraLayer::new(b, w(true))?,
            lora: DoraLayer::new(b, w(false))?,
        })
    }

    /// Computes and caches g (for the inference and compose rows).
    fn cache_g(&mut self, b: &B) -> Result<()> {
        self.dora.magnitude_scale(b).map(drop)
    }

    /// The untimed part of `op`: the forward whose saved tensors a timed backward reads.
    fn setup(&mut self, b: &B, kind: LayerKind, op: Op, io: &Io) -> Result<()> {
        let l = if kind == LayerKind::Dora {
            &mut self.dora
        } else {
            &mut self.lora
        };
        if op == Op::Backward {
            l.forward_train(b, &io.x, io.t, Base::Compute, &io.y)?;
        }
        Ok(())
    }

    fn call(&mut self, b: &B, kind: LayerKind, op: Op, io: &Io) -> Result<()> {
        let (l, grads) = if kind == LayerKind::Dora {
            (&mut self.dora, io.grads)
        } else {
            let g = GradTargets {
                grad_magnitude: None,
                ..io.grads
            };
            (&mut self.lora, g)
        };
        let backward =
            |l: &mut DoraLayer<'w, B>| l.backward(b, &io.x, &io.dy, &grads, GradMode::Detached);
        match op {
            Op::Norm => {
                // invalidate() only bumps a host-side version number: nothing on the device.
                l.invalidate();
                l.magnitude_scale(b).map(drop)
            }
            Op::Compose => l.forward(b, &io.x, io.t, Base::Supplied(io.base), &io.y),
            Op::Inference => l.forward(b, &io.x, io.t, Base::Compute, &io.y),
            Op::Forward => l.forward_train(b, &io.x, io.t, Base::Compute, &io.y),
            Op::Backward => backward(l),
            Op::ForwardBackward => {
                l.forward_train(b, &io.x, io.t, Base::Compute, &io.y)?;
                backward(l)
            }
        }
    }

    fn workspace_bytes(&self) -> usize {
        self.dora.workspace_bytes().max(self.lora.workspace_bytes())
    }
}

/// One shape on a device: the sets, their fused layers, and the buffers of the unfused
/// graph (4 bytes per element, whatever the dtype, so the fused layer's f32 gradients fit
/// the same buffers).
struct DevLayer<'w, B: Backend> {
    b: &'w B,
    dt: DType,
    full: Shape,
    t: usize,
    sets: &'w [DevSet<B>],
    fused: Vec<Fused<'w, B>>,
    tmp: Vec<Option<B::Buffer>>,
}

/// The unfused passes on a device: pointers of the graph's tensors for one set.
struct DevPasses<'a, B: Backend> {
    b: &'a B,
    dt: DType,
    ptr: Vec<DevPtr>,
}

impl<B: Backend> DevPasses<'_, B> {
    /// Launches `baseline_<name>_<dt>`.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list and address buffers large enough for
    /// `dims`.
    unsafe fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        let name = format!("baseline_{name}_{}", self.dt.name());
        // SAFETY: forwarded from this function's contract.
        unsafe { self.b.launch(&name, dims, args) }.with_context(|| format!("launching {name}"))
    }
}

fn dims(grid: usize) -> Result<LaunchDims> {
    Ok(LaunchDims {
        grid: [u32::try_from(grid).context("grid too large")?, 1, 1],
        block: [BASELINE_THREADS, 1, 1],
        shared_bytes: 0,
    })
}

/// A grid-stride loop over `n` elements: enough blocks to fill a large GPU, no more.
fn stride_dims(n: usize) -> Result<LaunchDims> {
    dims(n.div_ceil(BASELINE_THREADS as usize).clamp(1, 8192))
}

fn int(v: usize, what: &str) -> Result<KernelArg> {
    Ok(KernelArg::I32(
        i32::try_from(v).with_context(|| format!("{what} {v} too large"))?,
    ))
}

impl<B: Backend> Passes for DevPasses<'_, B> {
    fn gemm(
        &mut self,
        (m, n, k): (usize, usize, usize),
        a: (T, bool),
        b: (T, bool),
        c: T,
        beta: f32,
    ) -> Result<()> {
        let g = GemmDesc {
            m,
            n,
            k,
            a: self.ptr[a.0 as usize],
            a_dtype: self.dt,
            lda: if a.1 { m } else { k },
            trans_a: a.1,
            b: self.ptr[b.0 as usize],
            b_dtype: self.dt,
            ldb: if b.1 { k } else { n },
            trans_b: b.1,
            c: self.ptr[c as usize],
            c_dtype: self.dt,
            ldc: n,
            alpha: 1.0,
            beta,
        };
        // SAFETY: every tensor of the graph is a buffer of `unfused::len` elements of the
        // dtype at the largest T (inputs from `DevSet`, the rest from `DevLayer::tmp`), and
        // the passes' extents are those lengths at the current T.
        unsafe { self.b.gemm(&g) }.with_context(|| format!("gemm {m}x{n}x{k}"))
    }

    fn axpby(&mut self, out: T, a: T, b: T, (alpha, beta): (f32, f32), n: usize) -> Result<()> {
        let p = |t: T| KernelArg::Ptr(self.ptr[t as usize]);
        let args = [
            p(out),
            p(a),
            p(b),
            KernelArg::F32(alpha),
            KernelArg::F32(beta),
            KernelArg::I64(n as i64),
        ];
        // SAFETY: matches `baseline_axpby_<dt>(T* out, const T* a, const T* b, float alpha,
        // float beta, long long n)`; out, a and b hold n elements (see `gemm`).
        unsafe { self.launch("axpby", stride_dims(n)?, &args) }
    }

    fn scale_cols(
        &mut self,
        out: T,
        a: T,
        (shift, alpha): (f32, f32),
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let p = |t: T| KernelArg::Ptr(self.ptr[t as usize]);
        let args = [
            p(out),
            p(a),
            p(T::G),
            KernelArg::F32(shift),
            KernelArg::F32(alpha),
            KernelArg::I64(rows as i64),
            int(cols, "columns")?,
        ];
        // SAFETY: matches `baseline_scale_cols_<dt>(T* out, const T* a, const float* g, float
        // shift, float alpha, long long rows, int cols)`; out and a hold rows·cols elements,
        // g holds cols f32.
        unsafe { self.launch("scale_cols", stride_dims(rows * cols)?, &args) }
    }

    fn row_norm(&mut self, rows: usize, cols: usize) -> Result<()> {
        let p = |t: T| KernelArg::Ptr(self.ptr[t as usize]);
        let eps = KernelArg::F32(NORM_EPS as f32);
        let args = [
            p(T::V),
            p(T::M),
            int(cols, "columns")?,
            eps,
            p(T::N),
            p(T::G),
        ];
        // SAFETY: matches `baseline_row_norm_<dt>(const T* v, const float* m, int cols, float
        // eps, float* n, float* g)`; v holds rows·cols elements, m, n, g hold rows f32; one
        // block per row, of the kernel's SMALL_THREADS threads.
        unsafe { self.launch("row_norm", dims(rows)?, &args) }
    }

    fn col_dot(&mut self, out: T, a: T, b: T, rows: usize, cols: usize) -> Result<()> {
        let p = |t: T| KernelArg::Ptr(self.ptr[t as usize]);
        let eps = KernelArg::F32(NORM_EPS as f32);
        let args = [
            p(a),
            p(b),
            p(T::N),
            eps,
            int(rows, "rows")?,
            int(cols, "columns")?,
            p(out),
        ];
        // SAFETY: matches `baseline_col_dot_<dt>(const T* a, const T* b, const float* n, float
        // eps, int rows, int cols, float* out)`; a and b hold rows·cols elements, n and out
        // cols f32; threads with j ≥ cols return before any access.
        unsafe {
            self.launch(
                "col_dot",
                dims(cols.div_ceil(BASELINE_THREADS as usize))?,
                &args,
            )
        }
    }
}

impl<'w, B: Backend> DevLayer<'w, B> {
    fn new(b: &'w B, dt: DType, full: Shape, sets: &'w [DevSet<B>]) -> Result<Self> {
        let mut tmp: Vec<Option<B::Buffer>> = (0..=T::GradM as usize).map(|_| None).collect();
        for t in unfused::TEMPORARIES {
            let n = 4 * unfused::len(t, full);
            let buf = b.alloc_zeroed(n.max(1));
            tmp[t as usize] = Some(buf.with_context(|| format!("allocating {t:?} ({n} bytes)"))?);
        }
        let fused = sets.iter().map(|s| Fused::new(b, s, full, dt));
        Ok(DevLayer {
            b,
            dt,
            full,
            t: 0,
            sets,
            fused: fused.collect::<Result<_>>()?,
            tmp,
        })
    }

    fn passes(&self, i: usize) -> DevPasses<'w, B> {
        let s = &self.sets[i];
        let inputs = [
            (T::W, &s.w),
            (T::A, &s.a),
            (T::B, &s.bm),
            (T::M, &s.m),
            (T::X, &s.x),
            (T::Dy, &s.dy),
        ];
        let mut ptr: Vec<DevPtr> = (self.tmp.iter())
            .map(|b| b.as_ref().map_or(DevPtr(0), DeviceBuffer::ptr))
            .collect();
        for (t, buf) in inputs {
            ptr[t as usize] = buf.ptr();
        }
        DevPasses {
            b: self.b,
            dt: self.dt,
            ptr,
        }
    }
}

/// The views of a fused call on `set` at `t` tokens, outputs in the graph's buffers `tmp`.
fn io<'a, B: Backend>(
    tmp: &'a [Option<B::Buffer>],
    set: &'a DevSet<B>,
    dt: DType,
    s: Shape,
) -> Result<Io<'a>> {
    let view = |k: T, dt: DType, n: usize| {
        DevTensor::of(tmp[k as usize].as_ref().expect("allocated"), dt).slice(0, n)
    };
    let (t, f32) = (s.t, DType::F32);
    Ok(Io {
        t,
        x: DevTensor::of(&set.x, dt).slice(0, t * s.d_in)?,
        dy: DevTensor::of(&set.dy, dt).slice(0, t * s.d_out)?,
        y: view(T::Y, dt, t * s.d_out)?,
        base: view(T::Base, dt, t * s.d_out)?,
        grads: GradTargets {
            grad_x: view(T::GradX, dt, t * s.d_in)?,
            grad_lora_a: view(T::GradA, f32, s.r * s.d_in)?,
            grad_lora_b: view(T::GradB, f32, s.d_out * s.r)?,
            grad_magnitude: Some(view(T::GradM, f32, s.d_out)?),
        },
    })
}

impl<B: Backend> Layer for DevLayer<'_, B> {
    fn tokens(&mut self, t: usize) -> Result<()> {
        self.t = t;
        for f in &mut self.fused {
            f.cache_g(self.b)?;
        }
        // A realistic base product for the compose rows (none for the norm rows, t = 0).
        let (o, i) = (self.full.d_out, self.full.d_in);
        match t {
            0 => Ok(()),
            t => (self.passes(0)).gemm((t, o, i), (T::X, false), (T::W, true), T::Base, 0.0),
        }
    }

    fn setup(&mut self, row: RowSpec, i: usize) -> Result<()> {
        if row.implementation != imp::DORAFUSE {
            return Ok(());
        }
        let s = Shape {
            t: self.t,
            ..self.full
        };
        let io = io(&self.tmp, &self.sets[i], self.dt, s)?;
        self.fused[i].setup(self.b, row.kind, row.op, &io)
    }

    fn call(&mut self, row: RowSpec, i: usize) -> Result<()> {
        let s = Shape {
            t: self.t,
            ..self.full
        };
        let scaling = self.sets[i].scaling;
        match row.implementation {
            imp::DORAFUSE => {
                let io = io(&self.tmp, &self.sets[i], self.dt, s)?;
                self.fused[i].call(self.b, row.kind, row.op, &io)
            }
            im => {
                let p = &mut self.passes(i);
                unfused::row(p, s, scaling, im == imp::BASE, row.op).map(drop)
            }
        }
    }

    fn extra_mem(&self, row: RowSpec) -> Option<(u64, String)> {
        let s = Shape {
            t: self.t,
            ..self.full
        };
        match (row.implementation, row.op) {
            (imp::UNFUSED, op) => Some((
                unfused::extra_bytes(op, s, self.dt.size()),
                "allocated temporaries of PEFT's graph".into(),
            )),
            (imp::DORAFUSE, Op::Norm) => Some((
                0,
                "workspace_bytes (the n/g cache of 8·d_out bytes is the output)".into(),
            )),
            (imp::DORAFUSE, _) => Some((
                self.fused
                    .iter()
                    .map(Fused::workspace_bytes)
                    .max()
                    .unwrap_or(0) as u64,
                "DoraLayer::workspace_bytes after the runs".into(),
            )),
            _ => None,
        }
    }
}

impl<B: Backend> Target for DeviceTarget<'_, B> {
    fn has(&self, row: RowSpec) -> bool {
        has(row)
    }

    fn with_layer(&self, full: Shape, dtype: DType, sets: usize, f: WithLayer) -> Result<()> {
        let b = self.backend;
        let sets: Vec<DevSet<B>> = (0..sets)
            .map(|k| DevSet::upload(b, &random_set(full, dtype, 7000 + k as u64)?))
            .collect::<Result<_>>()
            .with_context(|| format!("inputs for {full}"))?;
        f(&mut DevLayer::new(b, dtype, full, &sets)?)
    }
}

/// Runs `cfg` on the CPU emulator: the same kernels and launch code as on a GPU, timed with
/// the host clock between synchronizes; no ceilings (they would mean nothing).
///
/// # Errors
/// A failure in any row, naming it.
pub fn run_emu(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    run_emu_on(&crate::emu::EmuBackend::from_env()?, cfg, progress)
}

/// [`run_emu`] on the emulator `b` (the profiler's, which records every access).
///
/// # Errors
/// A failure in any row, naming it.
pub fn run_emu_on(
    b: &crate::emu::EmuBackend,
    cfg: &Config,
    progress: &mut dyn FnMut(&str),
) -> Result<Report> {
    let cpu = host_cpu();
    let note = "emulator: the CUDA kernels run on the CPU emulator; emulator times say nothing \
                about GPU speed";
    let machine = Machine {
        clock: &mut SyncClock::new(|| b.synchronize()),
        device: DeviceInfo {
            kind: "emu".into(),
            name: format!("CUDA emulator on {}", cpu.name),
            ..cpu
        },
        ceilings: None,
        rotate_bytes: 0,
        max_sets: 1,
        cache_policy: "not kept out (emulator)".into(),
        notes: vec![note.into()],
    };
    runner::run(&DeviceTarget { backend: b }, machine, cfg, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfused_on_the_emulator_matches_the_cpu_path() {
        // PEFT's graph through the baseline kernels against the CPU path, off every tile;
        // the device rounds every intermediate to the dtype, as PEFT does.
        let b = crate::emu::EmuBackend::new(3);
        let s = Shape {
            t: 5,
            d_in: 37,
            d_out: 21,
            r: 3,
        };
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let set = random_set(s, dt, 42).unwrap();
            let dev = [DevSet::upload(&b, &set).unwrap()];
            let mut layer = DevLayer::new(&b, dt, s, &dev).unwrap();
            layer.tokens(s.t).unwrap();
            let row = runner::ROWS[12];
            assert_eq!(
                (row.implementation, row.op),
                (imp::UNFUSED, Op::ForwardBackward)
            );
            layer.call(row, 0).unwrap();
            let want =
                crate::cpu::run(&set.layer, &set.x, Some(&set.dy), GradMode::Detached).unwrap();
            let g = want.grads.unwrap();
            for (name, k, d, w) in [
                ("y", T::Y, dt, want.y),
                ("grad_x", T::GradX, dt, g.grad_x),
                ("grad_m", T::GradM, DType::F32, g.grad_magnitude.unwrap()),
            ] {
                let n = unfused::len(k, s);
                let mut v = vec![0u8; n * d.size()];
                b.download(layer.tmp[k as usize].as_ref().unwrap(), &mut v)
                    .unwrap();
                let got = crate::tensor::Tensor::from_bytes(d, vec![n], &v).unwrap();
                let e = crate::tensor::rel_l2(&got.to_f64(), &w.to_f64());
                assert!(e < tol, "{name} {dt}: rel-L2 {e:e}");
            }
        }
    }
}
