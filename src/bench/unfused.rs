//! DoRA as PEFT runs it (`peft.tuners.lora.dora.DoraLinearLayer`), the baseline of the
//! `unfused` rows, written once: one pass per PyTorch operation over named tensors, each
//! target supplying the passes ([`Passes`]: the GEMM crate on the CPU, `Backend::gemm` and
//! `kernels/baseline.cu` on a device).
//!
//! The forward materialises `B·A` (`d_out × d_in`), builds `V = W0 + s·B·A`, takes its row
//! norms and `g = m / max(n, ε)`, then `base = x·W0ᵀ`, `lora = (x·Aᵀ)·Bᵀ`,
//! `result_dora = (g − 1)·base + g·s·lora` and `y = base + result_dora` as separate passes.
//! PEFT builds `B·A` by pushing an identity matrix through both adapters; a direct product
//! is cheaper, so this baseline is, if anything, faster than PEFT's own. The backward is the
//! one autograd runs for that graph, norm detached.

use crate::formula::Op;
use crate::layer::Shape;
use anyhow::Result;

/// The tensors of PEFT's DoRA graph. `W`, `A`, `B`, `M`, `X`, `Dy` are the inputs; the rest
/// are what the graph allocates. `M`, `N`, `G` and `GradM` are f32; the others are in the
/// implementation's working dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum T {
    W,
    A,
    B,
    M,
    X,
    Dy,
    BA,
    V,
    N,
    G,
    Base,
    U,
    Lora,
    Tmp,
    Tmp2,
    Res,
    Y,
    DLora,
    DU,
    GradX,
    GradA,
    GradB,
    GradM,
}

/// Every intermediate and output of the graph (what [`len`] sizes).
pub const TEMPORARIES: [T; 17] = [
    T::BA,
    T::V,
    T::N,
    T::G,
    T::Base,
    T::U,
    T::Lora,
    T::Tmp,
    T::Tmp2,
    T::Res,
    T::Y,
    T::DLora,
    T::DU,
    T::GradX,
    T::GradA,
    T::GradB,
    T::GradM,
];

/// Elements of tensor `t` at shape `s`.
pub fn len(t: T, s: Shape) -> usize {
    let Shape {
        t: n,
        d_in,
        d_out,
        r,
    } = s;
    match t {
        T::W | T::BA | T::V => d_out * d_in,
        T::A | T::GradA => r * d_in,
        T::B | T::GradB => d_out * r,
        T::M | T::N | T::G | T::GradM => d_out,
        T::X | T::GradX => n * d_in,
        T::U | T::DU => n * r,
        T::Dy | T::Base | T::Lora | T::Tmp | T::Tmp2 | T::Res | T::Y | T::DLora => n * d_out,
    }
}

/// The passes of the graph on one target. Matrices are row-major; every pass reads and
/// writes whole tensors (the first `T` tokens' rows where a tensor has tokens).
pub trait Passes {
    /// `c = op(a)·op(b) + beta·c` with `op(a)` `[m, k]`, `op(b)` `[k, n]`; `(x, true)` uses
    /// `x` transposed.
    ///
    /// # Errors
    /// A failure of the GEMM.
    fn gemm(
        &mut self,
        mnk: (usize, usize, usize),
        a: (T, bool),
        b: (T, bool),
        c: T,
        beta: f32,
    ) -> Result<()>;
    /// `out = alpha·a + beta·b` over `n` elements.
    ///
    /// # Errors
    /// A launch failure.
    fn axpby(&mut self, out: T, a: T, b: T, alpha_beta: (f32, f32), n: usize) -> Result<()>;
    /// `out[t, j] = alpha·(g[j] + shift)·a[t, j]` over `[rows, cols]`, g being [`T::G`].
    ///
    /// # Errors
    /// A launch failure.
    fn scale_cols(
        &mut self,
        out: T,
        a: T,
        shift_alpha: (f32, f32),
        rows: usize,
        cols: usize,
    ) -> Result<()>;
    /// `N[j] = ‖V_j‖`, `G[j] = M[j] / max(N[j], ε)` over `[rows, cols]`.
    ///
    /// # Errors
    /// A launch failure.
    fn row_norm(&mut self, rows: usize, cols: usize) -> Result<()>;
    /// `out[j] = Σ_t a[t, j]·b[t, j] / max(N[j], ε)` over `[rows, cols]`.
    ///
    /// # Errors
    /// A launch failure.
    fn col_dot(&mut self, out: T, a: T, b: T, rows: usize, cols: usize) -> Result<()>;
}

/// PEFT's norm passes: `B·A`, `V = W0 + s·B·A`, row norms and g.
///
/// # Errors
/// A failure of a pass.
pub fn norm(p: &mut dyn Passes, sh: Shape, s: f32) -> Result<()> {
    let (i, o, r) = (sh.d_in, sh.d_out, sh.r);
    p.gemm((o, i, r), (T::B, false), (T::A, false), T::BA, 0.0)?;
    p.axpby(T::V, T::W, T::BA, (1.0, s), o * i)?;
    p.row_norm(o, i)
}

/// PEFT's forward: the norm passes, then `base`, `lora`, `(g − 1)·base`, `g·s·lora`, two
/// adds; y in [`T::Y`].
///
/// # Errors
/// A failure of a pass.
pub fn forward(p: &mut dyn Passes, sh: Shape, s: f32) -> Result<()> {
    let (t, i, o, r) = (sh.t, sh.d_in, sh.d_out, sh.r);
    norm(p, sh, s)?;
    p.gemm((t, o, i), (T::X, false), (T::W, true), T::Base, 0.0)?;
    p.gemm((t, r, i), (T::X, false), (T::A, true), T::U, 0.0)?;
    p.gemm((t, o, r), (T::U, false), (T::B, true), T::Lora, 0.0)?;
    p.scale_cols(T::Tmp, T::Base, (-1.0, 1.0), t, o)?;
    p.scale_cols(T::Tmp2, T::Lora, (0.0, s), t, o)?;
    p.axpby(T::Res, T::Tmp, T::Tmp2, (1.0, 1.0), t * o)?;
    p.axpby(T::Y, T::Base, T::Res, (1.0, 1.0), t * o)
}

/// The backward autograd runs for PEFT's graph (norm detached), after [`forward`]: grad_x,
/// grad_A, grad_B and grad_m in [`T::GradX`], [`T::GradA`], [`T::GradB`], [`T::GradM`].
///
/// # Errors
/// A failure of a pass.
pub fn backward(p: &mut dyn Passes, sh: Shape, s: f32) -> Result<()> {
    let (t, i, o, r) = (sh.t, sh.d_in, sh.d_out, sh.r);
    // d(base) = dy + (g − 1)·dy; d(lora) = g·s·dy; dm = Σ_t dy⊙(base + s·lora) / n.
    p.scale_cols(T::Tmp, T::Dy, (-1.0, 1.0), t, o)?;
    p.axpby(T::Res, T::Dy, T::Tmp, (1.0, 1.0), t * o)?;
    p.scale_cols(T::DLora, T::Dy, (0.0, s), t, o)?;
    p.axpby(T::Tmp2, T::Base, T::Lora, (1.0, s), t * o)?;
    p.col_dot(T::GradM, T::Dy, T::Tmp2, t, o)?;
    // dx = d(base)·W0 + (d(lora)·B)·A; dB = d(lora)ᵀ·U; dA = (d(lora)·B)ᵀ·x.
    p.gemm((t, i, o), (T::Res, false), (T::W, false), T::GradX, 0.0)?;
    p.gemm((t, r, o), (T::DLora, false), (T::B, false), T::DU, 0.0)?;
    p.gemm((t, i, r), (T::DU, false), (T::A, false), T::GradX, 1.0)?;
    p.gemm((o, r, t), (T::DLora, true), (T::U, false), T::GradB, 0.0)?;
    p.gemm((r, i, t), (T::DU, true), (T::X, false), T::GradA, 0.0)
}

/// The frozen base layer alone, the floor of every row: `y = x·W0ᵀ` into [`T::Y`] for the
/// forward, `grad_x = dy·W0` into [`T::GradX`] for the backward (its weight is frozen), both
/// for `forward_backward`.
///
/// # Errors
/// A failure of the GEMM.
pub fn base(p: &mut dyn Passes, sh: Shape, op: Op) -> Result<()> {
    let (t, i, o) = (sh.t, sh.d_in, sh.d_out);
    if op != Op::Backward {
        p.gemm((t, o, i), (T::X, false), (T::W, true), T::Y, 0.0)?;
    }
    if op != Op::Forward {
        p.gemm((t, i, o), (T::Dy, false), (T::W, false), T::GradX, 0.0)?;
    }
    Ok(())
}

/// One timed call of a row built from passes: the base layer ([`base`], with `is_base`), or
/// PEFT's graph for `op` ([`norm`]; [`forward`]; else [`forward`] then [`backward`]).
/// Returns the tensors the call outputs, as a layer call would return them.
///
/// # Errors
/// A failure of a pass.
pub fn row(p: &mut dyn Passes, sh: Shape, s: f32, is_base: bool, op: Op) -> Result<&'static [T]> {
    Ok(match (is_base, op) {
        (true, Op::Forward) => base(p, sh, op).map(|_| &[T::Y][..])?,
        (true, Op::Backward) => base(p, sh, op).map(|_| &[T::GradX][..])?,
        (true, _) => base(p, sh, op).map(|_| &[T::Y, T::GradX][..])?,
        (false, Op::Norm) => norm(p, sh, s).map(|_| &[][..])?,
        (false, Op::Forward) => forward(p, sh, s).map(|_| &[T::Y][..])?,
        (false, _) => {
            forward(p, sh, s)?;
            backward(p, sh, s)?;
            &[T::Y, T::GradX, T::GradA, T::GradB, T::GradM]
        }
    })
}

/// Bytes PEFT's graph allocates beyond its inputs and outputs for `op`, with `e` bytes per
/// element of the working dtype: `B·A` and `V`, n and g; the forward's U and four `[T, O]`
/// temporaries; the backward's d(lora) and dU.
pub fn extra_bytes(op: Op, s: Shape, e: usize) -> u64 {
    let norm = 2 * s.d_out * s.d_in * e + 8 * s.d_out;
    let fwd = norm + s.t * s.r * e + 4 * s.t * s.d_out * e;
    let bwd = s.t * s.d_out * e + s.t * s.r * e;
    (match op {
        Op::Norm => norm,
        Op::ForwardBackward | Op::Backward => fwd + bwd,
        _ => fwd,
    }) as u64
}
