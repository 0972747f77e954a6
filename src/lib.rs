//! dorafuse: fused CUDA kernels for DoRA adapters (Weight-Decomposed Low-Rank Adaptation),
//! with a CPU reference path, a CPU emulator that runs the same `.cu` sources, and PEFT's
//! adapter format.
//!
//! The math (docs/design.md §1, PEFT semantics), with `W0 [d_out, d_in]`, `A [r, d_in]`,
//! `B [d_out, r]`, `m [d_out]`, `x [T, d_in]`:
//!
//! ```text
//! n_j = ‖W0_j + s·B_j·A‖₂      g = m / max(n, ε)
//! y   = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + b
//! ```
//!
//! Modules:
//! - [`dtype`], [`tensor`], [`layer`]: element types, host tensors, the layer description;
//! - [`error`]: error kinds a caller can branch on;
//! - [`cpu`]: the CPU reference path (forward, backward, norm);
//! - [`case`], [`case_multi`]: the layer-case safetensors formats shared with PyTorch;
//! - [`backend`]: one launch API over CUDA ([`cuda`]) and the CPU emulator ([`emu`]);
//! - [`kernels`]: the launchers of the fused kernels in `kernels/*.cu`, generic over a backend;
//! - [`adapter`]: PEFT adapter directories and base models (load, inspect, merge, save);
//! - [`formula`]: bytes and FLOPs of every operation, read by [`bench`] and [`profile`];
//! - [`bench`]: the benchmark behind `dorafuse bench`; [`profile`]: `dorafuse profile`;
//! - [`markdown`]: their tables, and the generated sections of the repository's documents;
//! - [`analysis`]: `analyze` (the DoRA paper's Figure 2), `resize` and `export-lora` (SVD).
//!
//! Cargo features (README "Features"): `cuda` (the CUDA backend, [`cuda`]), `emu` (the C++
//! emulator, [`emu`]), `bench` ([`bench`]), `cli` (the `dorafuse` binary); the default is
//! `cli`, which brings all of them. An inference engine depends on
//! `default-features = false, features = ["cuda"]` (docs/engine.md).

#![warn(missing_docs)]

pub mod adapter;
pub mod analysis;
pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub mod case;
pub mod case_multi;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
#[cfg(feature = "emu")]
pub mod emu;
pub mod error;
pub mod formula;
pub mod fsutil;
pub mod kernels;
pub mod layer;
#[cfg(feature = "bench")]
pub mod markdown;
#[cfg(feature = "bench")]
pub mod profile;
pub mod tensor;

pub use dtype::DType;
pub use layer::{GradMode, Grads, Layer, Outputs, Shape};
pub use tensor::Tensor;
