//! The bytes one kernel launch must move: each array it reads, read once, plus each array it
//! writes, written once (a read-modify-write array counts twice), from the launch's own
//! arguments (sizes, null pointers) and grid, in the dtypes its entry point is stamped for.
//! This is the one place these counts are written down; kernels/README.md's "Bytes that must
//! move" block is generated from [`FORMULAS`] ([`markdown`]).
//!
//! The bench's operation formulas ([`crate::bench::formula`]) count whole layer operations
//! (the norm, compose, a training step); these count one launch of one kernel, so they also
//! count the f32 scratch a split launch writes and the next kernel reads (partial sums, `U`
//! slabs), which an operation keeps out of its floor.
//!
//! Notation: `sz` is the element size of the activations and weight (4 for f32, 2 for f16 and
//! bf16), `sz_a` that of the adapter (4 for the `_a32` forms, else `sz`); grid dimensions are
//! the launch's; every `m`, `g`, `n`, bias, coefficient and partial sum is f32.

use crate::backend::KernelArg;
use anyhow::{bail, ensure, Result};

/// Each kernel family of `kernels/kernels.list` with its bytes that must move, as text.
pub const FORMULAS: &[(&str, &str)] = &[
    (
        "dora_norm_v1, dora_norm_v2",
        "W0 `d_out·d_in·sz` + A `r·d_in·sz_a` + B `d_out·r·sz_a` + m `4·d_out` (DoRA) + either \
         the partial sums `4·grid.y·d_out` (split over d_in) or n and g `4·d_out` each",
    ),
    (
        "dora_norm_reduce_f32",
        "partials `4·splits·d_out` + m, n, g `4·d_out` each (m and g when DoRA)",
    ),
    (
        "dora_merged_weight, dora_merged_weight_f32out",
        "W0 `d_out·d_in·sz` + A `r·d_in·sz_a` + B `d_out·r·sz_a` + g `4·d_out` (when given) + \
         W' `d_out·d_in·sz` (`·4` for f32out)",
    ),
    (
        "dora_shrink",
        "X `rows·d_in·sz` + A `r·d_in·sz_a` + U `4·grid.z·rows·r` (read too when it \
         accumulates, with coef `4·rows`)",
    ),
    (
        "dora_compose",
        "base `T·d_out·sz` + y `T·d_out·sz` + U `4·u_splits·T·r` + Bm `d_out·r·sz_a` + g, \
         bias `4·d_out` each (when given)",
    ),
    (
        "dora_bwd_dz",
        "dy `T·d_out·sz` + base `T·d_out·sz` (DoRA) + U `4·T·r` + B `d_out·r·sz_a` + g \
         `4·d_out` (DoRA) + dz `T·d_out·sz` (DoRA) + c-partials `4·⌈T/tt⌉·d_out` (DoRA) + dz·B \
         slabs `4·grid.y·T·r`",
    ),
    (
        "dora_tn_r16, dora_tn_r64",
        "L `4·rows·r` + R `rows·ncols·sz` + partials `4·grid.z·r·ncols`",
    ),
    (
        "dora_scale_rows",
        "in `rows·cols·sz` + coef `4·rows` + out `4·rows·cols`",
    ),
    (
        "dora_mag_reduce_f32",
        "c-partials `4·parts·d_out` + n, m, grad_m `4·d_out` each + kcoef `4·d_out` (exact \
         gradient)",
    ),
    (
        "dora_sum_partials_f32",
        "partials `4·splits·r·ncols` + column scale `4·ncols` (when given) + out `4·r·ncols` \
         (twice when it accumulates)",
    ),
    ("baseline_axpby", "a, b and out `n·sz` each"),
    (
        "baseline_scale_cols",
        "a and out `rows·cols·sz` each + g `4·cols`",
    ),
    (
        "baseline_row_norm",
        "V `grid.x·cols·sz` + n `4·grid.x` + m and g `4·grid.x` each (when g is given)",
    ),
    (
        "baseline_col_dot",
        "a and b `rows·cols·sz` each + n and out `4·cols` each",
    ),
    (
        "dora_multi_shrink",
        "x `T·d_in·sz` + index `4·T` + slot tables `12·slots` + A_k `r_max·d_in·sz_a` per slot \
         (every slot taken as used at r_max: the tables are on the device) + U `4·T·r_max`",
    ),
    (
        "dora_multi_expand",
        "base and y `T·d_out·sz` each + U `4·T·r_max` + index `4·T` + slot tables `24·slots` + \
         B_k `d_out·r_max·sz_a` and g_k `4·d_out` per slot (as for multi_shrink) + bias \
         `4·d_out` (when given)",
    ),
    (
        "dora_multi_copy_table",
        "the table image read and written, `4·words` each",
    ),
];

/// [`FORMULAS`] as a table, which kernels/README.md holds as its generated section
/// `dorafuse-profile:formulas`.
pub fn table() -> crate::markdown::Table {
    let mut t = crate::markdown::Table::new("kernels|bytes that must move, per launch");
    for (k, f) in FORMULAS {
        let names: Vec<String> = k.split(", ").map(|n| format!("`{n}`")).collect();
        t.rows.push(vec![names.join(", "), f.to_string()]);
    }
    t
}

/// `(sz, sz_a)` of an entry point from its dtype suffix (`_f32`, `_f16`, `_bf16`, and the
/// `_a32` forms with f32 adapters); entry points without a suffix move f32 only.
fn sizes(kernel: &str) -> (f64, f64) {
    let a32 = kernel.ends_with("_a32");
    let base = kernel.trim_end_matches("_a32");
    let sz = if base.ends_with("_f16") || base.ends_with("_bf16") {
        2.0
    } else {
        4.0
    };
    (sz, if a32 { 4.0 } else { sz })
}

/// The arguments of one launch, read by position with the parameter kinds checked.
struct Args<'a> {
    kernel: &'a str,
    args: &'a [KernelArg],
}

impl Args<'_> {
    fn int(&self, i: usize) -> Result<f64> {
        match self.args.get(i) {
            Some(KernelArg::I32(v)) => Ok(*v as f64),
            Some(KernelArg::I64(v)) => Ok(*v as f64),
            Some(KernelArg::U32(v)) => Ok(*v as f64),
            Some(KernelArg::U64(v)) => Ok(*v as f64),
            other => bail!(
                "{}: argument {i} is {other:?}, not a size (its signature changed: update \
                 src/profile/formula.rs)",
                self.kernel
            ),
        }
    }
    /// 1 when pointer argument `i` is non-null, 0 when null.
    fn given(&self, i: usize) -> Result<f64> {
        match self.args.get(i) {
            Some(KernelArg::Ptr(p)) => Ok(if p.0 == 0 { 0.0 } else { 1.0 }),
            other => bail!(
                "{}: argument {i} is {other:?}, not a pointer (its signature changed: update \
                 src/profile/formula.rs)",
                self.kernel
            ),
        }
    }
    fn count(&self, n: usize) -> Result<()> {
        ensure!(
            self.args.len() == n,
            "{}: {} arguments, the formula knows a signature of {n} (update \
             src/profile/formula.rs)",
            self.kernel,
            self.args.len()
        );
        Ok(())
    }
}

/// One array a launch reads or writes: the pointer argument that holds it, the bytes the
/// launch must move for it (read once, written once, both for a read-modify-write) and the
/// bytes its elements span from that address (more than its size for a strided view).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Array {
    /// Address (the pointer argument).
    pub addr: u64,
    /// Bytes that must move for it.
    pub moved: f64,
    /// Bytes from `addr` to the end of its last element.
    pub extent: f64,
}

/// The bytes launch `kernel` with `args` and `grid` must move ([`FORMULAS`]): the sum of
/// [`arrays`]' `moved` and of what the launch reaches through device-side tables (the
/// multi-adapter kernels' A_k, B_k and g_k).
///
/// # Errors
/// As [`arrays`].
pub fn bytes(kernel: &str, args: &[KernelArg], grid: [u32; 3]) -> Result<f64> {
    let (arrays, indirect) = arrays(kernel, args, grid)?;
    Ok(arrays.iter().map(|a| a.moved).sum::<f64>() + indirect)
}

/// The arrays launch `kernel` with `args` and `grid` reads and writes (null pointers
/// left out), and the bytes it must move through addresses held in device tables (no
/// argument holds them).
///
/// # Errors
/// An entry point of no known family, or arguments that do not match the signature the
/// formula reads (a kernel whose parameters changed).
pub fn arrays(kernel: &str, args: &[KernelArg], grid: [u32; 3]) -> Result<(Vec<Array>, f64)> {
    let (sz, sza) = sizes(kernel);
    let a = Args { kernel, args };
    let gy = grid[1] as f64;
    let gz = grid[2] as f64;
    let f32b = 4.0;
    let family = |p: &str| kernel.starts_with(p);
    let mut out: Vec<Array> = Vec::new();
    let mut indirect = 0.0;
    // Pointer argument `i` moving `moved` bytes over `extent` bytes (skipped when null).
    let mut arr = |i: usize, moved: f64, extent: f64| -> Result<()> {
        match args.get(i) {
            Some(KernelArg::Ptr(p)) if p.0 != 0 => out.push(Array {
                addr: p.0,
                moved,
                extent,
            }),
            Some(KernelArg::Ptr(_)) => {}
            other => bail!(
                "{kernel}: argument {i} is {other:?}, not a pointer (its signature changed: \
                 update src/profile/formula.rs)"
            ),
        }
        Ok(())
    };
    // A 2-D view of `rows` × `cols` elements of `size` bytes with strides (`ld_r`, `ld_c`).
    let span = |rows: f64, cols: f64, ld_r: f64, ld_c: f64, size: f64| {
        ((rows - 1.0).max(0.0) * ld_r.abs() + (cols - 1.0).max(0.0) * ld_c.abs() + 1.0) * size
    };
    if family("dora_norm_reduce_f32") {
        // (part, splits, m, eps, d_out, n_out, g_out)
        a.count(7)?;
        let (splits, d_out) = (a.int(1)?, a.int(4)?);
        arr(0, f32b * splits * d_out, f32b * splits * d_out)?;
        for i in [2, 5, 6] {
            arr(i, f32b * d_out, f32b * d_out)?;
        }
    } else if family("dora_norm_v1_") || family("dora_norm_v2_") {
        // (w0, ldj, ldk, a, b, m, s, eps, d_out, d_in, r, per, [vec,] part, n_out, g_out)
        let v2 = family("dora_norm_v2_");
        a.count(if v2 { 16 } else { 15 })?;
        let (d_out, d_in, r) = (a.int(8)?, a.int(9)?, a.int(10)?);
        let w0 = span(d_out, d_in, a.int(1)?, a.int(2)?, sz);
        arr(0, d_out * d_in * sz, w0)?;
        arr(3, r * d_in * sza, r * d_in * sza)?;
        arr(4, d_out * r * sza, d_out * r * sza)?;
        arr(5, f32b * d_out, f32b * d_out)?;
        let p = if v2 { 13 } else { 12 };
        if a.given(p)? > 0.0 {
            arr(p, f32b * gy * d_out, f32b * gy * d_out)?;
        } else {
            arr(p + 1, f32b * d_out, f32b * d_out)?;
            arr(p + 2, f32b * d_out, f32b * d_out)?;
        }
    } else if family("dora_merged_weight_") {
        // (w0, ldj, ldk, a, b, g, s, d_out, d_in, r, out)
        a.count(11)?;
        let (d_out, d_in, r) = (a.int(7)?, a.int(8)?, a.int(9)?);
        let osz = if family("dora_merged_weight_f32out_") {
            4.0
        } else {
            sz
        };
        let w0 = span(d_out, d_in, a.int(1)?, a.int(2)?, sz);
        arr(0, d_out * d_in * sz, w0)?;
        arr(3, r * d_in * sza, r * d_in * sza)?;
        arr(4, d_out * r * sza, d_out * r * sza)?;
        arr(5, f32b * d_out, f32b * d_out)?;
        arr(10, d_out * d_in * osz, d_out * d_in * osz)?;
    } else if family("dora_shrink_") {
        // (x, ldx_t, ldx_k, a, rows, d_in, r, per, coef, out, rt)
        a.count(11)?;
        let (rows, d_in, r) = (a.int(4)?, a.int(5)?, a.int(6)?);
        let acc = a.given(8)?;
        let x = span(rows, d_in, a.int(1)?, a.int(2)?, sz);
        arr(0, rows * d_in * sz, x)?;
        arr(3, r * d_in * sza, r * d_in * sza)?;
        arr(8, f32b * rows, f32b * rows)?;
        let u = f32b * gz * rows * r;
        arr(9, u * (1.0 + acc), u)?;
    } else if family("dora_compose_") {
        // (base, ld_base, y, ld_y, u, u_splits, bm, ldb_j, ldb_i, g, bias, s, t, d_out, r)
        a.count(15)?;
        let (splits, t, d_out, r) = (a.int(5)?, a.int(12)?, a.int(13)?, a.int(14)?);
        arr(0, t * d_out * sz, span(t, d_out, a.int(1)?, 1.0, sz))?;
        arr(2, t * d_out * sz, span(t, d_out, a.int(3)?, 1.0, sz))?;
        arr(4, f32b * splits * t * r, f32b * splits * t * r)?;
        arr(
            6,
            d_out * r * sza,
            span(d_out, r, a.int(7)?, a.int(8)?, sza),
        )?;
        arr(9, f32b * d_out, f32b * d_out)?;
        arr(10, f32b * d_out, f32b * d_out)?;
    } else if family("dora_bwd_dz_") {
        // (dy, base, u, b, g, s, t, d_out, r, tt, jt, per, dz, cpart, dzb)
        a.count(15)?;
        let (t, d_out, r, tt) = (a.int(6)?, a.int(7)?, a.int(8)?, a.int(9)?);
        let act = t * d_out * sz;
        arr(0, act, act)?;
        arr(1, act, act)?;
        arr(2, f32b * t * r, f32b * t * r)?;
        arr(3, d_out * r * sza, d_out * r * sza)?;
        arr(4, f32b * d_out, f32b * d_out)?;
        arr(12, act, act)?;
        let cpart = f32b * (t / tt).ceil() * d_out;
        arr(13, cpart, cpart)?;
        arr(14, f32b * gy * t * r, f32b * gy * t * r)?;
    } else if family("dora_tn_r") {
        // (l, rm, rows, r, ncols, rows_per_split, part)
        a.count(7)?;
        let (rows, r, ncols) = (a.int(2)?, a.int(3)?, a.int(4)?);
        arr(0, f32b * rows * r, f32b * rows * r)?;
        arr(1, rows * ncols * sz, rows * ncols * sz)?;
        arr(6, f32b * gz * r * ncols, f32b * gz * r * ncols)?;
    } else if family("dora_scale_rows_") {
        // (in, coef, rows, cols, out)
        a.count(5)?;
        let (rows, cols) = (a.int(2)?, a.int(3)?);
        arr(0, rows * cols * sz, rows * cols * sz)?;
        arr(1, f32b * rows, f32b * rows)?;
        arr(4, f32b * rows * cols, f32b * rows * cols)?;
    } else if family("dora_mag_reduce_f32") {
        // (cpart, parts, n, m, eps, neg_s, d_out, dm, kcoef)
        a.count(9)?;
        let (parts, d_out) = (a.int(1)?, a.int(6)?);
        arr(0, f32b * parts * d_out, f32b * parts * d_out)?;
        for i in [2, 3, 7, 8] {
            arr(i, f32b * d_out, f32b * d_out)?;
        }
    } else if family("dora_sum_partials_f32") {
        // (part, splits, r, ncols, alpha, colscale, transpose, accumulate, out)
        a.count(9)?;
        let (splits, r, ncols, accumulate) = (a.int(1)?, a.int(2)?, a.int(3)?, a.int(7)?);
        let n = f32b * r * ncols;
        arr(0, splits * n, splits * n)?;
        arr(5, f32b * ncols, f32b * ncols)?;
        arr(8, if accumulate != 0.0 { 2.0 * n } else { n }, n)?;
    } else if family("baseline_axpby_") {
        // (out, a, b, alpha, beta, n)
        a.count(6)?;
        let n = a.int(5)? * sz;
        for i in [0, 1, 2] {
            arr(i, n, n)?;
        }
    } else if family("baseline_scale_cols_") {
        // (out, a, g, shift, alpha, rows, cols)
        a.count(7)?;
        let (rows, cols) = (a.int(5)?, a.int(6)?);
        arr(0, rows * cols * sz, rows * cols * sz)?;
        arr(1, rows * cols * sz, rows * cols * sz)?;
        arr(2, f32b * cols, f32b * cols)?;
    } else if family("baseline_row_norm_") {
        // (v, m, cols, eps, n, g): one block per row; m is read only when g is written
        a.count(6)?;
        let rows = grid[0] as f64;
        arr(0, rows * a.int(2)? * sz, rows * a.int(2)? * sz)?;
        if a.given(5)? > 0.0 {
            arr(1, f32b * rows, f32b * rows)?;
        }
        arr(4, f32b * rows, f32b * rows)?;
        arr(5, f32b * rows, f32b * rows)?;
    } else if family("baseline_col_dot_") {
        // (a, b, n, eps, rows, cols, out)
        a.count(7)?;
        let (rows, cols) = (a.int(4)?, a.int(5)?);
        arr(0, rows * cols * sz, rows * cols * sz)?;
        arr(1, rows * cols * sz, rows * cols * sz)?;
        arr(2, f32b * cols, f32b * cols)?;
        arr(6, f32b * cols, f32b * cols)?;
    } else if family("dora_multi_shrink_") {
        // (x, ldx, index, a_ptrs, ranks, slots, r_max, t, d_in, u, ldu, err)
        a.count(12)?;
        let (slots, r_max, t, d_in) = (a.int(5)?, a.int(6)?, a.int(7)?, a.int(8)?);
        arr(0, t * d_in * sz, span(t, d_in, a.int(1)?, 1.0, sz))?;
        arr(2, 4.0 * t, 4.0 * t)?;
        arr(3, 8.0 * slots, 8.0 * slots)?;
        arr(4, 4.0 * slots, 4.0 * slots)?;
        arr(9, f32b * t * r_max, span(t, r_max, a.int(10)?, 1.0, f32b))?;
        indirect = slots * r_max * d_in * sza;
    } else if family("dora_multi_expand_") {
        // (base, ld_base, y, ld_y, u, ldu, index, b_ptrs, g_ptrs, ranks, scales, slots,
        //  r_max, bias, t, d_out, err)
        a.count(17)?;
        let (slots, r_max, t, d_out) = (a.int(11)?, a.int(12)?, a.int(14)?, a.int(15)?);
        arr(0, t * d_out * sz, span(t, d_out, a.int(1)?, 1.0, sz))?;
        arr(2, t * d_out * sz, span(t, d_out, a.int(3)?, 1.0, sz))?;
        arr(4, f32b * t * r_max, span(t, r_max, a.int(5)?, 1.0, f32b))?;
        arr(6, 4.0 * t, 4.0 * t)?;
        for i in [7, 8] {
            arr(i, 8.0 * slots, 8.0 * slots)?;
        }
        for i in [9, 10] {
            arr(i, 4.0 * slots, 4.0 * slots)?;
        }
        arr(13, f32b * d_out, f32b * d_out)?;
        indirect = slots * (d_out * r_max * sza + f32b * d_out);
    } else if family("dora_multi_copy_table") {
        // (src, dst, words)
        a.count(3)?;
        let n = 4.0 * a.int(2)?;
        arr(0, n, n)?;
        arr(1, n, n)?;
    } else {
        bail!("{kernel}: no bytes-that-must-move formula (add one to src/profile/formula.rs)")
    }
    Ok((out, indirect))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::FAMILIES;

    #[test]
    fn every_family_of_the_list_has_a_formula() {
        let known: Vec<&str> = FORMULAS.iter().flat_map(|(k, _)| k.split(", ")).collect();
        for (_, name, _) in FAMILIES {
            assert!(known.contains(name), "{name}: no formula in FORMULAS");
        }
    }

    #[test]
    fn the_readme_section_is_generated_from_the_formulas() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/README.md");
        let text = std::fs::read_to_string(path).unwrap();
        let name = crate::profile::README_SECTIONS[0];
        assert_eq!(
            crate::markdown::section(&text, name).unwrap(),
            table().to_markdown().trim_end(),
            "kernels/README.md is out of date: run `dorafuse profile --device emu --markdown \
             kernels/README.md`"
        );
    }

    #[test]
    fn sizes_follow_the_suffix() {
        assert_eq!(sizes("dora_shrink_bf16_a32"), (2.0, 4.0));
        assert_eq!(sizes("dora_shrink_f16"), (2.0, 2.0));
        assert_eq!(sizes("dora_shrink_f32"), (4.0, 4.0));
        assert_eq!(sizes("dora_mag_reduce_f32"), (4.0, 4.0));
    }

    #[test]
    fn a_changed_signature_is_an_error_naming_the_kernel() {
        let e = bytes("dora_tn_r16_f32", &[KernelArg::I32(1)], [1, 1, 1]).unwrap_err();
        assert!(e.to_string().contains("dora_tn_r16_f32"), "{e}");
    }
}
