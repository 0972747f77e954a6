//! The description of one adapted linear layer: shapes, scaling, and validation that names
//! what is wrong.

use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};

/// ε in `g = m / max(n, ε)`: a zero row gives g = 0 instead of NaN.
pub const NORM_EPS: f64 = 1e-12;

/// The sizes of one layer call: tokens, input features, output features, rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Tokens (all leading batch dimensions flattened).
    pub t: usize,
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Adapter rank.
    pub r: usize,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "T={} d_in={} d_out={} r={}",
            self.t, self.d_in, self.d_out, self.r
        )
    }
}

/// The effective LoRA scaling `s`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
///
/// # Errors
/// `r == 0`, or a non-finite alpha.
pub fn scaling(alpha: f64, r: usize, use_rslora: bool) -> Result<f64> {
    ensure!(r > 0, "rank must be at least 1");
    ensure!(alpha.is_finite(), "lora_alpha must be finite, got {alpha}");
    Ok(if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    })
}

/// One adapted linear layer's parameters, each tensor in its own dtype.
///
/// `weight` is `[d_out, d_in]` (PyTorch `nn.Linear`), or `[d_in, d_out]` when
/// `fan_in_fan_out` is set (GPT-2 `Conv1D`). `magnitude` absent means plain LoRA.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// Frozen base weight W0.
    pub weight: Tensor,
    /// Optional bias `[d_out]`; never scaled by g (PEFT's behaviour).
    pub bias: Option<Tensor>,
    /// A `[r, d_in]`.
    pub lora_a: Tensor,
    /// B `[d_out, r]`.
    pub lora_b: Tensor,
    /// DoRA magnitude m `[d_out]`; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
    /// The effective scaling s.
    pub scaling: f64,
    /// True when `weight` is stored transposed, `[d_in, d_out]`.
    pub fan_in_fan_out: bool,
}

/// `name is [a, b], expected [c, d]` helper.
fn expect_shape(name: &str, got: &[usize], want: &[usize], why: &str) -> Result<()> {
    if got != want {
        bail!("{name} is {got:?}, expected {want:?} ({why})");
    }
    Ok(())
}

impl Layer {
    /// True for DoRA (a magnitude is present), false for plain LoRA.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// Validates every shape against every other and returns `(d_in, d_out, r)`.
    ///
    /// # Errors
    /// The first inconsistency, naming the tensor, its shape and the expected shape.
    pub fn dims(&self) -> Result<(usize, usize, usize)> {
        let a = self.lora_a.shape();
        ensure!(a.len() == 2, "lora_A must be 2-D [r, d_in], got {a:?}");
        let (r, d_in) = (a[0], a[1]);
        ensure!(r >= 1, "lora_A is {a:?}: rank must be at least 1");
        ensure!(d_in >= 1, "lora_A is {a:?}: d_in must be at least 1");
        let w = self.weight.shape();
        ensure!(w.len() == 2, "weight must be 2-D, got {w:?}");
        let d_out = if self.fan_in_fan_out { w[1] } else { w[0] };
        ensure!(d_out >= 1, "weight is {w:?}: d_out must be at least 1");
        if self.fan_in_fan_out {
            expect_shape(
                "weight",
                w,
                &[d_in, d_out],
                "[d_in, d_out] with fan_in_fan_out, d_in from lora_A",
            )?;
        } else {
            expect_shape(
                "weight",
                w,
                &[d_out, d_in],
                "[d_out, d_in], d_in from lora_A",
            )?;
        }
        let b = self.lora_b.shape();
        if b.len() == 2 && b[0] == d_out && b[1] != r {
            bail!("lora_B is {b:?} but lora_A is {a:?}: rank {} of lora_B disagrees with rank {r} of lora_A", b[1]);
        }
        expect_shape("lora_B", b, &[d_out, r], "[d_out, r]")?;
        if let Some(bias) = &self.bias {
            expect_shape("bias", bias.shape(), &[d_out], "[d_out]")?;
        }
        if let Some(m) = &self.magnitude {
            expect_shape("magnitude", m.shape(), &[d_out], "[d_out]")?;
        }
        ensure!(
            self.scaling.is_finite(),
            "scaling must be finite, got {}",
            self.scaling
        );
        Ok((d_in, d_out, r))
    }

    /// Validates the layer against an input `x [T, d_in]` and returns the call's shape.
    ///
    /// # Errors
    /// Any inconsistency in the layer or in `x`.
    pub fn shape_for(&self, x: &Tensor) -> Result<Shape> {
        let (d_in, d_out, r) = self.dims()?;
        let xs = x.shape();
        ensure!(xs.len() == 2, "x must be 2-D [T, d_in], got {xs:?}");
        ensure!(
            xs[1] == d_in,
            "x is {xs:?}, expected [T, {d_in}] (d_in from lora_A)"
        );
        ensure!(xs[0] >= 1, "x is {xs:?}: at least one token is needed");
        Ok(Shape {
            t: xs[0],
            d_in,
            d_out,
            r,
        })
    }

    /// Validates the layer against `x [T, d_in]` and, when given, `grad_y [T, d_out]`, and
    /// returns the call's shape.
    ///
    /// # Errors
    /// Any inconsistency in the layer, `x` or `grad_y`, naming the tensor.
    pub fn call_shape(&self, x: &Tensor, grad_y: Option<&Tensor>) -> Result<Shape> {
        let shape = self.shape_for(x)?;
        if let Some(gy) = grad_y {
            ensure!(
                gy.shape() == [shape.t, shape.d_out],
                "grad_y is {:?}, expected [{}, {}] ([T, d_out])",
                gy.shape(),
                shape.t,
                shape.d_out
            );
        }
        Ok(shape)
    }

    /// Fails on the first NaN or infinity in any parameter, naming the tensor.
    ///
    /// # Errors
    /// A non-finite element.
    pub fn check_finite(&self) -> Result<()> {
        self.weight.check_finite("weight")?;
        if let Some(b) = &self.bias {
            b.check_finite("bias")?;
        }
        self.lora_a.check_finite("lora_A")?;
        self.lora_b.check_finite("lora_B")?;
        if let Some(m) = &self.magnitude {
            m.check_finite("magnitude")?;
        }
        Ok(())
    }
}

/// Which gradient of the norm to take in backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GradMode {
    /// The norm is treated as a constant (DoRA paper §4.3; what PEFT does).
    #[default]
    Detached,
    /// The exact gradient, with the norm's dependence on A and B.
    Exact,
}

/// Gradients of one layer call, each parameter gradient in its parameter's dtype and
/// `grad_x` in x's dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    /// dL/dx `[T, d_in]`.
    pub grad_x: Tensor,
    /// dL/dA `[r, d_in]`.
    pub grad_lora_a: Tensor,
    /// dL/dB `[d_out, r]`.
    pub grad_lora_b: Tensor,
    /// dL/dm `[d_out]`; `None` for plain LoRA.
    pub grad_magnitude: Option<Tensor>,
}

/// What a layer call produces: y `[T, d_out]` in x's dtype, and the gradients when a
/// `grad_y` was given.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    /// The layer output.
    pub y: Tensor,
    /// Gradients, when backward was run.
    pub grads: Option<Grads>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;

    fn t(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_f32(DType::F32, shape.to_vec(), &vec![0.5; n]).unwrap()
    }

    fn layer(fifo: bool) -> Layer {
        Layer {
            weight: if fifo { t(&[5, 3]) } else { t(&[3, 5]) },
            bias: Some(t(&[3])),
            lora_a: t(&[2, 5]),
            lora_b: t(&[3, 2]),
            magnitude: Some(t(&[3])),
            scaling: 2.0,
            fan_in_fan_out: fifo,
        }
    }

    #[test]
    fn dims_and_shape() {
        for fifo in [false, true] {
            let l = layer(fifo);
            assert_eq!(l.dims().unwrap(), (5, 3, 2));
            let s = l.shape_for(&t(&[7, 5])).unwrap();
            assert_eq!(
                s,
                Shape {
                    t: 7,
                    d_in: 5,
                    d_out: 3,
                    r: 2
                }
            );
        }
    }

    #[test]
    fn errors_name_the_tensor() {
        let mut l = layer(false);
        l.lora_b = t(&[3, 4]);
        let e = l.dims().unwrap_err().to_string();
        assert!(
            e.contains("lora_B") && e.contains("rank 4") && e.contains("rank 2"),
            "{e}"
        );
        let mut l = layer(false);
        l.weight = t(&[5, 3]);
        assert!(l
            .dims()
            .unwrap_err()
            .to_string()
            .starts_with("weight is [5, 3]"));
        let mut l = layer(false);
        l.magnitude = Some(t(&[4]));
        assert!(l
            .dims()
            .unwrap_err()
            .to_string()
            .starts_with("magnitude is [4]"));
        let mut l = layer(false);
        l.bias = Some(t(&[2]));
        assert!(l.dims().unwrap_err().to_string().starts_with("bias is [2]"));
        let e = layer(false).shape_for(&t(&[7, 4])).unwrap_err().to_string();
        assert!(e.starts_with("x is [7, 4]"), "{e}");
        let e = layer(false)
            .call_shape(&t(&[7, 5]), Some(&t(&[7, 4])))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("grad_y is [7, 4], expected [7, 3]"), "{e}");
        assert!(layer(false)
            .call_shape(&t(&[7, 5]), Some(&t(&[7, 3])))
            .is_ok());
    }

    #[test]
    fn scaling_modes() {
        assert_eq!(scaling(16.0, 8, false).unwrap(), 2.0);
        assert_eq!(scaling(16.0, 4, true).unwrap(), 8.0);
        assert!(scaling(16.0, 0, false).is_err());
    }
}
