//! The engine integration example (examples/engine, docs/engine.md) on the emulator: the very
//! code a GPU runs through `scripts/gpu-check.sh`, held against the CPU path.

#[path = "../examples/engine/serve.rs"]
mod serve;

use dorafuse::emu::EmuBackend;
use std::sync::Arc;

#[test]
fn engine_example_matches_the_cpu_path_on_the_emulator() {
    let calls = serve::run(Arc::new(EmuBackend::new(11))).unwrap();
    // Both adapters, decode and prefill sizes, switched between calls.
    assert_eq!(calls.len(), 5);
    let served: Vec<(&str, usize)> = calls
        .iter()
        .map(|c| (c.adapter.as_str(), c.tokens))
        .collect();
    assert_eq!(served, [("a", 1), ("b", 1), ("a", 37), ("b", 19), ("a", 5)]);
    for c in &calls {
        // bf16 against bf16: a few units of rounding.
        assert!(c.error < 1e-2, "{c:?}: too far from the CPU path");
        // The comparison tells the adapters apart: the other adapter's result is far away.
        assert!(
            c.error_other_adapter > 0.1,
            "{c:?}: the adapters are indistinguishable"
        );
    }
}
