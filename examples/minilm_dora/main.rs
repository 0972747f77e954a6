//! all-MiniLM-L6-v2 in candle with several PEFT DoRA adapters loaded unmerged, one batch in
//! which each sentence uses its own adapter or none; sentence embeddings mean-pooled over the
//! attention mask and L2-normalised, as sentence-transformers does.
//!
//! ```text
//! cargo run --release --features candle --example minilm_dora -- --model MODEL_DIR \
//!     --adapter NAME=ADAPTER_DIR [--adapter ...] --sentences FILE.tsv --out EMB.safetensors \
//!     [--device cpu|emu|cuda] [--merged] [--repeat N]
//! ```
//!
//! FILE.tsv: one `NAME<TAB>sentence` per line (`-` = no adapter). EMB.safetensors: `embeddings`
//! `[N, hidden]` f32 in input order. `--device emu` runs the fused CUDA kernels on the CPU
//! emulator; `--merged` runs each adapter's sentences through a copy of the model with that
//! adapter merged into the weights (the baseline of the README timing); `--repeat N` encodes
//! the batch N more times and prints the median time as one `timing:` line.
//!
//! The encoder is written here (BERT: embeddings, 6 post-LN layers with exact-erf GELU) because
//! candle-transformers' BERT owns its `candle_nn::Linear`s and cannot take other layers.

mod app;
mod encoder;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = app::run(&argv) {
        eprintln!("minilm_dora: error: {e:#}");
        std::process::exit(1);
    }
}
