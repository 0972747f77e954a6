//! The float64 truth: docs/design.md §1 written as plainly as possible, used as the oracle by the
//! tests of every path (CPU, emulator, CUDA).
//!
//! Unlike the f32 path it **materialises** `V = W0 + s·B·A` (`d_out × d_in` doubles) and
//! differentiates through `V` directly, so it shares no algebra with the factored norm or the
//! expanded exact-gradient formulas it is used to check. It is meant for test sizes, not speed
//! (its products still go through `matrixmultiply::dgemm`, so 4096² layers take seconds).
//!
//! Zero rows follow dorafuse's rule, `g = m / max(n, ε)` with ε = [`NORM_EPS`]; in the exact
//! gradient the norm's own derivative is taken as 0 where `n < ε` (the same convention as the
//! f32 path; PEFT would give NaN there).

use super::gemm::{gemm, View, ViewMut};
use crate::layer::{GradMode, Layer, NORM_EPS};
use crate::tensor::Tensor;
use anyhow::Result;

/// A layer's parameters in f64, weight kept in its stored layout. Public so that tests can
/// perturb single parameters for finite differences.
#[derive(Debug, Clone, PartialEq)]
pub struct RefLayer {
    /// Input features.
    pub d_in: usize,
    /// Output features.
    pub d_out: usize,
    /// Rank.
    pub r: usize,
    /// W0 as stored: `[d_out, d_in]`, or `[d_in, d_out]` when `fan_in_fan_out`.
    pub weight: Vec<f64>,
    /// True when `weight` is `[d_in, d_out]`.
    pub fan_in_fan_out: bool,
    /// Bias `[d_out]`.
    pub bias: Option<Vec<f64>>,
    /// A `[r, d_in]`.
    pub lora_a: Vec<f64>,
    /// B `[d_out, r]`.
    pub lora_b: Vec<f64>,
    /// m `[d_out]`; `None` for plain LoRA.
    pub magnitude: Option<Vec<f64>>,
    /// s.
    pub scaling: f64,
}

/// Outputs of [`run_f64`], all f64, row-major. The gradient vectors are empty when no
/// `grad_y` was given; `grad_magnitude` is `None` for plain LoRA or without `grad_y`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefOutputs {
    /// y `[T, d_out]`.
    pub y: Vec<f64>,
    /// dL/dx `[T, d_in]`.
    pub grad_x: Vec<f64>,
    /// dL/dA `[r, d_in]`.
    pub grad_lora_a: Vec<f64>,
    /// dL/dB `[d_out, r]`.
    pub grad_lora_b: Vec<f64>,
    /// dL/dm `[d_out]`.
    pub grad_magnitude: Option<Vec<f64>>,
}

impl RefLayer {
    /// Widens every tensor of `layer` to f64 (exactly).
    ///
    /// # Errors
    /// An invalid layer (shapes, rank, scaling), naming the tensor.
    pub fn from_layer(layer: &Layer) -> Result<Self> {
        let (d_in, d_out, r) = layer.dims()?;
        Ok(Self {
            d_in,
            d_out,
            r,
            weight: layer.weight.to_f64(),
            fan_in_fan_out: layer.fan_in_fan_out,
            bias: layer.bias.as_ref().map(Tensor::to_f64),
            lora_a: layer.lora_a.to_f64(),
            lora_b: layer.lora_b.to_f64(),
            magnitude: layer.magnitude.as_ref().map(Tensor::to_f64),
            scaling: layer.scaling,
        })
    }

    /// W0 as a `[d_out, d_in]` view (strided when stored transposed).
    fn w0(&self) -> View<'_, f64> {
        if self.fan_in_fan_out {
            View::new(&self.weight, self.d_in, self.d_out).t()
        } else {
            View::new(&self.weight, self.d_out, self.d_in)
        }
    }

    /// `V = W0 + s·B·A`, materialised `[d_out, d_in]`.
    pub fn adapted_weight(&self) -> Vec<f64> {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let w0 = self.w0();
        let mut v = vec![0.0; d_out * d_in];
        for j in 0..d_out {
            for i in 0..d_in {
                v[j * d_in + i] = w0.at(j, i);
            }
        }
        gemm(
            self.scaling,
            View::new(&self.lora_b, d_out, self.r),
            View::new(&self.lora_a, self.r, d_in),
            1.0,
            ViewMut::new(&mut v, d_out, d_in),
        );
        v
    }

    /// `n_j = ‖V_j‖₂` from the materialised V.
    pub fn norm(&self) -> Vec<f64> {
        let v = self.adapted_weight();
        v.chunks_exact(self.d_in)
            .map(|row| row.iter().map(|a| a * a).sum::<f64>().sqrt())
            .collect()
    }

    /// y for `x [t, d_in]`. With `fixed_norm`, that norm is used instead of the layer's own
    /// (finite-difference tests of the detached gradient hold the norm constant this way).
    ///
    /// # Panics
    /// When `x` or `fixed_norm` have the wrong length.
    pub fn forward(&self, x: &[f64], t: usize, fixed_norm: Option<&[f64]>) -> Vec<f64> {
        self.run(x, t, None, GradMode::Detached, fixed_norm).y
    }

    /// Forward and, with `grad_y [t, d_out]`, backward. `fixed_norm` as in [`Self::forward`].
    ///
    /// # Panics
    /// When an input has the wrong length.
    pub fn run(
        &self,
        x: &[f64],
        t: usize,
        grad_y: Option<&[f64]>,
        mode: GradMode,
        fixed_norm: Option<&[f64]>,
    ) -> RefOutputs {
        let (d_in, d_out, r, s) = (self.d_in, self.d_out, self.r, self.scaling);
        assert_eq!(x.len(), t * d_in, "x length");
        let xv = View::new(x, t, d_in);
        let a = View::new(&self.lora_a, r, d_in);
        let b = View::new(&self.lora_b, d_out, r);
        let v = self.adapted_weight();
        let vv = View::new(&v, d_out, d_in);

        // U = x·Aᵀ, z = x·W0ᵀ + s·U·Bᵀ
        let mut u = vec![0.0; t * r];
        gemm(1.0, xv, a.t(), 0.0, ViewMut::new(&mut u, t, r));
        let mut z = vec![0.0; t * d_out];
        gemm(1.0, xv, self.w0().t(), 0.0, ViewMut::new(&mut z, t, d_out));
        gemm(
            s,
            View::new(&u, t, r),
            b.t(),
            1.0,
            ViewMut::new(&mut z, t, d_out),
        );

        // g = m / max(n, ε)  (1 for plain LoRA)
        let n: Vec<f64> = match fixed_norm {
            Some(n) => {
                assert_eq!(n.len(), d_out, "fixed norm length");
                n.to_vec()
            }
            None => v
                .chunks_exact(d_in)
                .map(|row| row.iter().map(|a| a * a).sum::<f64>().sqrt())
                .collect(),
        };
        let g: Vec<f64> = match &self.magnitude {
            Some(m) => m.iter().zip(&n).map(|(m, n)| m / n.max(NORM_EPS)).collect(),
            None => vec![1.0; d_out],
        };
        let mut y = vec![0.0; t * d_out];
        for tt in 0..t {
            for j in 0..d_out {
                let bias = self.bias.as_ref().map_or(0.0, |b| b[j]);
                y[tt * d_out + j] = g[j] * z[tt * d_out + j] + bias;
            }
        }
        let Some(dy) = grad_y else {
            return RefOutputs {
                y,
                grad_x: vec![],
                grad_lora_a: vec![],
                grad_lora_b: vec![],
                grad_magnitude: None,
            };
        };
        assert_eq!(dy.len(), t * d_out, "grad_y length");

        // dz = dy ⊙ g; the gradient through z (norm held constant).
        let dz: Vec<f64> = (0..t * d_out).map(|i| dy[i] * g[i % d_out]).collect();
        let dzv = View::new(&dz, t, d_out);
        let mut dzb = vec![0.0; t * r];
        gemm(1.0, dzv, b, 0.0, ViewMut::new(&mut dzb, t, r));
        let dzbv = View::new(&dzb, t, r);
        let mut grad_x = vec![0.0; t * d_in];
        gemm(1.0, dzv, self.w0(), 0.0, ViewMut::new(&mut grad_x, t, d_in));
        gemm(s, dzbv, a, 1.0, ViewMut::new(&mut grad_x, t, d_in));
        let mut grad_b = vec![0.0; d_out * r];
        gemm(
            s,
            dzv.t(),
            View::new(&u, t, r),
            0.0,
            ViewMut::new(&mut grad_b, d_out, r),
        );
        let mut grad_a = vec![0.0; r * d_in];
        gemm(s, dzbv.t(), xv, 0.0, ViewMut::new(&mut grad_a, r, d_in));

        // c_j = Σ_t dy ⊙ z: dL/dg_j.
        let mut c = vec![0.0; d_out];
        for tt in 0..t {
            for j in 0..d_out {
                c[j] += dy[tt * d_out + j] * z[tt * d_out + j];
            }
        }
        let grad_m = self.magnitude.as_ref().map(|_| {
            c.iter()
                .zip(&n)
                .map(|(c, n)| c / n.max(NORM_EPS))
                .collect::<Vec<f64>>()
        });

        if let (GradMode::Exact, Some(m)) = (mode, &self.magnitude) {
            // Through the norm: ∂g_j/∂V_j = −m_j·V_j / n_j³, so dL/dV_j = −k_j·V_j with
            // k_j = c_j·m_j / n_j³ (0 where n_j < ε: g is the constant 0 there), and
            // V = W0 + s·B·A gives dL/dB += s·(dL/dV)·Aᵀ, dL/dA += s·Bᵀ·(dL/dV).
            let mut dv = vec![0.0; d_out * d_in];
            for j in 0..d_out {
                let k = if n[j] < NORM_EPS {
                    0.0
                } else {
                    c[j] * m[j] / (n[j] * n[j] * n[j])
                };
                for i in 0..d_in {
                    dv[j * d_in + i] = -k * vv.at(j, i);
                }
            }
            let dvv = View::new(&dv, d_out, d_in);
            gemm(s, dvv, a.t(), 1.0, ViewMut::new(&mut grad_b, d_out, r));
            gemm(s, b.t(), dvv, 1.0, ViewMut::new(&mut grad_a, r, d_in));
        }
        RefOutputs {
            y,
            grad_x,
            grad_lora_a: grad_a,
            grad_lora_b: grad_b,
            grad_magnitude: grad_m,
        }
    }
}

/// Runs `layer` on `x` (and backward with `grad_y`) in float64: the truth every path is
/// tested against.
///
/// # Errors
/// An invalid layer, `x` or `grad_y` shape, naming the tensor.
pub fn run_f64(
    layer: &Layer,
    x: &Tensor,
    grad_y: Option<&Tensor>,
    mode: GradMode,
) -> Result<RefOutputs> {
    let shape = layer.call_shape(x, grad_y)?;
    let l = RefLayer::from_layer(layer)?;
    let gy = grad_y.map(Tensor::to_f64);
    Ok(l.run(&x.to_f64(), shape.t, gy.as_deref(), mode, None))
}

/// `n_j = ‖W0_j + s·B_j·A‖₂` in float64 (from the materialised V).
///
/// # Errors
/// An invalid layer, naming the tensor.
pub fn norm_f64(layer: &Layer) -> Result<Vec<f64>> {
    Ok(RefLayer::from_layer(layer)?.norm())
}

/// `W' = diag(g)·(W0 + s·B·A)` `[d_out, d_in]` in float64 (g = 1 for plain LoRA).
///
/// # Errors
/// An invalid layer, naming the tensor.
pub fn merged_weight_f64(layer: &Layer) -> Result<Vec<f64>> {
    let l = RefLayer::from_layer(layer)?;
    let mut v = l.adapted_weight();
    if let Some(m) = &l.magnitude {
        let n = l.norm();
        for (j, row) in v.chunks_exact_mut(l.d_in).enumerate() {
            let g = m[j] / n[j].max(NORM_EPS);
            row.iter_mut().for_each(|e| *e *= g);
        }
    }
    Ok(v)
}
