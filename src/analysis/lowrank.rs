//! Low-rank linear algebra for `resize` and `export-lora`, in f64, on faer's QR and SVD.
//!
//! - [`update_svd`]: the SVD of a LoRA update `s·B·A` from its factors alone: thin QR of
//!   `B [d_out, r]` and of `Aᵀ [d_in, r]`, then the SVD of the small core
//!   `s·R_B·R_Aᵀ` (at most r × r). `d_out × d_in` is never formed.
//! - [`randomized_svd`]: the range finder with power iterations of Halko, Martinsson and
//!   Tropp, "Finding structure with randomness" (SIAM Review 53(2), 2011), Algorithms 4.4
//!   and 5.1, over any matrix that can only be multiplied ([`LinearOp`]).
//! - [`choose_rank`], [`energy_kept`]: rank selection by a fixed rank or by a fraction of the
//!   Frobenius energy `Σ σ_i²`.

use anyhow::{bail, ensure, Result};
use faer::{Mat, MatRef};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// How many singular directions to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankTarget {
    /// Exactly this rank (at least 1, at most the module's size).
    Rank(usize),
    /// The smallest rank whose singular values hold at least this fraction (in (0, 1]) of the
    /// squared Frobenius norm.
    Energy(f64),
}

impl RankTarget {
    /// Builds the target from the two mutually exclusive command-line options.
    ///
    /// # Errors
    /// Neither or both given, rank 0, or an energy outside (0, 1] (NaN included).
    pub fn from_options(rank: Option<usize>, energy: Option<f64>) -> Result<Self> {
        match (rank, energy) {
            (Some(_), Some(_)) => bail!("give either --rank or --energy, not both"),
            (None, None) => bail!("give --rank R or --energy E"),
            (Some(0), None) => bail!("--rank is 0: the rank must be at least 1"),
            (Some(r), None) => Ok(Self::Rank(r)),
            (None, Some(e)) => {
                ensure!(
                    e > 0.0 && e <= 1.0,
                    "--energy is {e}: it must be a fraction in (0, 1]"
                );
                Ok(Self::Energy(e))
            }
        }
    }
}

/// A rank-t factorisation `U·diag(σ)·Vᵀ` with orthonormal columns and σ non-increasing.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors `[d_out, t]`.
    pub u: Mat<f64>,
    /// Singular values, non-increasing, all ≥ 0.
    pub sigma: Vec<f64>,
    /// Right singular vectors `[d_in, t]`.
    pub v: Mat<f64>,
}

/// A row-major `rows × cols` f64 slice as a faer matrix.
pub fn mat_from_rows(data: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    debug_assert_eq!(data.len(), rows * cols);
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j])
}

/// A faer matrix as a row-major f64 vector.
pub fn mat_to_rows(m: MatRef<'_, f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m.read(i, j));
        }
    }
    out
}

/// Orders an SVD by non-increasing singular value (faer's order is not part of its contract).
fn sorted(u: MatRef<'_, f64>, sigma: Vec<f64>, v: MatRef<'_, f64>) -> Svd {
    let mut idx: Vec<usize> = (0..sigma.len()).collect();
    idx.sort_by(|&a, &b| sigma[b].total_cmp(&sigma[a]));
    Svd {
        u: Mat::from_fn(u.nrows(), idx.len(), |i, k| u.read(i, idx[k])),
        sigma: idx.iter().map(|&k| sigma[k].max(0.0)).collect(),
        v: Mat::from_fn(v.nrows(), idx.len(), |i, k| v.read(i, idx[k])),
    }
}

/// The thin SVD of a dense (small) matrix.
fn thin_svd(m: MatRef<'_, f64>) -> Svd {
    let svd = m.thin_svd();
    let s = svd.s_diagonal();
    let sigma: Vec<f64> = (0..s.nrows()).map(|i| s.read(i)).collect();
    sorted(svd.u(), sigma, svd.v())
}

/// The orthonormal factor Q of a thin QR decomposition.
fn thin_q(m: MatRef<'_, f64>) -> Mat<f64> {
    m.qr().compute_thin_q()
}

/// The SVD of `s·B·A` from the factors: `B = Q_B·R_B`, `Aᵀ = Q_A·R_A`, then
/// `s·B·A = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ` and the SVD of the core `s·R_B·R_Aᵀ` (at most r × r)
/// gives `U = Q_B·U_c`, `V = Q_A·V_c`. Costs O((d_out + d_in)·r²); `d_out × d_in` is never
/// formed.
///
/// `b` is B `[d_out, r]` and `a` is A `[r, d_in]`, both row-major. The result has
/// t = min(d_out, d_in, r) singular triplets.
pub fn update_svd(b: &[f64], a: &[f64], d_out: usize, d_in: usize, r: usize, s: f64) -> Svd {
    let bm = mat_from_rows(b, d_out, r);
    let at = Mat::from_fn(d_in, r, |i, k| a[k * d_in + i]);
    let qr_b = bm.qr();
    let qr_a = at.qr();
    let (qb, rb) = (qr_b.compute_thin_q(), qr_b.compute_thin_r());
    let (qa, ra) = (qr_a.compute_thin_q(), qr_a.compute_thin_r());
    let core = (&rb * ra.transpose()) * faer::scale(s);
    let c = thin_svd(core.as_ref());
    Svd {
        u: &qb * &c.u,
        sigma: c.sigma,
        v: &qa * &c.v,
    }
}

/// `‖P·Q‖_F` for `P [d_out, n]` and `Q [n, d_in]` (row-major) from two thin QRs, without
/// forming the product and without the cancellation of a Gram-matrix formula.
pub fn product_fro(p: &[f64], q: &[f64], d_out: usize, d_in: usize, n: usize) -> f64 {
    let pm = mat_from_rows(p, d_out, n);
    let qt = Mat::from_fn(d_in, n, |i, k| q[k * d_in + i]);
    let rp = pm.qr().compute_thin_r();
    let rq = qt.qr().compute_thin_r();
    (&rp * rq.transpose()).norm_l2()
}

/// The fraction of `Σ σ_i²` held by the first `k` singular values (1 when all are zero).
pub fn energy_kept(sigma: &[f64], k: usize) -> f64 {
    let total: f64 = sigma.iter().map(|x| x * x).sum();
    if total == 0.0 {
        return 1.0;
    }
    let kept: f64 = sigma.iter().take(k).map(|x| x * x).sum();
    (kept / total).min(1.0)
}

/// The smallest k ≥ 1 whose leading singular values hold at least `energy` of `total`
/// (`total` = ‖M‖_F², which may exceed `Σ σ_i²` when `sigma` is a partial spectrum).
/// `None` when even all of `sigma` falls short.
pub fn rank_for_energy(sigma: &[f64], total: f64, energy: f64) -> Option<usize> {
    if total <= 0.0 {
        return Some(1);
    }
    let want = energy * total;
    let mut acc = 0.0;
    for (i, s) in sigma.iter().enumerate() {
        acc += s * s;
        if acc >= want {
            return Some(i + 1);
        }
    }
    None
}

/// The rank a module gets: `Rank(R)` checked against `max_rank`, or the smallest rank
/// keeping the energy fraction of `sigma` (the full spectrum of the module's update; when
/// the energy is never reached because of rounding, all of it).
///
/// # Errors
/// `Rank(R)` with R above `max_rank`; `what` names the module and its size in the message.
pub fn choose_rank(
    target: RankTarget,
    sigma: &[f64],
    max_rank: usize,
    what: &str,
) -> Result<usize> {
    match target {
        RankTarget::Rank(r) => {
            ensure!(r >= 1, "{what}: rank 0: the rank must be at least 1");
            ensure!(
                r <= max_rank,
                "{what}: rank {r} is above the module's size ({max_rank})"
            );
            Ok(r)
        }
        RankTarget::Energy(e) => {
            let total: f64 = sigma.iter().map(|x| x * x).sum();
            Ok(rank_for_energy(sigma, total, e)
                .unwrap_or(sigma.len())
                .clamp(1, max_rank))
        }
    }
}

/// Splits the leading `k` triplets of an SVD into PEFT factors for the scaling `s_new`:
/// `B' [d_out, k]` and `A' [k, d_in]` (row-major) with `s_new·B'·A' = U_k·diag(σ_k)·V_kᵀ`,
/// the singular values shared evenly (`√(σ/|s_new|)` on each side). Directions beyond the
/// SVD's length (a module whose update has rank below k) are zero columns/rows.
pub fn split_factors(svd: &Svd, k: usize, s_new: f64) -> (Vec<f64>, Vec<f64>) {
    let (d_out, d_in) = (svd.u.nrows(), svd.v.nrows());
    let t = svd.sigma.len();
    let sign = if s_new < 0.0 { -1.0 } else { 1.0 };
    let c: Vec<f64> = (0..k)
        .map(|i| {
            if i < t && s_new != 0.0 {
                (svd.sigma[i] / s_new.abs()).sqrt()
            } else {
                0.0
            }
        })
        .collect();
    let mut b = vec![0f64; d_out * k];
    let mut a = vec![0f64; k * d_in];
    for i in 0..k.min(t) {
        for j in 0..d_out {
            b[j * k + i] = sign * c[i] * svd.u.read(j, i);
        }
        for (x, out) in a[i * d_in..(i + 1) * d_in].iter_mut().enumerate() {
            *out = c[i] * svd.v.read(x, i);
        }
    }
    (b, a)
}

/// A `d_out × d_in` matrix known only through products (for [`randomized_svd`]).
pub trait LinearOp {
    /// `(d_out, d_in)`.
    fn dims(&self) -> (usize, usize);
    /// `M·X` for `X [d_in, l]`, giving `[d_out, l]`.
    ///
    /// # Errors
    /// A failure reading the matrix (a base tensor).
    fn mul(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>>;
    /// `Mᵀ·Y` for `Y [d_out, l]`, giving `[d_in, l]`.
    ///
    /// # Errors
    /// A failure reading the matrix (a base tensor).
    fn mul_t(&self, y: MatRef<'_, f64>) -> Result<Mat<f64>>;
}

/// A seeded `rows × cols` matrix of standard normal entries.
pub fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut m = Mat::zeros(rows, cols);
    for j in 0..cols {
        for i in 0..rows {
            m.write(i, j, StandardNormal.sample(&mut rng));
        }
    }
    m
}

/// A rank-`l` randomized SVD of `op` (Halko et al. 2011, Algorithm 4.4 with `power`
/// subspace iterations, each re-orthonormalised by QR, then Algorithm 5.1): Ω `[d_in, l]`
/// Gaussian from `seed`, `Q = orth(M·Ω)`, `power` times `Q = orth(M·orth(Mᵀ·Q))`, then the
/// SVD of the small `Qᵀ·M` (computed as `(Mᵀ·Q)ᵀ`). Reads M `2·power + 2` times.
///
/// When `l = min(d_out, d_in)`, Q spans the whole column space and the result is the exact
/// SVD up to rounding.
///
/// # Errors
/// `l` is 0 or above `min(d_out, d_in)`, or a product fails.
pub fn randomized_svd(op: &dyn LinearOp, l: usize, power: usize, seed: u64) -> Result<Svd> {
    let (d_out, d_in) = op.dims();
    ensure!(
        l >= 1 && l <= d_out.min(d_in),
        "randomized SVD: sketch size {l} outside 1..={}",
        d_out.min(d_in)
    );
    let omega = gaussian(d_in, l, seed);
    let mut q = thin_q(op.mul(omega.as_ref())?.as_ref());
    for _ in 0..power {
        let z = thin_q(op.mul_t(q.as_ref())?.as_ref());
        q = thin_q(op.mul(z.as_ref())?.as_ref());
    }
    // Bᵀ = Mᵀ·Q [d_in, l] = U_b·S·V_bᵀ, so Qᵀ·M = V_b·S·U_bᵀ and M ≈ (Q·V_b)·S·U_bᵀ.
    let bt = op.mul_t(q.as_ref())?;
    let s = thin_svd(bt.as_ref());
    Ok(Svd {
        u: &q * &s.v,
        sigma: s.sigma,
        v: s.u,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dense(Mat<f64>);
    impl LinearOp for Dense {
        fn dims(&self) -> (usize, usize) {
            (self.0.nrows(), self.0.ncols())
        }
        fn mul(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
            Ok(&self.0 * x)
        }
        fn mul_t(&self, y: MatRef<'_, f64>) -> Result<Mat<f64>> {
            Ok(self.0.transpose() * y)
        }
    }

    fn rows(m: &Mat<f64>) -> Vec<f64> {
        mat_to_rows(m.as_ref())
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        crate::tensor::rel_l2(a, b)
    }

    #[test]
    fn update_svd_rebuilds_the_product_and_matches_a_dense_svd() {
        let (d_out, d_in, r, s) = (37, 53, 6, -1.75);
        let b = rows(&gaussian(d_out, r, 1));
        let a = rows(&gaussian(r, d_in, 2));
        let dense = &mat_from_rows(&b, d_out, r) * &mat_from_rows(&a, r, d_in) * faer::scale(s);
        let svd = update_svd(&b, &a, d_out, d_in, r, s);
        assert_eq!(svd.sigma.len(), r);
        let want = thin_svd(dense.as_ref());
        for (x, y) in svd.sigma.iter().zip(&want.sigma) {
            assert!((x - y).abs() <= 1e-12 * want.sigma[0], "{x} vs {y}");
        }
        for s_new in [0.5, -2.0] {
            let (b2, a2) = split_factors(&svd, r, s_new);
            let back =
                &mat_from_rows(&b2, d_out, r) * &mat_from_rows(&a2, r, d_in) * faer::scale(s_new);
            assert!(rel(&rows(&back), &rows(&dense)) < 1e-13);
        }
        // Truncation: the residual is the dropped energy.
        let (b2, a2) = split_factors(&svd, 2, 1.0);
        let back = &mat_from_rows(&b2, d_out, 2) * &mat_from_rows(&a2, 2, d_in);
        let diff = rel(&rows(&back), &rows(&dense));
        assert!((diff * diff - (1.0 - energy_kept(&svd.sigma, 2))).abs() < 1e-12);
    }

    #[test]
    fn rank_deficient_and_wide_factors_pad_with_zeros() {
        // d_out below r: the update has rank d_out.
        let (d_out, d_in, r) = (3, 20, 5);
        let b = rows(&gaussian(d_out, r, 3));
        let a = rows(&gaussian(r, d_in, 4));
        let svd = update_svd(&b, &a, d_out, d_in, r, 1.0);
        assert_eq!(svd.sigma.len(), 3);
        let (b2, a2) = split_factors(&svd, r, 1.0);
        let back = &mat_from_rows(&b2, d_out, r) * &mat_from_rows(&a2, r, d_in);
        let dense = &mat_from_rows(&b, d_out, r) * &mat_from_rows(&a, r, d_in);
        assert!(rel(&rows(&back), &rows(&dense)) < 1e-13);
        assert!(b2.iter().skip(3).step_by(r).all(|&x| x == 0.0));
    }

    #[test]
    fn product_fro_is_exact() {
        let p = rows(&gaussian(30, 4, 5));
        let q = rows(&gaussian(4, 25, 6));
        let dense = &mat_from_rows(&p, 30, 4) * &mat_from_rows(&q, 4, 25);
        assert!((product_fro(&p, &q, 30, 25, 4) - dense.norm_l2()).abs() < 1e-12);
    }

    #[test]
    fn randomized_svd_is_exact_at_full_size() {
        let m = gaussian(40, 29, 7);
        let op = Dense(m.clone());
        let exact = thin_svd(m.as_ref());
        let full = randomized_svd(&op, 29, 1, 9).unwrap();
        for (x, y) in full.sigma.iter().zip(&exact.sigma) {
            assert!((x - y).abs() < 1e-12 * exact.sigma[0]);
        }
        let rebuilt = &full.u
            * Mat::from_fn(29, 29, |i, j| if i == j { full.sigma[i] } else { 0.0 })
            * full.v.transpose();
        assert!(rel(&rows(&rebuilt), &rows(&m)) < 1e-13);
        assert!(randomized_svd(&op, 30, 1, 9).is_err());
        assert!(randomized_svd(&op, 0, 1, 9).is_err());
    }

    #[test]
    fn rank_choice() {
        let sigma = [3.0, 2.0, 1.0, 0.0];
        assert_eq!(
            choose_rank(RankTarget::Energy(1.0), &sigma, 4, "m").unwrap(),
            3
        );
        assert_eq!(
            choose_rank(RankTarget::Energy(9.0 / 14.0), &sigma, 4, "m").unwrap(),
            1
        );
        assert_eq!(
            choose_rank(RankTarget::Energy(0.65), &sigma, 4, "m").unwrap(),
            2
        );
        assert_eq!(
            choose_rank(RankTarget::Energy(0.5), &[0.0; 3], 3, "m").unwrap(),
            1
        );
        let e = choose_rank(RankTarget::Rank(5), &sigma, 4, "q").unwrap_err();
        assert_eq!(e.to_string(), "q: rank 5 is above the module's size (4)");
        assert!(RankTarget::from_options(Some(0), None).is_err());
        assert!(RankTarget::from_options(None, Some(0.0)).is_err());
        assert!(RankTarget::from_options(None, Some(1.5)).is_err());
        assert!(RankTarget::from_options(None, Some(f64::NAN)).is_err());
        assert!(RankTarget::from_options(None, None).is_err());
        assert_eq!(
            RankTarget::from_options(None, Some(1.0)).unwrap(),
            RankTarget::Energy(1.0)
        );
    }
}
