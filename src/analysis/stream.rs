//! Layer matrices built from a memory-mapped base weight one block of rows at a time, so
//! `export-lora` and `resize --base` multiply by `W0 + low-rank terms` without ever holding a
//! dense `d_out × d_in` matrix (only one block of at most [`BLOCK_ELEMS`] values).

use super::lowrank::LinearOp;
use crate::adapter::AdaptedModel;
use crate::dtype::DType;
use crate::tensor::Tensor;
use anyhow::{ensure, Context, Result};
use faer::{Mat, MatRef};

/// The most f64 values one block of a streamed matrix holds (2 MiB).
pub const BLOCK_ELEMS: usize = 1 << 18;

/// A module's base weight W0 in the base model's memory map, read in blocks of stored rows
/// (`[d_out, d_in]`, or `[d_in, d_out]` with `fan_in_fan_out`) converted to f64.
#[derive(Debug)]
pub struct StoredWeight<'a> {
    bytes: &'a [u8],
    dtype: DType,
    rows: usize,
    cols: usize,
    /// True when stored `[d_in, d_out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// The base tensor name (for messages).
    pub name: String,
}

impl<'a> StoredWeight<'a> {
    /// The base weight of `module` (its shape already checked by [`AdaptedModel::new`]), in
    /// the layout decided for that module (shape, the base's config.json, or the caller's
    /// option), as merge and inspect decide it.
    ///
    /// # Errors
    /// Unknown module, or a non-float base weight.
    pub fn open(model: &AdaptedModel<'a>, module: &str) -> Result<Self> {
        let fan_in_fan_out = model.module_fan_in_fan_out(module)?;
        let name = model.weight_name(module);
        let e = model
            .base
            .entry(&name)
            .with_context(|| module.to_string())?;
        let dtype = DType::from_safetensors(e.dtype)
            .with_context(|| format!("{module}: base weight {name}"))?;
        ensure!(
            e.shape.len() == 2,
            "{module}: base weight {name} is {:?}, expected 2-D",
            e.shape
        );
        Ok(Self {
            bytes: model.base.bytes(&name)?,
            dtype,
            rows: e.shape[0],
            cols: e.shape[1],
            fan_in_fan_out,
            name,
        })
    }

    /// `(d_out, d_in)`.
    pub fn dims(&self) -> (usize, usize) {
        if self.fan_in_fan_out {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Stored rows `i0..i0 + n` as an `[n, cols]` f64 matrix.
    fn block(&self, i0: usize, n: usize) -> Result<Mat<f64>> {
        let sz = self.dtype.size();
        let bytes = &self.bytes[i0 * self.cols * sz..(i0 + n) * self.cols * sz];
        let t = Tensor::from_bytes(self.dtype, vec![n, self.cols], bytes)
            .with_context(|| format!("base weight {}", self.name))?;
        let v = t.to_f64();
        if let Some(k) = v.iter().position(|x| !x.is_finite()) {
            let (i, j) = (i0 + k / self.cols, k % self.cols);
            anyhow::bail!(
                "base weight {}: element [{i}, {j}] is {}; inputs must be finite",
                self.name,
                v[k]
            );
        }
        Ok(Mat::from_fn(n, self.cols, |i, j| v[i * self.cols + j]))
    }

    /// Stored rows per block.
    fn block_rows(&self) -> usize {
        (BLOCK_ELEMS / self.cols.max(1)).max(1)
    }
}

/// `M = diag(α)·W0 + Σ_t P_t·Q_t` (`P_t [d_out, r_t]`, `Q_t [r_t, d_in]`), a `d_out × d_in`
/// matrix produced one block of W0's stored rows at a time. Row scalings of a low-rank term
/// (`diag(g)·s·B`) are folded into its `P`.
pub struct LayerMatrix<'w, 'a> {
    w0: &'w StoredWeight<'a>,
    alpha: Vec<f64>,
    terms: Vec<(Mat<f64>, Mat<f64>)>,
}

impl<'w, 'a> LayerMatrix<'w, 'a> {
    /// `diag(alpha)·W0 + Σ P·Q`.
    ///
    /// # Errors
    /// A length or shape that disagrees with W0's.
    pub fn new(
        w0: &'w StoredWeight<'a>,
        alpha: Vec<f64>,
        terms: Vec<(Mat<f64>, Mat<f64>)>,
    ) -> Result<Self> {
        let (d_out, d_in) = w0.dims();
        ensure!(
            alpha.len() == d_out,
            "row scale has {} entries, expected {d_out}",
            alpha.len()
        );
        for (p, q) in &terms {
            ensure!(
                p.nrows() == d_out && q.ncols() == d_in && p.ncols() == q.nrows(),
                "low-rank term [{}, {}]·[{}, {}] does not fit [{d_out}, {d_in}]",
                p.nrows(),
                p.ncols(),
                q.nrows(),
                q.ncols()
            );
        }
        Ok(Self { w0, alpha, terms })
    }

    /// The summed rank of the low-rank terms.
    pub fn term_rank(&self) -> usize {
        self.terms.iter().map(|(p, _)| p.ncols()).sum()
    }

    /// Stored rows `i0..i0 + n` of M in W0's stored orientation.
    fn block(&self, i0: usize, n: usize) -> Result<Mat<f64>> {
        let mut blk = self.w0.block(i0, n)?;
        let fifo = self.w0.fan_in_fan_out;
        for i in 0..n {
            for j in 0..blk.ncols() {
                // Stored [d_out, d_in]: row i0+i is output i0+i; stored [d_in, d_out]: column j.
                let a = if fifo {
                    self.alpha[j]
                } else {
                    self.alpha[i0 + i]
                };
                blk.write(i, j, a * blk.read(i, j));
            }
        }
        for (p, q) in &self.terms {
            if fifo {
                blk += q.as_ref().transpose().subrows(i0, n) * p.as_ref().transpose();
            } else {
                blk += p.as_ref().subrows(i0, n) * q.as_ref();
            }
        }
        Ok(blk)
    }

    /// Calls `f(i0, block)` for every block of stored rows, in order.
    fn for_each_block(&self, mut f: impl FnMut(usize, &Mat<f64>)) -> Result<()> {
        let rows = self.w0.rows;
        let step = self.w0.block_rows();
        let mut i0 = 0;
        while i0 < rows {
            let n = step.min(rows - i0);
            let blk = self.block(i0, n)?;
            f(i0, &blk);
            i0 += n;
        }
        Ok(())
    }

    /// `‖M‖_F²`.
    ///
    /// # Errors
    /// An unreadable base tensor.
    pub fn frob2(&self) -> Result<f64> {
        let mut acc = 0.0;
        self.for_each_block(|_, b| {
            let n = b.norm_l2();
            acc += n * n;
        })?;
        Ok(acc)
    }

    /// `‖M_j‖²` for every output row j.
    ///
    /// # Errors
    /// An unreadable base tensor.
    pub fn row_norms2(&self) -> Result<Vec<f64>> {
        let (d_out, _) = self.w0.dims();
        let fifo = self.w0.fan_in_fan_out;
        let mut out = vec![0f64; d_out];
        self.for_each_block(|i0, b| {
            for i in 0..b.nrows() {
                for j in 0..b.ncols() {
                    let x = b.read(i, j);
                    if fifo {
                        out[j] += x * x;
                    } else {
                        out[i0 + i] += x * x;
                    }
                }
            }
        })?;
        Ok(out)
    }
}

impl LinearOp for LayerMatrix<'_, '_> {
    fn dims(&self) -> (usize, usize) {
        self.w0.dims()
    }

    fn mul(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let (d_out, _) = self.w0.dims();
        let mut out = Mat::<f64>::zeros(d_out, x.ncols());
        let fifo = self.w0.fan_in_fan_out;
        self.for_each_block(|i0, b| {
            let n = b.nrows();
            if fifo {
                // b = (Mᵀ) rows i0..: M·X = Σ bᵀ·X[i0..]
                out += b.transpose() * x.subrows(i0, n);
            } else {
                let part = b * x;
                out.as_mut().subrows_mut(i0, n).copy_from(&part);
            }
        })?;
        Ok(out)
    }

    fn mul_t(&self, y: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let (_, d_in) = self.w0.dims();
        let mut out = Mat::<f64>::zeros(d_in, y.ncols());
        let fifo = self.w0.fan_in_fan_out;
        self.for_each_block(|i0, b| {
            let n = b.nrows();
            if fifo {
                let part = b * y;
                out.as_mut().subrows_mut(i0, n).copy_from(&part);
            } else {
                out += b.transpose() * y.subrows(i0, n);
            }
        })?;
        Ok(out)
    }
}
