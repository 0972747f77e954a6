//! The engine integration example (examples/engine, docs/engine.md), the very code an engine
//! would write, held against the CPU path: on the emulator (`cargo test`) and on a GPU, on a
//! stream the test creates itself as an engine would (ignored here: `--ignored cuda`, run by
//! scripts/gpu-check.sh).

#[path = "../../examples/engine/serve.rs"]
mod serve;

use std::sync::Arc;

/// Both adapters, decode and prefill sizes, switched between calls; each call within bf16
/// rounding of the CPU path and far from the other adapter's result.
fn check(calls: &[serve::Call]) {
    let served: Vec<(&str, usize)> = calls
        .iter()
        .map(|c| (c.adapter.as_str(), c.tokens))
        .collect();
    assert_eq!(served, [("a", 1), ("b", 1), ("a", 37), ("b", 19), ("a", 5)]);
    for c in calls {
        // bf16 against bf16: a few units of rounding.
        assert!(c.error < 1e-2, "{c:?}: too far from the CPU path");
        // The comparison tells the adapters apart: the other adapter's result is far away.
        assert!(
            c.error_other_adapter > 0.1,
            "{c:?}: the adapters are indistinguishable"
        );
    }
}

#[test]
fn emu() {
    let calls = serve::run(Arc::new(dorafuse::emu::EmuBackend::new(11))).unwrap();
    check(&calls);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda() {
    let b0 = crate::gpu_util::backend();
    let stream = b0.context().new_stream().unwrap();
    let backend = Arc::new(dorafuse::cuda::CudaBackend::from_stream(stream.clone()).unwrap());
    let calls = serve::run(backend).unwrap();
    stream.synchronize().unwrap();
    check(&calls);
}
