//! The benchmark behind `dorafuse bench` and `cargo bench`: what DoRA costs over the frozen
//! base layer and over LoRA, and how close each operation runs to the machine's measured
//! ceilings (docs/design.md §5).
//!
//! - [`formula`]: bytes and FLOPs of every operation, by formula (the one place);
//! - [`measure`]: warm-up, many timed runs cycling input sets, a clock per device;
//! - [`stats`]: median, p10/p90 and MAD of the runs;
//! - [`inputs`]: random, non-zero benchmark layers;
//! - [`cpu`]: the GEMM crate alone, PEFT-style unfused DoRA, and the CPU ceilings.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod formula;
pub mod inputs;
pub mod measure;
pub mod plot;
pub mod report;
pub mod stats;
pub mod suite;
pub mod table;
pub mod target;
