//! Bytes and FLOPs of every operation the benchmark ([`crate::bench`]) and the profiler
//! ([`crate::profile`]) measure, by formula: the one place they are written down
//! (docs/design.md §5: "for each kernel write down two numbers before tuning").
//!
//! Conventions, with `e` the activation/weight element size (2 for bf16/f16, 4 for f32),
//! `T` tokens, `I = d_in`, `O = d_out`, `r` the rank:
//!
//! - **Bytes** are the fewest that must move through memory: each input read once, each
//!   output written once. Intermediates that a fused implementation can keep on chip
//!   (`U = x·Aᵀ`, the base product `z`, a tile of `B·A`) are not counted, except where an
//!   operation is defined as consuming or producing them (compose reads `z` and `U`; the
//!   backward reads the `z` saved by the forward). `m`, `g` and `n` are f32 (4 bytes) whatever
//!   the activation dtype. The benchmark layers have no bias (Llama-style projections).
//! - **FLOPs** count a multiply-add as two. Elementwise work is counted where it is a
//!   meaningful share (it never is beside a GEMM, but it is the whole of compose).
//! - A layer operation (`forward`, `backward`, `inference`) counts the layer's tensors once,
//!   so its floor is the floor of any implementation, fused or not; a kernel operation
//!   (`norm`, `compose`) counts what that kernel alone must move. An unfused implementation
//!   is charged the same bytes and FLOPs as the fused one: its lower fraction of the ceiling
//!   is exactly the cost of not fusing.
//!
//! The floor time of a row is `max(bytes / copy bandwidth, FLOPs / GEMM rate)` with both
//! ceilings measured in the same run (see `ceiling`).

use crate::dtype::DType;
use crate::layer::Shape;
use serde::{Deserialize, Serialize};

/// Which layer is being run: the frozen base alone, plain LoRA, or DoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// `y = x·W0ᵀ`: the floor every adapter is compared with.
    Base,
    /// `y = x·W0ᵀ + s·(x·Aᵀ)·Bᵀ`.
    Lora,
    /// `y = g ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ)`, `g = m / max(‖W0 + s·B·A‖_row, ε)`.
    Dora,
}

/// A benchmarked operation. Layer operations apply to every [`LayerKind`]; `Norm` and
/// `Compose` are DoRA's own kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// DoRA's norm and scale: `g = m / max(n, ε)` from W0, A, B, m (never building V).
    Norm,
    /// DoRA's compose (the forward after the base product): `y = g ⊙ (z + s·U·Bᵀ)` from the
    /// base product `z [T, O]`, the shrink `U [T, r]`, B and g. Version 1 documents call it
    /// `epilogue`.
    #[serde(alias = "epilogue")]
    Compose,
    /// Training forward: for DoRA the norm, the base GEMM, the adapter and compose.
    Forward,
    /// Backward alone, given the forward's saved tensors: for the base layer `dx` only (its
    /// weight is frozen); for LoRA `dx, dA, dB`; for DoRA also `dm` (norm detached, as PEFT).
    Backward,
    /// `Forward` then `Backward`: one training step of the layer.
    ForwardBackward,
    /// Inference forward with `g` cached (computed once per adapter load, not per call).
    Inference,
}

impl Op {
    /// Every operation, in table order.
    pub const ALL: [Op; 6] = [
        Op::Norm,
        Op::Compose,
        Op::Forward,
        Op::Backward,
        Op::ForwardBackward,
        Op::Inference,
    ];

    /// The name used in JSON, tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Op::Norm => "norm",
            Op::Compose => "compose",
            Op::Forward => "forward",
            Op::Backward => "backward",
            Op::ForwardBackward => "forward_backward",
            Op::Inference => "inference",
        }
    }

    /// Parses [`Op::name`].
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn parse(s: &str) -> anyhow::Result<Op> {
        Op::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| {
            let names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
            anyhow::anyhow!("unknown op {s:?} (expected one of {})", names.join(", "))
        })
    }
}

/// Bytes that must move and floating-point operations, for one call of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Cost {
    /// Bytes read plus bytes written, each tensor once.
    pub bytes: f64,
    /// Floating-point operations (multiply-add = 2).
    pub flops: f64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            bytes: self.bytes + o.bytes,
            flops: self.flops + o.flops,
        }
    }
}

/// f32 element size: m, g and n are always f32.
const F32: f64 = 4.0;

/// The cost of `op` on a `kind` layer of shape `s` with activations and weights in `dtype`.
///
/// Returns `None` for combinations that do not exist (`Norm` or `Compose` of a base or LoRA
/// layer). `Inference` of base and LoRA equals their `Forward`.
pub fn cost(kind: LayerKind, op: Op, s: Shape, dtype: DType) -> Option<Cost> {
    let e = dtype.size() as f64;
    let (t, i, o, r) = (s.t as f64, s.d_in as f64, s.d_out as f64, s.r as f64);
    // Tensors of the layer, in bytes.
    let x = e * t * i;
    let y = e * t * o;
    let w0 = e * o * i;
    let ab = e * (r * i + o * r);
    // FLOPs of the products.
    let base_gemm = 2.0 * t * i * o;
    let lora_fwd = 2.0 * t * r * (i + o); // shrink x·Aᵀ, expand U·Bᵀ
                                          // Backward of the adapter: dz·B, (dz·B)·A, dB = dzᵀ·U, dA = (dz·B)ᵀ·x.
    let lora_bwd = 4.0 * t * r * (i + o);
    // The norm in its factored form: W0·Aᵀ (2·r·O·I), ‖W0_j‖² (2·O·I), A·Aᵀ (2·r²·I),
    // B_j·(A·Aᵀ)·B_jᵀ and the cross term (≈ 2·r²·O + 2·r·O).
    let norm_flops = 2.0 * r * o * i + 2.0 * o * i + 2.0 * r * r * (i + o) + 2.0 * r * o;
    let c = |bytes: f64, flops: f64| Cost { bytes, flops };
    Some(match (kind, op) {
        (_, Op::Norm | Op::Compose) if kind != LayerKind::Dora => return None,
        (LayerKind::Base, Op::Forward | Op::Inference) => c(x + w0 + y, base_gemm),
        // dx = dy·W0: reads dy and W0, writes dx.
        (LayerKind::Base, Op::Backward) => c(y + w0 + x, base_gemm),
        (LayerKind::Lora, Op::Forward | Op::Inference) => c(x + w0 + ab + y, base_gemm + lora_fwd),
        // Reads dy, x, W0, A, B; writes dx, dA, dB.
        (LayerKind::Lora, Op::Backward) => c(y + x + w0 + ab + x + ab, base_gemm + lora_bwd),
        // Reads W0, A, B, m; writes g.
        (LayerKind::Dora, Op::Norm) => c(w0 + ab + F32 * o + F32 * o, norm_flops),
        // Reads z [T,O], U [T,r], B, g; writes y. Expand plus scale-and-add.
        (LayerKind::Dora, Op::Compose) => c(
            y + e * t * r + e * o * r + F32 * o + y,
            2.0 * t * r * o + 2.0 * t * o,
        ),
        // Reads x, W0, A, B, m; writes y and g (saved for backward).
        (LayerKind::Dora, Op::Forward) => c(
            x + w0 + ab + F32 * o + y + F32 * o,
            norm_flops + base_gemm + lora_fwd + 2.0 * t * o,
        ),
        // Reads x, W0, A, B, g; writes y.
        (LayerKind::Dora, Op::Inference) => c(
            x + w0 + ab + F32 * o + y,
            base_gemm + lora_fwd + 2.0 * t * o,
        ),
        // Reads dy, the saved z, x, W0, A, B, g and n; writes dx, dA, dB, dm.
        // dz = g ⊙ dy and Σ_t dy ⊙ z are the elementwise terms.
        (LayerKind::Dora, Op::Backward) => c(
            y + y + x + w0 + ab + 2.0 * F32 * o + x + ab + F32 * o,
            base_gemm + lora_bwd + 3.0 * t * o,
        ),
        (k, Op::ForwardBackward) => {
            return Some(cost(k, Op::Forward, s, dtype)? + cost(k, Op::Backward, s, dtype)?)
        }
        (_, Op::Norm | Op::Compose) => unreachable!("handled by the first arm"),
    })
}

/// The floor time in seconds of a cost, given the copy bandwidth (bytes/s) and the matrix
/// rate (FLOP/s): whichever of moving the bytes and doing the arithmetic takes longer.
pub fn floor_s(c: Cost, copy_bytes_per_s: f64, gemm_flops_per_s: f64) -> f64 {
    (c.bytes / copy_bytes_per_s).max(c.flops / gemm_flops_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(t: usize, d_in: usize, d_out: usize, r: usize) -> Shape {
        Shape { t, d_in, d_out, r }
    }

    #[test]
    fn base_forward_is_the_gemm() {
        // 4096×4096 bf16 at T=4096: W0 32 MiB, x and y 32 MiB each; 2·T·I·O FLOPs.
        let c = cost(
            LayerKind::Base,
            Op::Forward,
            shape(4096, 4096, 4096, 16),
            DType::BF16,
        )
        .unwrap();
        assert_eq!(c.bytes, 3.0 * 2.0 * 4096.0 * 4096.0);
        assert_eq!(c.flops, 2.0 * 4096f64.powi(3));
    }

    #[test]
    fn norm_reads_w0_once() {
        // docs/design.md §5: the norm reads W0 once, 2·d_out·d_in bytes in bf16 (32 MiB at
        // 4096×4096), plus A, B, m and g, which are small beside it.
        let s = shape(1, 4096, 4096, 16);
        let c = cost(LayerKind::Dora, Op::Norm, s, DType::BF16).unwrap();
        let w0 = 2.0 * 4096.0 * 4096.0;
        let rest = 2.0 * 16.0 * 8192.0 + 8.0 * 4096.0;
        assert_eq!(c.bytes, w0 + rest);
        // At H200 rates (4.3 TB/s, 790 TFLOP/s) the norm is bandwidth-bound: ~8 µs.
        let f = floor_s(c, 4.3e12, 790e12);
        assert!((7.5e-6..8.5e-6).contains(&f), "{f}");
        assert!(c.bytes / 4.3e12 > c.flops / 790e12);
        // T does not enter the norm.
        assert_eq!(
            cost(
                LayerKind::Dora,
                Op::Norm,
                shape(999, 4096, 4096, 16),
                DType::BF16
            ),
            Some(c)
        );
    }

    #[test]
    fn dtype_scales_bytes_not_flops() {
        let s = shape(7, 33, 129, 3);
        for op in Op::ALL {
            let a = cost(LayerKind::Dora, op, s, DType::F32).unwrap();
            let b = cost(LayerKind::Dora, op, s, DType::BF16).unwrap();
            assert_eq!(a.flops, b.flops, "{op:?}");
            assert!(b.bytes < a.bytes && b.bytes > a.bytes / 2.0, "{op:?}");
        }
    }

    #[test]
    fn kinds_are_ordered_and_kernel_ops_are_dora_only() {
        let s = shape(128, 4096, 11008, 64);
        for op in [
            Op::Forward,
            Op::Backward,
            Op::ForwardBackward,
            Op::Inference,
        ] {
            let b = cost(LayerKind::Base, op, s, DType::BF16).unwrap();
            let l = cost(LayerKind::Lora, op, s, DType::BF16).unwrap();
            let d = cost(LayerKind::Dora, op, s, DType::BF16).unwrap();
            assert!(b.bytes < l.bytes && l.bytes < d.bytes, "{op:?}");
            assert!(b.flops < l.flops && l.flops < d.flops, "{op:?}");
        }
        for op in [Op::Norm, Op::Compose] {
            assert!(cost(LayerKind::Base, op, s, DType::BF16).is_none());
            assert!(cost(LayerKind::Lora, op, s, DType::BF16).is_none());
        }
    }

    #[test]
    fn forward_backward_is_the_sum() {
        let s = shape(16, 4096, 14336, 8);
        for k in [LayerKind::Base, LayerKind::Lora, LayerKind::Dora] {
            let f = cost(k, Op::Forward, s, DType::F16).unwrap();
            let b = cost(k, Op::Backward, s, DType::F16).unwrap();
            assert_eq!(cost(k, Op::ForwardBackward, s, DType::F16), Some(f + b));
        }
    }

    #[test]
    fn inference_is_cheaper_than_training_forward() {
        // Caching g removes the norm: the W0·Aᵀ FLOPs and a pass over W0's share of work.
        let s = shape(1, 8192, 28672, 256);
        let f = cost(LayerKind::Dora, Op::Forward, s, DType::BF16).unwrap();
        let i = cost(LayerKind::Dora, Op::Inference, s, DType::BF16).unwrap();
        assert!(i.flops < f.flops / 10.0);
        assert!(i.bytes < f.bytes);
    }

    #[test]
    fn op_names_round_trip() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()).unwrap(), op);
        }
        let e = Op::parse("fwd").unwrap_err().to_string();
        assert!(e.contains("forward_backward"), "{e}");
    }
}
