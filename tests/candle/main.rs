//! The candle layers (feature `candle`, `cargo test --features candle --test candle`): the
//! single- and multi-adapter layers against the CPU path and the float64 reference, on the
//! CPU path and on the emulated kernels; gradients through candle's autograd; refusals; and
//! the `minilm_dora` example against PEFT's own embeddings. With `candle-cuda`, the same on
//! CUDA tensors (ignored tests named `cuda`, run by scripts/gpu-check.sh).

mod autograd;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod layers;
mod minilm;
mod util;

#[path = "../minilm_util/mod.rs"]
mod minilm_util;

// The example's modules, so the test runs its very code (a test target cannot build an
// example binary).
#[allow(dead_code)]
#[path = "../../examples/minilm_dora/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "../../examples/minilm_dora/encoder.rs"]
mod encoder;
