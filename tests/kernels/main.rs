//! The fused kernels: every kernel against the float64 reference, written once over the
//! backend and run on the emulator (`cargo test`) and on a GPU (the ignored `::cuda` tests:
//! `cargo test --test kernels -- --ignored cuda`, which scripts/gpu-check.sh runs); the kernel
//! list and the specialisation table; and the CUDA backend itself. One test binary for the
//! subject (each integration test binary links the whole crate; fewer binaries link less).

mod adapter_pool;
mod cuda_backend;
mod device;
mod engine_api;
mod engine_example;
mod gpu_util;
mod layer;
mod multi_adapter;
mod multi_adapter_cuda;
mod per_kernel;
mod registry;
mod tuning;

/// The build script's kernel list and code generation (build/kernel_list.rs), whose unit tests
/// build.rs itself cannot run. build.rs uses every item; the tests here use some of them.
#[allow(dead_code)]
#[path = "../../build/kernel_list.rs"]
mod kernel_list;
