//! Timing device work with CUDA events (never with a host clock: launches are asynchronous).

use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaEvent, CudaStream};
use std::sync::Arc;

/// A start/stop event pair on one stream. Typical use (warm up first, take many samples, report
/// the median):
///
/// ```no_run
/// # fn f(b: &dorafuse::cuda::CudaBackend) -> anyhow::Result<()> {
/// let t = b.timer()?;
/// t.start()?;
/// // ... queue launches / GEMMs on b ...
/// t.stop()?;
/// let ms = t.elapsed_ms()?; // waits for the stop event only
/// # Ok(()) }
/// ```
pub struct EventTimer {
    stream: Arc<CudaStream>,
    start: CudaEvent,
    stop: CudaEvent,
}

impl EventTimer {
    /// Two timing-enabled events on `stream`'s context.
    ///
    /// # Errors
    /// A driver error creating the events.
    pub fn new(stream: &Arc<CudaStream>) -> Result<EventTimer> {
        let ctx = stream.context();
        // CU_EVENT_DEFAULT: cudarc's default flags disable timing.
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(EventTimer {
            stream: stream.clone(),
            start: ctx.new_event(flags).context("creating a CUDA event")?,
            stop: ctx.new_event(flags).context("creating a CUDA event")?,
        })
    }

    /// Records the start event: work queued after this is timed.
    ///
    /// # Errors
    /// A driver error.
    pub fn start(&self) -> Result<()> {
        self.start
            .record(&self.stream)
            .context("recording the start event")
    }

    /// Records the stop event: work queued before this is timed.
    ///
    /// # Errors
    /// A driver error.
    pub fn stop(&self) -> Result<()> {
        self.stop
            .record(&self.stream)
            .context("recording the stop event")
    }

    /// Milliseconds between the two events (the device's clock, ~0.5 µs resolution); waits for
    /// the stop event.
    ///
    /// # Errors
    /// A driver error, or a fault in the timed work.
    pub fn elapsed_ms(&self) -> Result<f32> {
        self.start
            .elapsed_ms(&self.stop)
            .context("reading the CUDA event timer")
    }
}
