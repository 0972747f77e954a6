//! Device tests written once: each is a generic function over [`TestBackend`], and
//! [`test_device!`] instantiates it as `<name>::emu` (the CPU emulator, run by `cargo test`)
//! and `<name>::cuda` (GPU 0, `#[ignore = "needs a CUDA GPU"]`, run by scripts/gpu-check.sh
//! with `--ignored cuda`), after candle's `test_device!`. Nothing passes by skipping: without
//! a device the CUDA instance fails (and is only run when asked for).

use dorafuse::backend::Backend;
use dorafuse::cuda::CudaBackend;
use dorafuse::emu::EmuBackend;

/// A backend the device tests run on.
pub trait TestBackend: Backend + Sized {
    /// The runs a test repeats per case: emulator seeds (thread schedules and shared-memory
    /// garbage differ per seed), or one run on a GPU.
    const SEEDS: &'static [u64];
    /// The backend for run `seed` (a GPU has one schedule; the seed only names the run).
    fn with_seed(seed: u64) -> Self;
    /// True on a GPU unless `DORAFUSE_GPU_QUICK=1` (the sanitizer runs): tests add the large
    /// shapes (4097-wide, rank 255/256, 129 tokens) that the emulator is too slow for.
    fn large() -> bool;
    /// Another stream of the same device (a side stream: adapter loads in the pool tests).
    fn side_stream(&self) -> Self;
    /// Whether a tensor-core mma rounds its f32 sums to nearest: the emulator's does; a GPU's
    /// truncates (tests/kernels/layer.rs, `norm_v2_a32_as_accurate_as_the_f32_cuda_core_path`).
    const MMA_ROUNDS_TO_NEAREST: bool;
}

impl TestBackend for EmuBackend {
    const SEEDS: &'static [u64] = &[1, 2, 3];
    const MMA_ROUNDS_TO_NEAREST: bool = true;
    fn with_seed(seed: u64) -> Self {
        EmuBackend::new(seed)
    }
    fn large() -> bool {
        false
    }
    fn side_stream(&self) -> Self {
        self.new_stream()
    }
}

impl TestBackend for CudaBackend {
    const SEEDS: &'static [u64] = &[0];
    const MMA_ROUNDS_TO_NEAREST: bool = false;
    fn with_seed(_: u64) -> Self {
        crate::gpu_util::backend()
    }
    fn large() -> bool {
        !std::env::var("DORAFUSE_GPU_QUICK").is_ok_and(|v| v == "1")
    }
    fn side_stream(&self) -> Self {
        let stream = self.context().new_stream().expect("a second CUDA stream");
        CudaBackend::from_stream(stream).expect("a backend on the second stream")
    }
}

/// `test_device!(name)` for a `fn name<B: TestBackend>()` in the same module: the tests
/// `name::emu` and `name::cuda` (ignored: needs a CUDA GPU).
macro_rules! test_device {
    ($name:ident) => {
        mod $name {
            #[test]
            fn emu() {
                super::$name::<dorafuse::emu::EmuBackend>()
            }
            #[test]
            #[ignore = "needs a CUDA GPU"]
            fn cuda() {
                super::$name::<dorafuse::cuda::CudaBackend>()
            }
        }
    };
}
pub(crate) use test_device;
