//! PEFT adapters and base models: matching rules and save/load against PEFT, the real
//! all-MiniLM-L6-v2 layers, and `merge` / unmerge on synthetic and real models. One test
//! binary for the subject.

mod kinds;
mod merge_minilm;
mod merge_synthetic;
mod minilm_layers;
mod peft;

#[path = "../minilm_util/mod.rs"]
mod minilm_util;
