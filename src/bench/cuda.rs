//! The CUDA side of the benchmark: a clock of CUDA events on the backend's stream with an L2
//! flush before every timed run, the ceilings (device-to-device copy bandwidth and a large
//! cuBLAS GEMM in the run's dtype) measured in the same process, and [`run_cuda`].

use super::device::DeviceTarget;
use super::measure::{rate, Clock};
use super::report::imp;
use super::report::{Ceilings, DeviceInfo, Report};
use super::runner::{self, Config, Machine, Target};
use crate::backend::{Backend, DeviceBuffer};
use crate::cuda::{CudaBackend, CudaBuffer, EventTimer};
use crate::dtype::DType;
use crate::formula::Op;
use crate::layer::Shape;
use anyhow::{Context, Result};
use cudarc::driver::{result as cu, sys};

/// Times device work with a pair of CUDA events on the backend's stream; before each timed
/// run it overwrites a buffer of twice the L2 size (outside the timed region), so every run
/// starts with a cold L2, as a layer does in a real model.
pub struct CudaClock<'b> {
    backend: &'b CudaBackend,
    timer: EventTimer,
    flush: Option<CudaBuffer>,
    flips: u8,
}

impl<'b> CudaClock<'b> {
    /// A clock on `backend`'s stream; `flush_bytes` of scratch are allocated for the L2
    /// flush (0: no flush).
    ///
    /// # Errors
    /// A driver error creating the events or the buffer.
    pub fn new(backend: &'b CudaBackend, flush_bytes: usize) -> Result<Self> {
        let flush = if flush_bytes > 0 {
            Some(
                backend
                    .alloc_zeroed(flush_bytes)
                    .context("allocating the L2 flush buffer")?,
            )
        } else {
            None
        };
        Ok(CudaClock {
            backend,
            timer: backend.timer()?,
            flush,
            flips: 0,
        })
    }
}

impl Clock for CudaClock<'_> {
    fn time(&mut self, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.timer.start()?;
        f()?;
        self.timer.stop()?;
        Ok(f64::from(self.timer.elapsed_ms()?) * 1e-3)
    }

    fn prepare(&mut self) -> Result<()> {
        if let Some(buf) = &self.flush {
            // A different byte each time, so no write can be elided.
            self.flips = self.flips.wrapping_add(1);
            self.backend
                .context()
                .bind_to_thread()
                .context("binding the CUDA context")?;
            // SAFETY: `buf` is a live allocation of `buf.bytes()` bytes on this backend's
            // context, freed only on drop after the stream's work; the memset is ordered on
            // the same stream as the timed work.
            unsafe {
                cu::memset_d8_async(
                    buf.ptr().0,
                    self.flips,
                    buf.bytes(),
                    self.backend.stream().cu_stream(),
                )
            }
            .context("L2 flush (cuMemsetD8Async)")?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        match &self.flush {
            Some(b) => format!(
                "CUDA events on the stream; L2 flushed before every timed run ({} MiB memset)",
                b.bytes() >> 20
            ),
            None => "CUDA events on the stream".into(),
        }
    }
}

/// Device-to-device copy bandwidth in bytes/s (read + write), `bytes` per copy, the median
/// of `reps` event-timed `cuMemcpyDtoDAsync` after warm-up.
///
/// # Errors
/// Out of memory or a driver error.
pub fn copy_bandwidth(b: &CudaBackend, bytes: usize, reps: usize) -> Result<f64> {
    let src = b.alloc_zeroed(bytes).context("copy ceiling: source")?;
    let dst = b.alloc_zeroed(bytes).context("copy ceiling: destination")?;
    b.context()
        .bind_to_thread()
        .context("binding the CUDA context")?;
    rate(
        &mut CudaClock::new(b, 0)?,
        (3, reps),
        2.0 * bytes as f64,
        || {
            // SAFETY: both buffers hold `bytes` bytes on this backend's context and outlive the
            // stream work (dropped after the final synchronising event read).
            unsafe {
                cu::memcpy_dtod_async(dst.ptr().0, src.ptr().0, bytes, b.stream().cu_stream())
            }
            .context("cuMemcpyDtoDAsync")
        },
    )
}

/// The GEMM rate in FLOP/s of an `n × n × n` product in `dtype`: the base layer's forward
/// row (`Backend::gemm`, cuBLAS) at `T = d_in = d_out = n` on random non-zero data, the median
/// of `reps` after warm-up.
///
/// # Errors
/// Out of memory or a cuBLAS error.
pub fn gemm_rate(b: &CudaBackend, n: usize, dtype: DType, reps: usize) -> Result<f64> {
    let mut clock = CudaClock::new(b, 0)?;
    let base = (runner::ROWS.into_iter())
        .find(|r| r.implementation == imp::BASE && r.op == Op::Forward)
        .expect("the base forward is a row");
    let full = Shape {
        t: n,
        d_in: n,
        d_out: n,
        r: 1,
    };
    let mut flops_per_s = f64::NAN;
    DeviceTarget { backend: b }.with_layer(full, dtype, 1, &mut |l| {
        l.tokens(n)?;
        let flops = 2.0 * (n as f64).powi(3);
        flops_per_s = rate(&mut clock, (3, reps), flops, || l.call(base, 0))?;
        Ok(())
    })?;
    Ok(flops_per_s)
}

/// Runs `cfg` on the first CUDA device: ceilings first, then every row.
///
/// # Errors
/// No usable device (the message says why), or a failure in any row.
pub fn run_cuda(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let b = CudaBackend::new(0)?;
    let ctx = b.context().clone();
    let attr = |a: sys::CUdevice_attribute| ctx.attribute(a).map(|v| v as usize);
    let l2 = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .context("reading the L2 size")?;
    let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).ok();
    let total = ctx.total_mem().ok();
    progress("measuring the ceilings (device-to-device copy, cuBLAS GEMM)");
    let copy_bytes = 1usize << 30;
    let bw = copy_bandwidth(&b, copy_bytes, 20)?;
    let n = 8192;
    let rate = gemm_rate(&b, n, cfg.dtype, 10)?;
    let ceilings = Ceilings {
        copy_gbps: bw / 1e9,
        copy_method: "cuMemcpyDtoDAsync of 1 GiB, read + write bytes, CUDA events, median of 20"
            .into(),
        gemm_tflops: rate / 1e12,
        gemm_dtype: cfg.dtype.name().into(),
        gemm_method: format!(
            "Backend::gemm (cuBLAS) {n}x{n}x{n} {} on random data, CUDA events, median of 10",
            cfg.dtype
        ),
    };
    let mut clock = CudaClock::new(&b, 2 * l2)?;
    let device = DeviceInfo {
        kind: "cuda".into(),
        name: b.device_description()?,
        units: sms.map(|v| v as u64),
        memory_bytes: total.map(|v| v as u64),
    };
    let machine = Machine {
        clock: &mut clock,
        device,
        ceilings: Some(ceilings),
        rotate_bytes: 2 * l2,
        max_sets: 4,
        cache_policy: format!(
            "the rows of each shape and T interleaved round by round; L2 ({} MiB) flushed \
             before every timed run, and input sets rotated to exceed 2x L2 (at most 4)",
            l2 >> 20
        ),
        notes: Vec::new(),
    };
    let rep = runner::run(&DeviceTarget { backend: &b }, machine, cfg, progress)?;
    b.synchronize()?;
    Ok(rep)
}
