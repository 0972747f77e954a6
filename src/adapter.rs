//! PEFT adapters end to end: read an adapter directory, pair it with a memory-mapped base
//! model, hand out per-module [`Layer`](crate::layer::Layer)s, report its statistics, merge
//! it into the base weights (and undo that), and write it back in PEFT's format.
//!
//! ```no_run
//! use dorafuse::adapter::{Adapter, AdaptedModel, BaseModel};
//! # fn main() -> anyhow::Result<()> {
//! let adapter = Adapter::load("my-adapter".as_ref())?;
//! let base = BaseModel::open("base-model-dir".as_ref())?;
//! let model = AdaptedModel::new(&base, &adapter)?;
//! for item in model.layers() {
//!     let (name, layer) = item?;
//!     // layer: ready for dorafuse::cpu::run / dorafuse::kernels::run (g recomputed:
//!     // training); model.inference_layer(&name) caches g for inference.
//!     let _ = (name, layer);
//! }
//! # Ok(()) }
//! ```

pub mod apply;
pub mod base;
pub mod compute;
pub mod config;
pub mod merge;
pub mod model;
pub mod pools;
pub mod residual;
pub mod stats;

pub use apply::{AdaptedModel, ApplyOptions, InferenceLayer};
pub use base::{BaseConfig, BaseModel, NameMap};
pub use compute::MergeDevice;
pub use config::{AdapterConfig, Init};
pub use merge::{
    merge_model, read_unmerge, unmerge_model, unmerge_module, MergeOptions, MergeReport,
    UnmergeEntry, UNMERGE_FILE,
};
pub use model::{Adapter, AdapterModule, ModuleKind};
pub use pools::{ModelPools, PoolOptions, ServedModule};
