//! The CPU function of each fused kernel that works below the layer, named as its family in
//! `kernels/kernels.list` (`dora_shrink_*` is [`shrink`], `dora_bwd_dz_*` is [`bwd_dz`], and
//! so on): float64 over row-major slices, the oracle that tests/kernels/per_kernel.rs holds
//! every entry point to, one kernel at a time. The layer-level kernels have theirs beside the
//! layer: `dora_norm_*` is [`super::norm`], `dora_merged_weight*` is
//! [`super::merged_weight`]; the multi-adapter pair (`dora_multi_shrink`, `dora_multi_expand`)
//! has [`multi_shrink`] and [`multi_expand`] here, and the layer-level [`super::multi::forward`].
//!
//! Each function states the kernel's formula (from the kernel's comment in kernels/*.cu) and
//! nothing about how the kernel tiles it: splits, partials and tiles are the test's business.
//! Shapes are given as `(rows, cols, ...)` tuples; every slice must hold exactly that many
//! elements (checked with `assert_eq!`: these are test oracles, not a public data path).

/// `dora_shrink`: `U[t, i] = Σ_k x[t, k]·a[i, k]`, i.e. `U = x·Aᵀ`
/// (kernels/forward.cu). `x` is `[rows, d_in]`, `a` is `[r, d_in]`; returns `[rows, r]`.
pub fn shrink(x: &[f64], a: &[f64], (rows, d_in, r): (usize, usize, usize)) -> Vec<f64> {
    assert_eq!((x.len(), a.len()), (rows * d_in, r * d_in), "shrink shapes");
    let mut u = vec![0.0; rows * r];
    for t in 0..rows {
        let xr = &x[t * d_in..(t + 1) * d_in];
        for i in 0..r {
            let ar = &a[i * d_in..(i + 1) * d_in];
            u[t * r + i] = xr.iter().zip(ar).map(|(p, q)| p * q).sum();
        }
    }
    u
}

/// `dora_compose`: `y[t, j] = g[j]·(base[t, j] + s·Σ_i U[t, i]·bm[j, i]) + bias[j]`, i.e.
/// `y = g ⊙ (base + s·U·Bᵀ) + b` (kernels/forward.cu; DoRA paper eq. 5 with the base product
/// supplied). `base` is `[t, d_out]`, `u` is `[t, r]`, `bm` is `[d_out, r]`, `g` and `bias`
/// are `[d_out]` (`None`: g = 1, no bias); returns `[t, d_out]`.
pub fn compose(
    base: &[f64],
    u: &[f64],
    bm: &[f64],
    g: Option<&[f64]>,
    bias: Option<&[f64]>,
    s: f64,
    (t, d_out, r): (usize, usize, usize),
) -> Vec<f64> {
    assert_eq!(
        (base.len(), u.len(), bm.len()),
        (t * d_out, t * r, d_out * r),
        "compose shapes"
    );
    let mut y = vec![0.0; t * d_out];
    for tt in 0..t {
        for j in 0..d_out {
            let lr: f64 = (0..r).map(|i| u[tt * r + i] * bm[j * r + i]).sum();
            let z = base[tt * d_out + j] + s * lr;
            y[tt * d_out + j] = g.map_or(1.0, |g| g[j]) * z + bias.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// What [`bwd_dz`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct BwdDz {
    /// `dz = dy ⊙ g` `[t, d_out]` (DoRA; empty for plain LoRA, where dz is dy itself).
    pub dz: Vec<f64>,
    /// `c[j] = Σ_t dy[t, j]·z[t, j]` with `z = base + s·U·Bᵀ` `[d_out]`: dL/dg (DoRA; empty
    /// for plain LoRA). The kernel writes it as per-block partials that sum to this.
    pub c: Vec<f64>,
    /// `dz·B` `[t, r]`.
    pub dzb: Vec<f64>,
}

/// `dora_bwd_dz`: the one pass over dy of the backward (kernels/backward.cu, docs/design.md
/// §1): `dz = dy ⊙ g`, `c = Σ_t dy ⊙ (base + s·U·Bᵀ)` and `dz·B`. `dy`, `base` are
/// `[t, d_out]`, `u` is `[t, r]`, `b` is `[d_out, r]`; `dora = Some((base, g))` for DoRA,
/// `None` for plain LoRA (then dz = dy and only `dzb` is computed).
pub fn bwd_dz(
    dy: &[f64],
    u: &[f64],
    b: &[f64],
    dora: Option<(&[f64], &[f64])>,
    s: f64,
    (t, d_out, r): (usize, usize, usize),
) -> BwdDz {
    assert_eq!((dy.len(), b.len()), (t * d_out, d_out * r), "bwd_dz shapes");
    let (dz, c) = match dora {
        Some((base, g)) => {
            let z = compose(base, u, b, None, None, s, (t, d_out, r));
            let dz = (0..t * d_out).map(|e| dy[e] * g[e % d_out]).collect();
            let c = (0..d_out)
                .map(|j| {
                    (0..t)
                        .map(|tt| dy[tt * d_out + j] * z[tt * d_out + j])
                        .sum()
                })
                .collect();
            (dz, c)
        }
        None => (Vec::new(), Vec::new()),
    };
    let dzv = if dora.is_some() { &dz[..] } else { dy };
    let dzb = (0..t * r)
        .map(|e| {
            let (tt, i) = (e / r, e % r);
            (0..d_out).map(|j| dzv[tt * d_out + j] * b[j * r + i]).sum()
        })
        .collect();
    BwdDz { dz, c, dzb }
}

/// `dora_mag_reduce_f32`: `grad_m = c / max(n, ε)` and, for the exact gradient,
/// `kcoef = −s·m⊙c/n³` (0 where `n < ε`) (kernels/backward.cu, docs/design.md §1). All
/// `[d_out]`; returns `(grad_m, kcoef)`.
pub fn mag_reduce(c: &[f64], n: &[f64], m: &[f64], s: f64, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let dm = c.iter().zip(n).map(|(c, n)| c / n.max(eps)).collect();
    let k = (c.iter().zip(n).zip(m))
        .map(|((c, &n), m)| {
            if n < eps {
                0.0
            } else {
                -s * m * c / (n * n * n)
            }
        })
        .collect();
    (dm, k)
}

/// `dora_tn_r16` / `dora_tn_r64`: the long-reduction product `out[i, k] = Σ_t L[t, i]·R[t, k]`,
/// i.e. `Lᵀ·R` (kernels/backward.cu). `l` is `[rows, r]`, `rm` is `[rows, ncols]`; returns
/// `[r, ncols]`.
pub fn tn(l: &[f64], rm: &[f64], (rows, r, ncols): (usize, usize, usize)) -> Vec<f64> {
    assert_eq!((l.len(), rm.len()), (rows * r, rows * ncols), "tn shapes");
    let mut out = vec![0.0; r * ncols];
    for t in 0..rows {
        for i in 0..r {
            let li = l[t * r + i];
            let row = &rm[t * ncols..(t + 1) * ncols];
            for (o, v) in out[i * ncols..(i + 1) * ncols].iter_mut().zip(row) {
                *o += li * v;
            }
        }
    }
    out
}

/// `dora_sum_partials_f32`: `out[i, k] (+)= alpha·colscale[k]·Σ_split part[split, i, k]`
/// (kernels/backward.cu), written at `[k, i]` when `transpose`. `part` is
/// `[splits, r, ncols]`, `colscale` `[ncols]` (`None`: 1); `out` is `[r, ncols]` (or
/// `[ncols, r]`), added to when `accumulate`, overwritten otherwise.
#[allow(clippy::too_many_arguments)]
pub fn sum_partials(
    part: &[f64],
    (splits, r, ncols): (usize, usize, usize),
    alpha: f64,
    colscale: Option<&[f64]>,
    transpose: bool,
    accumulate: bool,
    out: &mut [f64],
) {
    assert_eq!(
        (part.len(), out.len()),
        (splits * r * ncols, r * ncols),
        "sum_partials shapes"
    );
    for i in 0..r {
        for k in 0..ncols {
            let e = i * ncols + k;
            let sum: f64 = (0..splits).map(|sp| part[sp * r * ncols + e]).sum();
            let v = alpha * colscale.map_or(1.0, |c| c[k]) * sum;
            let o = if transpose { k * r + i } else { e };
            out[o] = if accumulate { out[o] + v } else { v };
        }
    }
}

/// `dora_scale_rows`: `out[j, i] = coef[j]·input[j, i]` (kernels/backward.cu; `kcoef ⊙ B`
/// for the exact gradient). `input` is `[rows, cols]`, `coef` `[rows]`.
pub fn scale_rows(input: &[f64], coef: &[f64], (rows, cols): (usize, usize)) -> Vec<f64> {
    assert_eq!(
        (input.len(), coef.len()),
        (rows * cols, rows),
        "scale_rows shapes"
    );
    (0..rows * cols)
        .map(|e| coef[e / cols] * input[e])
        .collect()
}

/// One slot of the multi-adapter kernels (kernels/multi.cu): adapter `k`'s `A_k` `[r, d_in]`,
/// `B_k` `[d_out, r]`, `g_k` `[d_out]` (`None`: plain LoRA, g = 1) and `s_k`.
#[derive(Debug, Clone, Copy)]
pub struct MultiSlot<'a> {
    /// `A_k` `[r, d_in]`.
    pub a: &'a [f64],
    /// `B_k` `[d_out, r]`.
    pub b: &'a [f64],
    /// `g_k` `[d_out]`, or `None` for plain LoRA.
    pub g: Option<&'a [f64]>,
    /// `s_k`.
    pub scale: f64,
    /// The rank `r_k`.
    pub r: usize,
}

/// The slot token `t` runs on: `None` for `−1` (the base layer only), an index outside the
/// slots, or an empty slot (which the kernels flag in their error word and treat the same).
fn multi_slot<'s, 'a>(
    index: &[i32],
    t: usize,
    slots: &'s [Option<MultiSlot<'a>>],
) -> Option<&'s MultiSlot<'a>> {
    let k = usize::try_from(index[t]).ok()?;
    slots.get(k)?.as_ref()
}

/// `dora_multi_shrink`: `U[t, i] = Σ_c x[t, c]·A_k[i, c]` for token t on slot
/// `k = index[t]`, `i < r_k` (kernels/multi.cu). `x` is `[index.len(), d_in]`; returns each
/// token's row of U (`r_k` values; none for a token without a slot).
pub fn multi_shrink(
    x: &[f64],
    index: &[i32],
    slots: &[Option<MultiSlot<'_>>],
    d_in: usize,
) -> Vec<Vec<f64>> {
    assert_eq!(x.len(), index.len() * d_in, "multi_shrink shapes");
    (0..index.len())
        .map(|t| match multi_slot(index, t, slots) {
            Some(s) => shrink(&x[t * d_in..(t + 1) * d_in], s.a, (1, d_in, s.r)),
            None => Vec::new(),
        })
        .collect()
}

/// `dora_multi_expand`: `y[t, j] = g_k[j]·(base[t, j] + s_k·Σ_{i<r_k} U[t, i]·B_k[j, i]) +
/// bias[j]` for token t on slot `k = index[t]`, and `base[t, j] + bias[j]` for a token
/// without one (kernels/multi.cu; the multi-adapter form of [`compose`]). `base` is
/// `[index.len(), d_out]`, `u` each token's row of U (as [`multi_shrink`] returns them).
pub fn multi_expand(
    base: &[f64],
    u: &[Vec<f64>],
    index: &[i32],
    slots: &[Option<MultiSlot<'_>>],
    bias: Option<&[f64]>,
    d_out: usize,
) -> Vec<f64> {
    assert_eq!(base.len(), index.len() * d_out, "multi_expand shapes");
    (0..index.len())
        .flat_map(|t| {
            let row = &base[t * d_out..(t + 1) * d_out];
            let y = match multi_slot(index, t, slots) {
                Some(s) => compose(row, &u[t], s.b, s.g, None, s.scale, (1, d_out, s.r)),
                None => row.to_vec(),
            };
            (y.into_iter().enumerate()).map(move |(j, v)| v + bias.map_or(0.0, |b| b[j]))
        })
        .collect()
}
