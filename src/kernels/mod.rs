//! The fused DoRA kernels (`kernels/*.cu`) and their launchers, generic over a
//! [`Backend`](crate::backend::Backend): CUDA or the CPU emulator run the very same sources.
//!
//! Layers:
//! - [`spec`]: the one table of specialisations (dtype × adapter dtype × rank tile ×
//!   variant) and the tile constants shared with `kernels/common.cuh`;
//! - `launch` (private): launch math and one thin `unsafe fn` per kernel;
//! - [`DoraLayer`]: the device-level API over [`DevTensor`] views, with reusable
//!   workspaces, a cached g for inference, and a training forward/backward pair;
//! - [`run_layer`], [`merged_weight`]: host tensors in and out (replay, tests, merge).
//!
//! The kernel set and the pipeline (see `kernels/README.md` for tiling and byte/FLOP counts):
//!
//! ```text
//! forward   base = x·W0ᵀ (Backend::gemm, or supplied)     norm  -> n, g (cached per adapter)
//!           U = shrink(x, A) (split over d_in at decode)  compose: y = g⊙(base + s·U·Bᵀ) + b
//!                                                         (in place; row strides for slices)
//! backward  bwd_dz: dz = dy⊙g, c partials, dz·B           mag_reduce: grad_m (and k)
//!           tn: grad_B = s·g⊙(dyᵀ·U), grad_A = s·(dz·B)ᵀ·x  grad_x = dz·W0 (gemm) + compose
//!           exact: V = merge(g=1); grad_B += shrink(V, A)·(−s·k); grad_A += tn(−s·k⊙B, V)
//! ```

mod device;
mod host;
mod launch;
pub mod multi;
pub mod spec;

pub use device::{Base, DevTensor, DoraLayer, DoraWeights, GradTargets};
pub use host::{merged_weight, norm, run_layer};

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));
