//! The CUDA emulator (kernels/emu): buffers and GEMM, dtype conversions, fault reports, warp
//! and block reductions, tensor-core fragments, shared-memory transposes, and the build
//! script's `__shared__` source rewrite. One test binary for the subject.

mod backend;
mod convert;
mod faults;
mod profile;
mod racecheck;
mod reduce;
mod tensor_core;
mod transpose;

/// The emulator's `__shared__` rewrite (build/shared_rewrite.rs), whose unit tests build.rs
/// itself cannot run.
#[path = "../../build/shared_rewrite.rs"]
mod shared_rewrite;
