//! Benchmark inputs: random layers with realistic magnitudes, never zeros (a GEMM on zeros
//! runs faster than on real data, and zeros hide unwritten outputs).

use crate::dtype::DType;
use crate::layer::{Layer, Shape};
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// `n` values uniform in `[-scale, scale)`.
pub fn uniform(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A tensor of `shape` in `dtype`, values uniform in `[-scale, scale)`.
///
/// # Errors
/// Only if `dtype` cannot hold f32 values (a bug).
pub fn tensor(rng: &mut SmallRng, dtype: DType, shape: Vec<usize>, scale: f32) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_f32(dtype, shape, &uniform(rng, n, scale))
}

/// One input set of the benchmark: a DoRA layer (take `magnitude` out for LoRA), an input
/// and an output gradient.
#[derive(Debug, Clone)]
pub struct InputSet {
    /// The layer, with a magnitude; every tensor in the set's dtype except `magnitude` (f32,
    /// as PEFT keeps it).
    pub layer: Layer,
    /// `x [T, d_in]`.
    pub x: Tensor,
    /// `dy [T, d_out]`.
    pub dy: Tensor,
}

/// Builds a random DoRA layer and inputs of `shape` in `dtype` from `seed`.
///
/// Scales follow a trained layer: W0 and A like Kaiming-uniform (`1/√d_in`), B non-zero
/// (a trained adapter, not PEFT's zero init), `s = 2` (alpha = 2r), and m within 10% of the
/// row norms of `W0 + s·B·A`, so g is near 1 as after fine-tuning.
///
/// # Errors
/// Only if the shapes are inconsistent (a bug).
pub fn random_set(shape: Shape, dtype: DType, seed: u64) -> Result<InputSet> {
    let Shape { t, d_in, d_out, r } = shape;
    let rng = &mut SmallRng::seed_from_u64(seed);
    let w_scale = 1.0 / (d_in as f32).sqrt();
    let ctx = || format!("benchmark inputs for {shape}");
    let weight = tensor(rng, dtype, vec![d_out, d_in], w_scale).with_context(ctx)?;
    let lora_a = tensor(rng, dtype, vec![r, d_in], w_scale).with_context(ctx)?;
    let lora_b = tensor(rng, dtype, vec![d_out, r], 0.5 / (r as f32).sqrt()).with_context(ctx)?;
    // Row norms of a Kaiming-uniform row are ≈ 1/√3; m near them keeps g ≈ 1 without
    // computing the norm here (that is what is being benchmarked).
    let m: Vec<f32> = (0..d_out)
        .map(|_| (1.0 / 3f32.sqrt()) * (1.0 + rng.gen_range(-0.1..0.1)))
        .collect();
    let layer = Layer {
        weight,
        bias: None,
        lora_a,
        lora_b,
        magnitude: Some(Tensor::from_f32(DType::F32, vec![d_out], &m).with_context(ctx)?),
        scaling: 2.0,
        fan_in_fan_out: false,
    };
    layer.dims().with_context(ctx)?;
    Ok(InputSet {
        layer,
        x: tensor(rng, dtype, vec![t, d_in], 1.0).with_context(ctx)?,
        dy: tensor(rng, dtype, vec![t, d_out], 1.0).with_context(ctx)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_has_the_shapes_and_no_zeros() {
        let shape = Shape {
            t: 3,
            d_in: 17,
            d_out: 9,
            r: 2,
        };
        let s = random_set(shape, DType::BF16, 1).unwrap();
        assert_eq!(s.layer.shape_for(&s.x).unwrap(), shape);
        assert_eq!(s.dy.shape(), &[3, 9]);
        assert_eq!(s.layer.magnitude.as_ref().unwrap().dtype(), DType::F32);
        assert!(s.layer.lora_b.to_f32().iter().all(|&v| v != 0.0));
        // The rotation's size of a set counts exactly these tensors.
        let l = &s.layer;
        let tensors = [
            &l.weight,
            &l.lora_a,
            &l.lora_b,
            l.magnitude.as_ref().unwrap(),
            &s.x,
            &s.dy,
        ];
        let bytes: usize = tensors.iter().map(|t| t.as_bytes().len()).sum();
        assert_eq!(bytes, crate::bench::runner::set_bytes(shape, DType::BF16));
        // Seeds give different data.
        let t = random_set(shape, DType::BF16, 2).unwrap();
        assert_ne!(s.x, t.x);
    }
}
