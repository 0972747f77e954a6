//! An inference engine's view of dorafuse (docs/engine.md): a plain cudarc context and
//! stream, a PEFT base model and two DoRA adapters loaded from disk, g computed once per
//! adapter at load, a fused QKV output finished in place, the adapter switched between calls,
//! every result held against the CPU path.
//!
//! ```sh
//! cargo run --release --example engine            # on GPU 0; the emulator when there is none
//! cargo run --release --example engine -- emu     # on the emulator
//! ```
//!
//! Exit status 0 when every call matches the CPU path; `tests/kernels/engine_example.rs` runs the same
//! code (`serve.rs`) on the emulator in `cargo test`, and `scripts/gpu-check.sh` runs this
//! program on a GPU.

mod serve;

use anyhow::{bail, Context, Result};
use cudarc::driver::CudaContext;
use dorafuse::cuda::CudaBackend;
use dorafuse::emu::EmuBackend;
use dorafuse::error::{kind, ErrorKind};
use std::sync::Arc;

/// bf16 output against the CPU path's bf16 output: a few units of bf16 rounding.
const TOLERANCE: f64 = 1e-2;

fn report(device: &str, calls: &[serve::Call]) -> Result<()> {
    for c in calls {
        println!(
            "{device}: adapter {}, {:>2} tokens: rel-L2 vs the CPU path {:.2e} (vs the other \
             adapter's {:.2e})",
            c.adapter, c.tokens, c.error, c.error_other_adapter
        );
        if !(c.error <= TOLERANCE && c.error_other_adapter > 10.0 * TOLERANCE) {
            bail!(
                "{device}: adapter {}, {} tokens: rel-L2 {:e} (limit {TOLERANCE:e}), against \
                 the other adapter {:e} (must exceed {:e})",
                c.adapter,
                c.tokens,
                c.error,
                c.error_other_adapter,
                10.0 * TOLERANCE
            );
        }
    }
    println!("{device}: every call within {TOLERANCE:e} of the CPU path");
    Ok(())
}

/// The engine owns the context and the stream; dorafuse queues its work on that stream.
fn on_cuda() -> Result<()> {
    let ctx = CudaContext::new(0).context("CUDA device 0")?;
    let stream = ctx.new_stream().context("creating a stream")?;
    let backend = Arc::new(CudaBackend::from_stream(stream.clone())?);
    println!("cuda: {}", backend.device_description()?);
    let results = serve::run(backend)?;
    stream.synchronize()?;
    report("cuda", &results)
}

fn on_emu() -> Result<()> {
    report("emu", &serve::run(Arc::new(EmuBackend::from_env()?))?)
}

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("emu") => on_emu(),
        Some("cuda") => on_cuda(),
        None => match dorafuse::cuda::CudaBackend::new(0) {
            Ok(_) => on_cuda(),
            // Branch on the kind: only a missing GPU falls back; anything else is reported.
            Err(e)
                if matches!(
                    kind(&e),
                    Some(ErrorKind::NoDriver | ErrorKind::NoDevice | ErrorKind::KernelsNotCompiled)
                ) =>
            {
                println!("no GPU ({e:#}): running on the emulator");
                on_emu()
            }
            Err(e) => Err(e),
        },
        Some(other) => bail!("usage: engine [cuda|emu] (got {other:?})"),
    }
}
