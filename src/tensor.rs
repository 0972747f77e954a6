//! A host tensor: a shape and typed, contiguous row-major storage in one of the three dtypes.

use crate::dtype::DType;
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};

/// Typed storage of a [`Tensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// f32 elements.
    F32(Vec<f32>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
}

/// A contiguous, row-major host tensor. Shapes follow PyTorch (`[d_out, d_in]` for a
/// linear weight).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Builds a tensor from typed storage.
    ///
    /// # Errors
    /// When the element count does not match the shape.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let n: usize = shape.iter().product();
        let len = match &data {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        };
        ensure!(
            n == len,
            "tensor of shape {shape:?} needs {n} elements, got {len}"
        );
        Ok(Self { shape, data })
    }

    /// Rounds f32 values to `dtype` (round-to-nearest-even, as the hardware does).
    ///
    /// # Errors
    /// When the element count does not match the shape.
    pub fn from_f32(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        let data = match dtype {
            DType::F32 => TensorData::F32(values.to_vec()),
            DType::F16 => TensorData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => TensorData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Self::new(shape, data)
    }

    /// Rounds f64 values to `dtype` (through f32 for the half types, which is exact
    /// rounding for all values in their range except double-rounding ties, irrelevant here).
    ///
    /// # Errors
    /// When the element count does not match the shape.
    pub fn from_f64(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Result<Self> {
        let v: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        Self::from_f32(dtype, shape, &v)
    }

    /// Reads a tensor from little-endian bytes of `dtype`.
    ///
    /// # Errors
    /// When the byte count does not match the shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, bytes: &[u8]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(
            bytes.len() == n * dtype.size(),
            "tensor of shape {shape:?} and dtype {dtype} needs {} bytes, got {}",
            n * dtype.size(),
            bytes.len()
        );
        // On a little-endian host the bytes are the values: one copy (into aligned storage).
        #[cfg(target_endian = "little")]
        let data = match dtype {
            DType::F32 => TensorData::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => TensorData::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => TensorData::BF16(bytemuck::pod_collect_to_vec(bytes)),
        };
        #[cfg(not(target_endian = "little"))]
        let data = match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
            DType::BF16 => TensorData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            ),
        };
        Self::new(shape, data)
    }

    /// Reads a tensor from a safetensors view, naming `name` in any error.
    ///
    /// # Errors
    /// Unsupported dtype or inconsistent byte count.
    pub fn from_view(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Self> {
        let dtype =
            DType::from_safetensors(view.dtype()).with_context(|| format!("tensor {name}"))?;
        Self::from_bytes(dtype, view.shape().to_vec(), view.data())
            .with_context(|| format!("tensor {name}"))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// The typed storage.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes (for safetensors and device uploads).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The values widened to f32 (exact for every dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// The values widened to f64 (exact for every dtype).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// The same values rounded to another dtype.
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        Tensor::from_f32(dtype, self.shape.clone(), &self.to_f32())
            .expect("element count is preserved by a cast")
    }

    /// The index of the first NaN or infinite element, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match &self.data {
            TensorData::F32(v) => first_where(v, |x| !x.is_finite()),
            TensorData::F16(v) => first_where(v, |x| !x.is_finite()),
            TensorData::BF16(v) => first_where(v, |x| !x.is_finite()),
        }
    }

    /// Fails when any element is NaN or infinite, naming `name`, the element and its index.
    ///
    /// # Errors
    /// A non-finite element.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        if let Some(i) = self.first_non_finite() {
            let v = self.to_f32()[i];
            bail!(
                "{name}: element {i} (index {:?}) is {v}; inputs must be finite",
                unravel(i, &self.shape)
            );
        }
        Ok(())
    }
}

/// Converts a flat row-major index into a multi-index for error messages.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// Relative L2 error ‖got − want‖₂ / ‖want‖₂ in f64. NaN anywhere gives NaN (never passes a
/// `<` comparison). When `want` is all zeros, the absolute L2 norm of `got` is returned.
pub fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_l2 over different lengths");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The index of the first element where `bad` holds: chunks are scanned with a branch-free
/// fold (vectorised; a pass over a weight at memory speed), the position searched only
/// inside the chunk that has one.
fn first_where<T: Copy>(v: &[T], bad: impl Fn(T) -> bool) -> Option<usize> {
    const CHUNK: usize = 4096;
    v.chunks(CHUNK)
        .enumerate()
        .find(|(_, c)| c.iter().fold(false, |any, &x| any | bad(x)))
        .and_then(|(i, c)| c.iter().position(|&x| bad(x)).map(|p| i * CHUNK + p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_in_every_dtype() {
        let vals: Vec<f32> = (0..6).map(|i| i as f32 * 0.375 - 1.0).collect();
        for d in DType::ALL {
            let t = Tensor::from_f32(d, vec![2, 3], &vals).unwrap();
            let back = Tensor::from_bytes(d, vec![2, 3], t.as_bytes()).unwrap();
            assert_eq!(t, back);
            assert_eq!(
                back.to_f32(),
                vals,
                "{d}: these values are exact in every dtype"
            );
        }
    }

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values: ties go to the even mantissa (1.0).
        let t = Tensor::from_f32(DType::BF16, vec![1], &[1.0 + 1.0 / 256.0]).unwrap();
        assert_eq!(t.to_f32(), vec![1.0]);
        let t = Tensor::from_f32(DType::BF16, vec![1], &[1.0 + 3.0 / 256.0]).unwrap();
        assert_eq!(t.to_f32(), vec![1.0 + 4.0 / 256.0]);
    }

    #[test]
    fn non_finite_is_named() {
        let t = Tensor::from_f32(DType::F32, vec![2, 2], &[0.0, 1.0, f32::NAN, 2.0]).unwrap();
        let e = t.check_finite("x").unwrap_err().to_string();
        assert!(e.contains("x: element 2 (index [1, 0])"), "{e}");
    }

    #[test]
    fn wrong_length_is_refused() {
        assert!(Tensor::from_f32(DType::F32, vec![2, 2], &[0.0; 3]).is_err());
        assert!(Tensor::from_bytes(DType::F16, vec![3], &[0u8; 5]).is_err());
    }

    #[test]
    fn rel_l2_basics() {
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_l2(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-12);
        assert!(rel_l2(&[f64::NAN], &[1.0]).is_nan());
    }
}
