//! The analysis tools (`dorafuse analyze`, `resize`, `export-lora`; src/analysis) against
//! numpy and PEFT values computed when the fixtures were made (tests/fixtures/analysis), one
//! test binary for the subject.

mod analyze;
mod cli;
mod export;
mod resize;
mod util;

#[path = "../minilm_util/mod.rs"]
mod minilm_util;
