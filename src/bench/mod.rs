//! The benchmark behind `dorafuse bench` and `cargo bench`: what DoRA costs over the frozen
//! base layer and over LoRA, and how close each operation runs to the machine's measured
//! ceilings (docs/design.md §5).
//!
//! One runner ([`runner::run`]) times one list of rows ([`runner::ROWS`]) on any
//! [`runner::Target`]: the CPU path ([`cpu`]), or the kernels on a backend ([`device`]: the
//! emulator, or CUDA through [`cuda`]). Around it:
//!
//! - [`formula`]: bytes and FLOPs of every operation, by formula (the one place; a crate
//!   module, [`crate::formula`], since the profiler reads it too);
//! - [`measure`]: the clocks and the timing loop (warm-up, interleaved rounds, rotated sets);
//! - [`stats`]: median, p10/p90 and MAD of the runs;
//! - [`inputs`]: random, non-zero benchmark layers;
//! - [`unfused`]: DoRA as PEFT runs it (the baseline), written once over [`unfused::Passes`];
//! - [`report`], [`table`], [`plot`]: the JSON document, its tables (with the targets of
//!   docs/design.md §5 and the CPU path's own, [`table::CPU_TARGET_RATIO`]) and its plot;
//! - [`serving`]: the multi-adapter serving rows (`dorafuse bench --serving`).

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod inputs;
pub mod measure;
pub mod plot;
pub mod report;
pub mod runner;
pub mod serving;
pub mod stats;
pub mod table;
pub mod unfused;

/// The bytes and FLOPs formulas, shared with [`crate::profile`].
pub use crate::formula;
