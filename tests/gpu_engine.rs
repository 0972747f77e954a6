//! The engine integration example (examples/engine, docs/engine.md) on a GPU, on a stream the
//! test creates itself as an engine would: typed views of `CudaSlice<bf16>` with cudarc's
//! events, g per adapter, the fused QKV finished in place, against the CPU path. Run by
//! scripts/gpu-check.sh, also under compute-sanitizer; skips without a device (see gpu_util).

mod gpu_util;

#[path = "../examples/engine/serve.rs"]
mod serve;

use dorafuse::cuda::CudaBackend;
use std::sync::Arc;

#[test]
fn engine_example_on_the_engines_own_stream() {
    let Some(b0) = gpu_util::backend("engine_example_on_the_engines_own_stream") else {
        return;
    };
    let stream = b0.context().new_stream().unwrap();
    let backend = Arc::new(CudaBackend::from_stream(stream.clone()).unwrap());
    let calls = serve::run(backend).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(calls.len(), 5);
    for c in &calls {
        println!(
            "adapter {}, {} tokens: rel-L2 {:.2e} (other adapter {:.2e})",
            c.adapter, c.tokens, c.error, c.error_other_adapter
        );
        assert!(c.error < 1e-2, "{c:?}: too far from the CPU path");
        assert!(
            c.error_other_adapter > 0.1,
            "{c:?}: adapters indistinguishable"
        );
    }
}
