//! Seeded random layers and the conversions the tests share.

use candle_core::{DType as CDType, Device, Tensor};
use dorafuse::{DType, Layer, Tensor as HostTensor};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Uniform values in [−scale, scale).
pub fn values(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// A host tensor of `dtype` holding `v`.
pub fn host(dtype: DType, shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(dtype, shape.to_vec(), v).unwrap()
}

/// The candle tensor of a host tensor (same dtype and shape).
pub fn candle(t: &HostTensor) -> Tensor {
    let v = Tensor::from_vec(t.to_f32(), t.shape(), &Device::Cpu).unwrap();
    v.to_dtype(match t.dtype() {
        DType::F32 => CDType::F32,
        DType::F16 => CDType::F16,
        DType::BF16 => CDType::BF16,
    })
    .unwrap()
}

/// A candle tensor's values as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(CDType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A DoRA (or LoRA, `dora = false`) layer with non-trivial factors: ‖s·B·A‖ a sizeable
/// fraction of ‖W0‖ and m away from the norm, so every term shows in the output.
pub fn layer(seed: u64, d_in: usize, d_out: usize, r: usize, dtype: DType, dora: bool) -> Layer {
    let mut rng = SmallRng::seed_from_u64(seed);
    let w = values(&mut rng, d_out * d_in, 0.5);
    let b = values(&mut rng, d_out, 0.2);
    let a = values(&mut rng, r * d_in, 0.5);
    let bb = values(&mut rng, d_out * r, 0.5);
    let m: Vec<f32> = (0..d_out).map(|_| rng.gen_range(0.5..2.0)).collect();
    Layer {
        weight: host(dtype, &[d_out, d_in], &w),
        bias: Some(host(dtype, &[d_out], &b)),
        lora_a: host(dtype, &[r, d_in], &a),
        lora_b: host(dtype, &[d_out, r], &bb),
        magnitude: dora.then(|| host(dtype, &[d_out], &m)),
        scaling: 0.75,
        fan_in_fan_out: false,
    }
}

/// The candle layer holding the tensors of `l`.
pub fn candle_layer(l: &Layer) -> dorafuse::candle::DoraLinear {
    dorafuse::candle::DoraLinear::new(
        &candle(&l.weight),
        l.bias.as_ref().map(candle).as_ref(),
        candle(&l.lora_a),
        candle(&l.lora_b),
        l.magnitude.as_ref().map(candle),
        l.scaling,
    )
    .unwrap()
}
