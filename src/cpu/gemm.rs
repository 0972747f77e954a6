//! Safe strided matrix views over slices, and the one place that calls the GEMM crates (the
//! CPU path, the emulator's `Backend::gemm` and the CPU benchmark all multiply here):
//! `matrixmultiply` for products of many rows, the `gemm` crate for decode-sized ones (at
//! most [`SMALL_M`] rows against a large operand), where it reads the large operand once
//! without packing it.
//!
//! Every product of the CPU path goes through [`gemm`]: transposes and the `fan_in_fan_out`
//! weight layout are expressed as strides, so nothing is copied to transpose it.

/// A read-only `rows × cols` matrix inside `data`: element `(i, j)` is
/// `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols, 1)
    }

    /// A matrix with arbitrary non-negative strides.
    ///
    /// # Panics
    /// When an element of the view would lie outside `data`.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * rs + (cols - 1) * cs;
            assert!(
                last < data.len(),
                "matrix view {rows}x{cols} (strides {rs},{cs}) overruns a slice of {}",
                data.len()
            );
        }
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl<T: Copy> View<'_, T> {
    /// Element `(i, j)`.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> T {
        debug_assert!(i < self.rows && j < self.cols);
        self.data[i * self.rs + j * self.cs]
    }
}

/// A writable `rows × cols` matrix with unit column stride and row stride `rs ≥ cols`, so no
/// two elements alias (what `matrixmultiply` requires of C).
#[derive(Debug)]
pub struct ViewMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a, T> ViewMut<'a, T> {
    /// A contiguous row-major matrix.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Columns `0..cols` of rows `0..rows` of a matrix whose rows are `rs` apart.
    ///
    /// # Panics
    /// When `rs < cols` (elements would alias) or the view overruns `data`.
    pub fn strided(data: &'a mut [T], rows: usize, cols: usize, rs: usize) -> Self {
        assert!(rs >= cols || rows <= 1, "row stride {rs} < {cols} columns");
        if rows > 0 && cols > 0 {
            assert!(
                (rows - 1) * rs + cols <= data.len(),
                "matrix view {rows}x{cols} (row stride {rs}) overruns a slice of {}",
                data.len()
            );
        }
        Self {
            data,
            rows,
            cols,
            rs,
        }
    }
}

/// Products with at most this many rows (and `k`, `n` ≥ [`SMALL_MIN_KN`]) go to the `gemm`
/// crate.
pub const SMALL_M: usize = 32;
/// See [`SMALL_M`]. Far above the ranks of the merge's rank-r updates, so those always take
/// `matrixmultiply`.
pub const SMALL_MIN_KN: usize = 512;
/// Below this many multiply-adds a `gemm`-crate product runs on the calling thread.
const SMALL_PAR_MIN: usize = 1 << 20;

/// The element types the GEMM crates multiply.
pub trait Scalar:
    Copy
    + PartialEq
    + Send
    + Sync
    + 'static
    + std::ops::Mul<Output = Self>
    + std::ops::Add<Output = Self>
{
    /// 1 (β = 1 accumulates into C).
    const ONE: Self;
    /// 0.
    const ZERO: Self;

    /// C ← α·A·B + β·C, straight to `matrixmultiply`.
    ///
    /// # Safety
    /// The pointers with their strides must address valid elements for the given sizes, and
    /// C's elements must not alias each other or A/B.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Scalar for f32 {
    const ONE: f32 = 1.0;
    const ZERO: f32 = 0.0;

    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded verbatim; the caller upholds matrixmultiply's contract.
        unsafe {
            matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

impl Scalar for f64 {
    const ONE: f64 = 1.0;
    const ZERO: f64 = 0.0;

    unsafe fn raw_gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        // SAFETY: forwarded verbatim; the caller upholds matrixmultiply's contract.
        unsafe {
            matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
        }
    }
}

/// C ← α·A·B + β·C with `A [m, k]`, `B [k, n]`, `C [m, n]` (β = 0 ignores C's old contents),
/// accumulated in T. Decode-sized products (at most [`SMALL_M`] rows, `k` and `n` at least
/// [`SMALL_MIN_KN`]) go to the `gemm` crate: a single row split over the cores by B's
/// columns; more rows against a B whose columns are contiguous (x·W0ᵀ) as blocks of those
/// columns on each core; other B by rayon. All others go to `matrixmultiply`, which splits large
/// products over the cores itself (run as `Cᵀ = Bᵀ·Aᵀ` when B is the larger operand of a
/// long product, so that the large operand is packed in parallel).
///
/// # Panics
/// When the shapes disagree.
pub fn gemm<T: Scalar>(alpha: T, a: View<'_, T>, b: View<'_, T>, beta: T, c: ViewMut<'_, T>) {
    let (m, k, n) = shapes(&a, &b, &c);
    if m == 0 || n == 0 {
        return;
    }
    let ok = |s: usize| isize::try_from(s).expect("stride fits isize");
    if m <= SMALL_M && k >= SMALL_MIN_KN && n >= SMALL_MIN_KN {
        if m * k * n < SMALL_PAR_MIN {
            gemm_crate(alpha, a, b, beta, c, ::gemm::Parallelism::None);
        } else if m == 1 {
            row_times_matrix(alpha, a, b, beta, c, super::threads());
        } else if b.rs == 1 {
            rows_times_transposed(alpha, a, b, beta, c, super::threads());
        } else {
            gemm_crate(alpha, a, b, beta, c, ::gemm::Parallelism::Rayon(0));
        }
        return;
    }
    // matrixmultiply packs B on the calling thread and A on each thread of its pool, so
    // when B is the larger operand of a long product (n > m, k ≥ SMALL_MIN_KN: x·W0ᵀ and
    // dz·W0 for T < d) it runs as Cᵀ = Bᵀ·Aᵀ, C written through transposed strides.
    // Measured on T = 256 by 4096 × 4096 f32 (2 cores): x·W0ᵀ 61.4 → 50.2 ms, dz·W0
    // 54.2 → 45.9 ms, the outputs bit-identical (each element's sum over k runs in the same
    // order either way). Short products (the merge's rank-r updates) keep C row-major: they
    // are bound by C's traffic, not by packing.
    let (m, n, a, b, rsc, csc) = if n > m && k >= SMALL_MIN_KN {
        (n, m, b.t(), a.t(), 1, c.rs)
    } else {
        (m, n, a, b, c.rs, 1)
    };
    // SAFETY: every view was bounds-checked at construction (the last element it addresses
    // lies inside its slice, strides are non-negative), so all m·k, k·n and m·n elements are
    // valid (transposing a view and C's strides addresses the same elements); C is borrowed
    // mutably, hence disjoint from A and B, and no two of its elements alias in either
    // orientation: its columns are 1 apart and its rows `rs` ≥ its column count apart
    // (ViewMut allows a smaller `rs` only for a single row, whose stride is never used).
    unsafe {
        T::raw_gemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            ok(a.rs),
            ok(a.cs),
            b.data.as_ptr(),
            ok(b.rs),
            ok(b.cs),
            beta,
            c.data.as_mut_ptr(),
            ok(rsc),
            ok(csc),
        )
    }
}

/// C ← α·A·B + β·C as [`gemm`], always by the `gemm` crate on the calling thread, whatever
/// the sizes: for products inside a pass that already runs one thread per core (neither
/// crate's own threads are woken, so the pass's threads never queue on a pool).
///
/// # Panics
/// When the shapes disagree.
pub fn gemm_on_this_thread<T: Scalar>(
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
    beta: T,
    c: ViewMut<'_, T>,
) {
    shapes(&a, &b, &c);
    gemm_crate(alpha, a, b, beta, c, ::gemm::Parallelism::None);
}

/// C ← α·A·B + β·C for a single row A `[1, k]`: B's columns split into `nt` contiguous
/// ranges (one per core; threads spawned per call, so a caller already running one thread
/// per core should use [`gemm_on_this_thread`]), each range a `gemm`-crate product on its
/// own thread. The crate's matrix-vector kernel runs on one thread whatever `Parallelism`
/// says, and one core does not saturate memory bandwidth: measured on 4096 × 4096 f32
/// (2 cores), x·W0ᵀ took 3.9 ms through rayon and 2.4–3.0 ms split here (64 MiB at
/// 22–28 GB/s).
fn row_times_matrix<T: Scalar>(
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
    beta: T,
    c: ViewMut<'_, T>,
    nt: usize,
) {
    let n = b.cols;
    let nt = nt.clamp(1, n.max(1));
    // Column ranges on multiples of 64 (whole cache lines of C and of a row-major B).
    let per = n.div_ceil(nt).div_ceil(64) * 64;
    let part = |c0: usize, cn: &mut [T]| {
        let w = cn.len();
        // Columns c0..c0 + w of B: the same strides, the data from column c0 on.
        let bv = View::strided(&b.data[c0 * b.cs..], b.rows, w, b.rs, b.cs);
        gemm_crate(
            alpha,
            a,
            bv,
            beta,
            ViewMut::new(cn, 1, w),
            ::gemm::Parallelism::None,
        );
    };
    super::on_threads(c.data[..n].chunks_mut(per).enumerate(), |(i, cn)| {
        part(i * per, cn)
    });
}

/// C ← α·A·B + β·C for a few rows `A [m, k]` and a B whose columns are contiguous (B = Wᵀ
/// for a row-major `W [n, k]`: x·W0ᵀ). W's rows are split into `nt` ranges (one per core,
/// at least 16 rows each), each walked on its own thread in blocks of about
/// [`super::W0_BLOCK_ELEMS`] elements: `W_blk·Aᵀ` by the `gemm` crate while the block is in
/// cache, so W is read once, unpacked, with both cores busy. The blocks' `[rows, m]`
/// results are then written into C's columns. Measured on 4096 × 4096 f32 (2 cores):
/// m = 2, 8, 16, 32 took 10.3, 8.7, 9.8, 12.4 ms as one rayon-split `gemm`-crate product and
/// 3.2, 3.1, 3.6, 6.3 ms here.
fn rows_times_transposed<T: Scalar>(
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
    beta: T,
    c: ViewMut<'_, T>,
    nt: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let nt = nt.clamp(1, n.div_ceil(16).max(1));
    let per = n.div_ceil(nt);
    let br = (super::W0_BLOCK_ELEMS / k.max(1)).clamp(16, 1024);
    // Rows j0..j0 + t.len()/m of W = Bᵀ times Aᵀ into t `[rows, m]`.
    let part = |j0: usize, t: &mut [T]| {
        let j1 = j0 + t.len() / m;
        let mut j = j0;
        while j < j1 {
            let nb = br.min(j1 - j);
            let blk = View::strided(&b.data[j * b.cs..], nb, k, b.cs, b.rs);
            let o = (j - j0) * m;
            gemm_crate(
                alpha,
                blk,
                a.t(),
                T::ZERO,
                ViewMut::new(&mut t[o..o + nb * m], nb, m),
                ::gemm::Parallelism::None,
            );
            j += nb;
        }
    };
    let mut wt = vec![T::ZERO; n * m];
    super::on_threads(wt.chunks_mut(per * m).enumerate(), |(i, t)| {
        part(i * per, t)
    });
    for (j, row) in wt.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            let e = &mut c.data[i * c.rs + j];
            // β = 0 ignores C's old contents (a NaN there included).
            *e = if beta == T::ZERO { v } else { v + beta * *e };
        }
    }
}

/// `(m, k, n)` of C ← A·B with `A [m, k]`, `B [k, n]`, `C [m, n]`.
///
/// # Panics
/// When the shapes disagree.
fn shapes<T>(a: &View<'_, T>, b: &View<'_, T>, c: &ViewMut<'_, T>) -> (usize, usize, usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.rows == m && c.cols == n,
        "gemm shapes: A {}x{} · B {}x{} -> C {}x{}",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        c.rows,
        c.cols
    );
    (m, k, n)
}

/// C ← α·A·B + β·C by the `gemm` crate with `par` (shapes checked by the caller).
fn gemm_crate<T: Scalar>(
    alpha: T,
    a: View<'_, T>,
    b: View<'_, T>,
    beta: T,
    c: ViewMut<'_, T>,
    par: ::gemm::Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    let ok = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: every view was bounds-checked at construction (every element of A, B and C
    // lies inside its slice); C is borrowed mutably (disjoint from A and B) with unit column
    // stride and row stride ≥ n (no two elements alias). The `gemm` crate computes
    // dst ← α'·dst + β'·lhs·rhs with dst read only when `read_dst`: here α' = β, β' = α, and
    // C is not read when β = 0 (its old contents are ignored).
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            ok(c.rs),
            beta != T::ZERO,
            a.data.as_ptr(),
            ok(a.cs),
            ok(a.rs),
            b.data.as_ptr(),
            ok(b.cs),
            ok(b.rs),
            beta,
            alpha,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_products_match_loops() {
        // A [3, 5] stored transposed ([5, 3]), B [5, 4] row-major, C written into a wider buffer.
        let at: Vec<f64> = (0..15).map(|v| v as f64 * 0.5 - 3.0).collect();
        let b: Vec<f64> = (0..20).map(|v| (v * v) as f64 * 0.1).collect();
        let a = View::strided(&at, 3, 5, 1, 3);
        let bv = View::new(&b, 5, 4);
        let mut c = vec![7.0f64; 3 * 6];
        gemm(2.0, a, bv, 0.0, ViewMut::strided(&mut c, 3, 4, 6));
        for i in 0..3 {
            for j in 0..4 {
                let want: f64 = (0..5).map(|k| 2.0 * at[k * 3 + i] * b[k * 4 + j]).sum();
                assert!((c[i * 6 + j] - want).abs() < 1e-12, "({i},{j})");
            }
            assert_eq!(&c[i * 6 + 4..i * 6 + 6], &[7.0, 7.0], "padding untouched");
        }
        assert_eq!(a.t().at(4, 2), at[4 * 3 + 2]);
    }

    #[test]
    fn decode_sized_products_match_loops() {
        // Row counts on both sides of SMALL_M, k and n above SMALL_MIN_KN and off every
        // tile; B read transposed (x·W0ᵀ) and straight (dz·W0); β = 0 ignores a NaN in C.
        // The larger shape takes one row past SMALL_PAR_MIN: B's columns split over the
        // cores (`row_times_matrix`, tested for any thread count below).
        for (k, n, ms) in [
            (517, 611, &[1, 5, SMALL_M, SMALL_M + 1][..]),
            (1031, 1037, &[1][..]),
        ] {
            let w: Vec<f32> = (0..k * n)
                .map(|v| ((v * 37) % 101) as f32 * 0.01 - 0.5)
                .collect();
            for &m in ms {
                let x: Vec<f32> = (0..m * k)
                    .map(|v| ((v * 13) % 29) as f32 * 0.1 - 1.4)
                    .collect();
                for transposed in [false, true] {
                    let b = if transposed {
                        View::new(&w, n, k).t()
                    } else {
                        View::new(&w, k, n)
                    };
                    for beta in [0.0f32, 1.0] {
                        let mut c = vec![f32::NAN; m * n];
                        if beta != 0.0 {
                            c.iter_mut()
                                .enumerate()
                                .for_each(|(i, v)| *v = i as f32 * 1e-3);
                        }
                        let old = c.clone();
                        gemm(
                            0.5,
                            View::new(&x, m, k),
                            b,
                            beta,
                            ViewMut::new(&mut c, m, n),
                        );
                        for i in 0..m {
                            for j in 0..n {
                                let dot: f64 = (0..k)
                                    .map(|l| x[i * k + l] as f64 * b.at(l, j) as f64)
                                    .sum();
                                let base = if beta != 0.0 {
                                    old[i * n + j] as f64
                                } else {
                                    0.0
                                };
                                let want = 0.5 * dot + base;
                                let got = c[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "m {m} Wᵀ {transposed} β {beta} ({i},{j}): {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_split_over_any_number_of_threads_matches_loops() {
        // 1037 columns in ranges of multiples of 64 (the last one shorter), B read
        // transposed and straight, β = 0 (a NaN in C ignored) and β = 1.
        let (k, n) = (520, 1037);
        let w: Vec<f32> = (0..k * n)
            .map(|v| ((v * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let x: Vec<f32> = (0..k).map(|v| ((v * 13) % 29) as f32 * 0.1 - 1.4).collect();
        for nt in [1, 2, 3, 7] {
            for transposed in [false, true] {
                let b = if transposed {
                    View::new(&w, n, k).t()
                } else {
                    View::new(&w, k, n)
                };
                for beta in [0.0f32, 1.0] {
                    let start = if beta == 0.0 { f32::NAN } else { 0.25 };
                    let mut c = vec![start; n];
                    row_times_matrix(
                        2.0,
                        View::new(&x, 1, k),
                        b,
                        beta,
                        ViewMut::new(&mut c, 1, n),
                        nt,
                    );
                    for (j, &got) in c.iter().enumerate() {
                        let dot: f64 = (0..k).map(|l| x[l] as f64 * b.at(l, j) as f64).sum();
                        let want = 2.0 * dot + if beta == 0.0 { 0.0 } else { 0.25 };
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "nt {nt} transposed {transposed} beta {beta} column {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn few_rows_by_row_blocks_match_loops_for_any_thread_count() {
        // W [n, k] row-major read as B = Wᵀ; n = 1037 rows in ranges and 1,024-row-or-less
        // blocks for 1 to 7 threads; C written into a wider buffer whose padding must
        // survive; β = 0 ignores a NaN in C, β = 1 accumulates.
        let (k, n, rs) = (520, 1037, 1040);
        let w: Vec<f32> = (0..n * k)
            .map(|v| ((v * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let bv = View::new(&w, n, k).t();
        for m in [2, 5, 32] {
            let x: Vec<f32> = (0..m * k)
                .map(|v| ((v * 13) % 29) as f32 * 0.1 - 1.4)
                .collect();
            for nt in [1, 2, 3, 7] {
                for beta in [0.0f32, 1.0] {
                    let mut c: Vec<f32> = (0..m * rs)
                        .map(|v| {
                            if beta == 0.0 && v % rs < n {
                                f32::NAN
                            } else {
                                v as f32 * 1e-3
                            }
                        })
                        .collect();
                    let old = c.clone();
                    rows_times_transposed(
                        0.5,
                        View::new(&x, m, k),
                        bv,
                        beta,
                        ViewMut::strided(&mut c, m, n, rs),
                        nt,
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|l| x[i * k + l] as f64 * bv.at(l, j) as f64)
                                .sum();
                            let base = if beta == 0.0 {
                                0.0
                            } else {
                                old[i * rs + j] as f64
                            };
                            let want = 0.5 * dot + base;
                            let got = c[i * rs + j] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "m {m} nt {nt} beta {beta} ({i},{j}): {got} vs {want}"
                            );
                        }
                        assert_eq!(&c[i * rs + n..(i + 1) * rs], &old[i * rs + n..(i + 1) * rs]);
                    }
                }
            }
        }
    }

    #[test]
    fn long_products_with_few_rows_match_loops() {
        // n > m and k ≥ SMALL_MIN_KN with m > SMALL_M: matrixmultiply computes Cᵀ = Bᵀ·Aᵀ;
        // C is written into a wider buffer (row stride 75 > 70) whose padding must survive,
        // and β = 1 accumulates into it.
        let (m, k, n, rs) = (40, 520, 70, 75);
        let a: Vec<f32> = (0..m * k)
            .map(|v| ((v * 7) % 23) as f32 * 0.1 - 1.1)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|v| ((v * 11) % 31) as f32 * 0.05 - 0.7)
            .collect();
        let bv = View::new(&b, n, k).t();
        let mut c: Vec<f32> = (0..m * rs).map(|v| v as f32 * 1e-3).collect();
        let old = c.clone();
        gemm(
            0.5,
            View::new(&a, m, k),
            bv,
            1.0,
            ViewMut::strided(&mut c, m, n, rs),
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|l| a[i * k + l] as f64 * bv.at(l, j) as f64)
                    .sum();
                let want = 0.5 * dot + old[i * rs + j] as f64;
                let got = c[i * rs + j] as f64;
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "({i},{j})");
            }
            assert_eq!(&c[i * rs + n..(i + 1) * rs], &old[i * rs + n..(i + 1) * rs]);
        }
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn overrun_is_caught() {
        let v = vec![0.0f32; 5];
        let _ = View::new(&v, 2, 3);
    }
}
