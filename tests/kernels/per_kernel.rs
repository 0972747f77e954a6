//! Each kernel below the layer, launched alone by its entry-point name through
//! `Backend::launch` and held to the CPU function of the same name (`dorafuse::cpu::ops`):
//! shrink, compose, bwd_dz, mag_reduce, tn (both rank tiles), sum_partials, scale_rows,
//! multi_shrink and multi_expand, in every dtype pair `kernels/kernels.list` stamps each for,
//! at sizes off every tile of `kernels::spec`, written once over [`TestBackend`]. The
//! layer-level kernels are held to theirs in layer.rs (`dora_norm_*` to
//! `cpu::reference::norm_f64`, `dora_merged_weight*` to `merged_weight_f64`).
//!
//! Every output buffer starts as NaN, so an element a kernel fails to write fails the test.
//! Inputs are rounded to their storage dtype before the CPU function sees them; outputs
//! stored in f32 are held to the f32 tolerance, outputs stored in the activation dtype to
//! that dtype's (`DType::tolerance`).

use crate::device::{test_device, TestBackend};
use dorafuse::backend::{Backend, DevPtr, KernelArg, LaunchDims};
use dorafuse::cpu::ops;
use dorafuse::kernels::spec;
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use DType::{BF16, F16, F32};

/// The (activation, adapter) dtype pairs of a family stamped `f32 f16 bf16 f16_a32 bf16_a32`.
const PAIRS: [(DType, DType); 5] = [
    (F32, F32),
    (F16, F16),
    (BF16, BF16),
    (F16, F32),
    (BF16, F32),
];

/// A null pointer argument (an optional tensor left out).
const NULL: KernelArg = KernelArg::Ptr(DevPtr(0));

/// Device buffers of one test, kept alive until it ends.
struct Dev<'b, B: Backend> {
    b: &'b B,
    rng: StdRng,
    bufs: Vec<B::Buffer>,
}

impl<'b, B: Backend> Dev<'b, B> {
    fn new(b: &'b B, seed: u64) -> Self {
        Dev {
            b,
            rng: StdRng::seed_from_u64(seed),
            bufs: Vec::new(),
        }
    }

    /// `n` standard-normal values rounded to `dt`, on the host and on the device.
    fn random(&mut self, dt: DType, n: usize) -> (Vec<f64>, KernelArg) {
        let v: Vec<f64> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        self.upload(dt, &v)
    }

    /// `v` rounded to `dt`, on the host and on the device.
    fn upload(&mut self, dt: DType, v: &[f64]) -> (Vec<f64>, KernelArg) {
        let t = Tensor::from_f64(dt, vec![v.len()], v).unwrap();
        let mut buf = self.b.alloc_zeroed(t.as_bytes().len().max(1)).unwrap();
        self.b.upload(&mut buf, t.as_bytes()).unwrap();
        let p = KernelArg::Ptr(dorafuse::backend::DeviceBuffer::ptr(&buf));
        self.bufs.push(buf);
        (t.to_f64(), p)
    }

    /// Raw bytes (index, pointer and rank tables, an error word) on the device; returns the
    /// buffer's index for [`Dev::read_raw`] and its pointer.
    fn raw(&mut self, bytes: &[u8]) -> (usize, KernelArg) {
        let mut buf = self.b.alloc_zeroed(bytes.len()).unwrap();
        self.b.upload(&mut buf, bytes).unwrap();
        let p = KernelArg::Ptr(dorafuse::backend::DeviceBuffer::ptr(&buf));
        self.bufs.push(buf);
        (self.bufs.len() - 1, p)
    }

    fn read_raw(&self, i: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; dorafuse::backend::DeviceBuffer::bytes(&self.bufs[i])];
        self.b.download(&self.bufs[i], &mut bytes).unwrap();
        bytes
    }

    /// An output of `n` elements of `dt`, every one NaN; returns its index for [`Dev::read`].
    fn output(&mut self, dt: DType, n: usize) -> (usize, KernelArg) {
        let (_, p) = self.upload(dt, &vec![f64::NAN; n]);
        (self.bufs.len() - 1, p)
    }

    fn read(&self, i: usize, dt: DType, n: usize) -> Vec<f64> {
        let mut bytes = vec![0u8; n * dt.size()];
        self.b.download(&self.bufs[i], &mut bytes).unwrap();
        Tensor::from_bytes(dt, vec![n], &bytes).unwrap().to_f64()
    }

    /// Launches `name` on `grid` blocks of `threads` and waits for it.
    fn launch(
        &self,
        name: &str,
        grid: [usize; 3],
        threads: usize,
        shared_bytes: usize,
        args: &[KernelArg],
    ) {
        let dims = LaunchDims {
            grid: grid.map(|g| g.max(1) as u32),
            block: [threads as u32, 1, 1],
            shared_bytes: shared_bytes as u32,
        };
        // SAFETY: each caller passes the arguments of `name`'s signature in kernels/*.cu, every
        // pointer to a buffer of `self.bufs` holding the extents that signature reads and
        // writes at the given sizes, and a grid covering every output it is checked on.
        unsafe { self.b.launch(name, dims, args) }.unwrap_or_else(|e| panic!("{name}: {e:#}"));
        self.b.synchronize().unwrap();
    }
}

fn int(v: usize) -> KernelArg {
    KernelArg::I32(v as i32)
}

fn entry(family: &str, act: DType, adapter: DType) -> String {
    spec::stamped(family, act, adapter)
        .unwrap_or_else(|| panic!("{family} is not stamped for {act} with {adapter} adapters"))
}

/// Fails unless `got` is finite everywhere and within `tol` (relative L2) of `want`.
fn check(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: element {i} is {} (unwritten or overflowed)",
            got[i]
        );
    }
    let e = rel_l2(got, want);
    assert!(e <= tol, "{what}: rel-L2 {e:.3e} > {tol:.1e}");
}

/// shrink `U = x·Aᵀ`: under every rank tile (16, 32, 64 ranks; 64, 32, 16 rows), rows off
/// every row tile, d_in off the 32-column chunk, ranks below and across each rank tile; one
/// split and several (split-K slabs, each its own partial sum), x row-major and column-major
/// (the `ldx_k ≠ 1` staging path), and the accumulating form `out += coef ⊙ U`.
fn shrink<B: TestBackend>() {
    let outputs = spec::SH_ROWS * spec::SH_RANKS;
    let (rows, d_in) = (outputs / spec::SH_MIN_RANKS + 3, 2 * spec::SH_KCHUNK + 13);
    let tiles: Vec<usize> = (0..)
        .map(|k| spec::SH_MIN_RANKS << k)
        .take_while(|&rt| rt <= spec::SH_RANKS)
        .collect();
    for &seed in B::SEEDS {
        for (act, adt) in PAIRS {
            for (r, rt) in [7, 20, spec::SH_RANKS + 1]
                .into_iter()
                .flat_map(|r| tiles.iter().map(move |&rt| (r, rt)))
            {
                let brows = outputs / rt;
                let b = B::with_seed(seed);
                let mut d = Dev::new(&b, seed);
                let (x, xp) = d.random(act, rows * d_in);
                let (a, ap) = d.random(adt, r * d_in);
                let want = ops::shrink(&x, &a, (rows, d_in, r));
                let name = entry("dora_shrink", act, adt);
                let grid = |splits| [rows.div_ceil(brows), r.div_ceil(rt), splits];
                // x transposed in memory: [d_in, rows], element (t, k) at k·rows + t.
                let xt: Vec<f64> = (0..rows * d_in)
                    .map(|e| x[(e % rows) * d_in + e / rows])
                    .collect();
                let (_, xtp) = d.upload(act, &xt);
                for (xarg, (ldt, ldk)) in [(xp, (d_in, 1)), (xtp, (1, rows))] {
                    for per in [spec::SH_KCHUNK, d_in.next_multiple_of(spec::SH_KCHUNK)] {
                        let splits = d_in.div_ceil(per);
                        let (o, op) = d.output(F32, splits * rows * r);
                        let args = [
                            xarg,
                            KernelArg::I64(ldt as i64),
                            KernelArg::I64(ldk as i64),
                            ap,
                            int(rows),
                            int(d_in),
                            int(r),
                            int(per),
                            NULL,
                            op,
                            int(rt),
                        ];
                        d.launch(&name, grid(splits), spec::THREADS, 0, &args);
                        let slabs = d.read(o, F32, splits * rows * r);
                        for (z, slab) in slabs.chunks(rows * r).enumerate() {
                            // Split z reduces columns [z·per, (z+1)·per).
                            let (k0, k1) = (z * per, ((z + 1) * per).min(d_in));
                            let cut = |v: &[f64], n: usize| -> Vec<f64> {
                                (0..n)
                                    .flat_map(|i| v[i * d_in + k0..i * d_in + k1].to_vec())
                                    .collect()
                            };
                            let part = ops::shrink(&cut(&x, rows), &cut(&a, r), (rows, k1 - k0, r));
                            let what = format!(
                                "{name} r={r} rank tile {rt} ld=({ldt},{ldk}) split {z}/{splits}"
                            );
                            check(&what, slab, &part, F32.tolerance());
                        }
                    }
                }
                // out += coef ⊙ U (one split), over a random out.
                let (prev, op) = d.random(F32, rows * r);
                let (coef, cp) = d.random(F32, rows);
                let o = d.bufs.len() - 2;
                let args = [
                    xp,
                    KernelArg::I64(d_in as i64),
                    KernelArg::I64(1),
                    ap,
                    int(rows),
                    int(d_in),
                    int(r),
                    int(d_in.next_multiple_of(spec::SH_KCHUNK)),
                    cp,
                    op,
                    int(rt),
                ];
                d.launch(&name, grid(1), spec::THREADS, 0, &args);
                let want: Vec<f64> = (0..rows * r)
                    .map(|e| prev[e] + coef[e / r] * want[e])
                    .collect();
                check(
                    &format!("{name} r={r} rank tile {rt} coef"),
                    &d.read(o, F32, rows * r),
                    &want,
                    F32.tolerance(),
                );
            }
        }
    }
}
test_device!(shrink);

/// compose `y = g ⊙ (base + s·U·Bᵀ) + b`: tokens off the 16-row tile, columns off the
/// 64-column tile, ranks off the 32-rank chunk; U as two slabs (summed), padded row strides,
/// B row-major and Aᵀ through strides (the grad_x form), with and without g and bias.
fn compose<B: TestBackend>() {
    let (t, d_out) = (spec::CO_ROWS + 3, spec::CO_COLS + 6);
    let (ld_base, ld_y) = (d_out + 3, d_out + 5);
    let s = 0.75;
    for &seed in B::SEEDS {
        for (act, adt) in PAIRS {
            for r in [7, spec::CO_RCHUNK + 5] {
                let b = B::with_seed(seed);
                let mut d = Dev::new(&b, seed);
                let name = entry("dora_compose", act, adt);
                let (base_p, basep) = d.random(act, t * ld_base);
                let base: Vec<f64> = (0..t * d_out)
                    .map(|e| base_p[(e / d_out) * ld_base + e % d_out])
                    .collect();
                let (u2, up) = d.random(F32, 2 * t * r);
                let u: Vec<f64> = (0..t * r).map(|e| u2[e] + u2[t * r + e]).collect();
                let (bm, bmp) = d.random(adt, d_out * r);
                // The same matrix stored transposed, [r, d_out], read through strides (1, d_out).
                let bmt: Vec<f64> = (0..r * d_out)
                    .map(|e| bm[(e % d_out) * r + e / d_out])
                    .collect();
                let (_, bmtp) = d.upload(adt, &bmt);
                let (g, gp) = d.random(F32, d_out);
                let (bias, biasp) = d.random(F32, d_out);
                for (bmarg, strides) in [(bmp, (r, 1)), (bmtp, (1, d_out))] {
                    for dora in [true, false] {
                        let (o, yp) = d.output(act, t * ld_y);
                        let args = [
                            basep,
                            KernelArg::I64(ld_base as i64),
                            yp,
                            KernelArg::I64(ld_y as i64),
                            up,
                            int(2),
                            bmarg,
                            KernelArg::I64(strides.0 as i64),
                            KernelArg::I64(strides.1 as i64),
                            if dora { gp } else { NULL },
                            if dora { biasp } else { NULL },
                            KernelArg::F32(s as f32),
                            int(t),
                            int(d_out),
                            int(r),
                        ];
                        let grid = [t.div_ceil(spec::CO_ROWS), d_out.div_ceil(spec::CO_COLS), 1];
                        d.launch(&name, grid, spec::THREADS, 0, &args);
                        let y_p = d.read(o, act, t * ld_y);
                        let y: Vec<f64> = (0..t * d_out)
                            .map(|e| y_p[(e / d_out) * ld_y + e % d_out])
                            .collect();
                        let (gg, bb) = if dora {
                            (Some(&g[..]), Some(&bias[..]))
                        } else {
                            (None, None)
                        };
                        let want = ops::compose(&base, &u, &bm, gg, bb, s, (t, d_out, r));
                        let what = format!("{name} r={r} strides {strides:?} g and bias: {dora}");
                        check(&what, &y, &want, act.tolerance());
                        // The padding between rows is not written.
                        assert!(
                            y_p.chunks(ld_y)
                                .all(|row| row[d_out..].iter().all(|v| v.is_nan())),
                            "{what}: wrote past d_out"
                        );
                    }
                }
            }
        }
    }
}
test_device!(compose);

/// bwd_dz, the one pass over dy: tokens and columns off the launcher's (tt, jt) tiles at
/// each rank, DoRA (dz, the c partials, dz·B) and plain LoRA (dz·B of dy itself).
fn bwd_dz<B: TestBackend>() {
    let s = 1.25;
    for &seed in B::SEEDS {
        for (act, adt) in PAIRS {
            for r in [3, 17, 64] {
                let (tt, jt) = spec::bwd_dz_tiles(r);
                let (t, d_out) = (2 * tt + 3, 2 * jt + 5);
                let parts = t.div_ceil(tt);
                let b = B::with_seed(seed);
                let mut d = Dev::new(&b, seed);
                let name = entry("dora_bwd_dz", act, adt);
                let (dy, dyp) = d.random(act, t * d_out);
                let (base, basep) = d.random(act, t * d_out);
                let (u, up) = d.random(F32, t * r);
                let (bm, bp) = d.random(adt, d_out * r);
                let (g, gp) = d.random(F32, d_out);
                // One split of d_out, and two (whole jt chunks, the last ending at d_out):
                // split k writes its own [T, r] slab of dz·B.
                for (dora, splits) in [(true, 1), (false, 1), (true, 2), (false, 2)] {
                    let cols_per_split = d_out.div_ceil(jt).div_ceil(splits) * jt;
                    let (dz_i, dzp) = d.output(act, t * d_out);
                    let (c_i, cp) = d.output(F32, parts * d_out);
                    let (dzb_i, dzbp) = d.output(F32, splits * t * r);
                    let on = |p| if dora { p } else { NULL };
                    let args = [
                        dyp,
                        on(basep),
                        up,
                        bp,
                        on(gp),
                        KernelArg::F32(s as f32),
                        int(t),
                        int(d_out),
                        int(r),
                        int(tt),
                        int(jt),
                        int(cols_per_split),
                        on(dzp),
                        on(cp),
                        dzbp,
                    ];
                    let shared = spec::bwd_dz_shared_bytes(tt, jt, r);
                    d.launch(&name, [parts, splits, 1], spec::THREADS, shared, &args);
                    let want = ops::bwd_dz(
                        &dy,
                        &u,
                        &bm,
                        dora.then_some((&base[..], &g[..])),
                        s,
                        (t, d_out, r),
                    );
                    let what =
                        format!("{name} r={r} t={t} d_out={d_out} dora={dora} splits={splits}");
                    // dz·B is accumulated from dz before its rounding to the dtype; the slabs
                    // add up in split order.
                    let slabs = d.read(dzb_i, F32, splits * t * r);
                    let dzb: Vec<f64> = (0..t * r)
                        .map(|e| (0..splits).map(|k| slabs[k * t * r + e]).sum())
                        .collect();
                    check(&format!("{what} dzb"), &dzb, &want.dzb, F32.tolerance());
                    if dora {
                        check(
                            &format!("{what} dz"),
                            &d.read(dz_i, act, t * d_out),
                            &want.dz,
                            act.tolerance(),
                        );
                        let cpart = d.read(c_i, F32, parts * d_out);
                        let c: Vec<f64> = (0..d_out)
                            .map(|j| (0..parts).map(|p| cpart[p * d_out + j]).sum())
                            .collect();
                        check(&format!("{what} c"), &c, &want.c, F32.tolerance());
                    }
                }
            }
        }
    }
}
test_device!(bwd_dz);

/// mag_reduce: grad_m and the exact-gradient coefficient from the c partials, with zero and
/// below-ε norms (grad_m finite, kcoef 0 there), d_out off the block size.
fn mag_reduce<B: TestBackend>() {
    let (parts, d_out) = (3, spec::SMALL_THREADS + 9);
    let (s, eps) = (0.5, dorafuse::layer::NORM_EPS);
    for &seed in B::SEEDS {
        let b = B::with_seed(seed);
        let mut d = Dev::new(&b, seed);
        let (cpart, cp) = d.random(F32, parts * d_out);
        let c: Vec<f64> = (0..d_out)
            .map(|j| (0..parts).map(|p| cpart[p * d_out + j]).sum())
            .collect();
        let mut n: Vec<f64> = (0..d_out).map(|j| 0.5 + (j % 7) as f64).collect();
        n[0] = 0.0;
        n[1] = 1e-13;
        let (n, np) = d.upload(F32, &n);
        let (m, mp) = d.random(F32, d_out);
        let (dm_i, dmp) = d.output(F32, d_out);
        let (k_i, kp) = d.output(F32, d_out);
        let args = [
            cp,
            int(parts),
            np,
            mp,
            KernelArg::F32(eps as f32),
            KernelArg::F32(-s as f32),
            int(d_out),
            dmp,
            kp,
        ];
        d.launch(
            "dora_mag_reduce_f32",
            [d_out.div_ceil(spec::SMALL_THREADS), 1, 1],
            spec::SMALL_THREADS,
            0,
            &args,
        );
        let (dm, k) = ops::mag_reduce(&c, &n, &m, s, eps);
        check(
            "dora_mag_reduce_f32 grad_m",
            &d.read(dm_i, F32, d_out),
            &dm,
            F32.tolerance(),
        );
        let got_k = d.read(k_i, F32, d_out);
        assert_eq!(&got_k[..2], &[0.0, 0.0], "kcoef where n < ε");
        check("dora_mag_reduce_f32 kcoef", &got_k, &k, F32.tolerance());
    }
}
test_device!(mag_reduce);

/// tn, both rank tiles, each split's partial `Lᵀ·R` over its rows: rows off the 16-row
/// chunk (an empty tail split too), columns off the 64-column tile, ranks below and across
/// each tile; every dtype it is stamped for.
fn tn<B: TestBackend>() {
    let (rows, ncols) = (2 * spec::TN_TCHUNK + 5, spec::TN_COLS + 7);
    for &seed in B::SEEDS {
        for dt in [F32, F16, BF16] {
            for v in spec::VARIANTS.iter().filter(|v| v.op == spec::Op::Tn) {
                for r in [5, v.rank_tile + 3] {
                    let b = B::with_seed(seed);
                    let mut d = Dev::new(&b, seed);
                    let name = v.entry(dt, dt);
                    let (l, lp) = d.random(F32, rows * r);
                    let (rm, rp) = d.random(dt, rows * ncols);
                    for per in [spec::TN_TCHUNK, rows.next_multiple_of(spec::TN_TCHUNK)] {
                        // One more split than the rows need: an empty tail writes zeros.
                        let splits = rows.div_ceil(per) + 1;
                        let (o, op) = d.output(F32, splits * r * ncols);
                        let args = [lp, rp, int(rows), int(r), int(ncols), int(per), op];
                        let grid = [
                            ncols.div_ceil(spec::TN_COLS),
                            r.div_ceil(v.rank_tile),
                            splits,
                        ];
                        d.launch(&name, grid, spec::THREADS, 0, &args);
                        let got = d.read(o, F32, splits * r * ncols);
                        for (z, slab) in got.chunks(r * ncols).enumerate() {
                            let (t0, t1) = ((z * per).min(rows), ((z + 1) * per).min(rows));
                            let want = ops::tn(
                                &l[t0 * r..t1 * r],
                                &rm[t0 * ncols..t1 * ncols],
                                (t1 - t0, r, ncols),
                            );
                            let what = format!("{name} r={r} split {z}/{splits} rows {t0}..{t1}");
                            if t0 == t1 {
                                assert!(
                                    slab.iter().all(|&v| v == 0.0),
                                    "{what}: empty split not zero"
                                );
                            } else {
                                check(&what, slab, &want, F32.tolerance());
                            }
                        }
                    }
                }
            }
        }
    }
}
test_device!(tn);

/// sum_partials: the fixed-order sum of tn's slabs, scaled, per-column scaled, transposed,
/// accumulated or not; `r·ncols` past one block, so the grid stride is walked.
fn sum_partials<B: TestBackend>() {
    let (splits, r, ncols) = (3, 7, spec::SMALL_THREADS / 4 + 5);
    for &seed in B::SEEDS {
        let b = B::with_seed(seed);
        let mut d = Dev::new(&b, seed);
        let (part, pp) = d.random(F32, splits * r * ncols);
        let (cs, csp) = d.random(F32, ncols);
        for (colscale, transpose, accumulate) in [
            (false, false, false),
            (true, true, false),
            (true, false, true),
            (false, true, true),
        ] {
            let (mut want, op) = d.random(F32, r * ncols);
            let o = d.bufs.len() - 1;
            let args = [
                pp,
                int(splits),
                int(r),
                int(ncols),
                KernelArg::F32(-1.5),
                if colscale { csp } else { NULL },
                KernelArg::I32(transpose as i32),
                KernelArg::I32(accumulate as i32),
                op,
            ];
            // One block: each thread strides over more than one output.
            d.launch(
                "dora_sum_partials_f32",
                [1, 1, 1],
                spec::SMALL_THREADS,
                0,
                &args,
            );
            ops::sum_partials(
                &part,
                (splits, r, ncols),
                -1.5,
                colscale.then_some(&cs[..]),
                transpose,
                accumulate,
                &mut want,
            );
            let what = format!("dora_sum_partials_f32 colscale={colscale} transpose={transpose} accumulate={accumulate}");
            check(&what, &d.read(o, F32, r * ncols), &want, F32.tolerance());
        }
    }
}
test_device!(sum_partials);

/// scale_rows `out = diag(coef)·in` in f32 from every dtype, sizes off the block.
fn scale_rows<B: TestBackend>() {
    let (rows, cols) = (13, spec::SMALL_THREADS / 8 + 3);
    for &seed in B::SEEDS {
        for dt in [F32, F16, BF16] {
            let b = B::with_seed(seed);
            let mut d = Dev::new(&b, seed);
            let name = entry("dora_scale_rows", dt, dt);
            let (input, ip) = d.random(dt, rows * cols);
            let (coef, cp) = d.random(F32, rows);
            let (o, op) = d.output(F32, rows * cols);
            // One block: each thread strides over more than one output.
            d.launch(
                &name,
                [1, 1, 1],
                spec::SMALL_THREADS,
                0,
                &[ip, cp, int(rows), int(cols), op],
            );
            let want = ops::scale_rows(&input, &coef, (rows, cols));
            check(&name, &d.read(o, F32, rows * cols), &want, F32.tolerance());
        }
    }
}
test_device!(scale_rows);

/// One slot's adapter on the host: `(A_k, B_k, g_k, s_k)`.
type HostSlot = (Vec<f64>, Vec<f64>, Option<Vec<f64>>, f64);

/// The multi-adapter slots of one case on the device: `A_k`, `B_k`, `g_k` per slot and the
/// per-slot tables the kernels read (pointers, ranks, scales), with their host values.
struct Slots {
    /// Per slot, `None` for an empty slot.
    host: Vec<Option<HostSlot>>,
    ranks: Vec<i32>,
    a_ptrs: KernelArg,
    b_ptrs: KernelArg,
    g_ptrs: KernelArg,
    ranks_arg: KernelArg,
    scales: KernelArg,
}

impl Slots {
    /// Slot 0: DoRA at rank 5; slot 1: empty; slot 2: plain LoRA at rank `r_max` (more than
    /// one 8-rank block of multi_shrink).
    fn new<B: Backend>(
        d: &mut Dev<'_, B>,
        adt: DType,
        d_in: usize,
        d_out: usize,
        r_max: usize,
    ) -> Self {
        let mut host = Vec::new();
        let (mut a_ptrs, mut b_ptrs, mut g_ptrs, mut ranks, mut scales) =
            (vec![], vec![], vec![], vec![], vec![]);
        for (r, dora, scale) in [(5, true, 0.5), (0, false, 0.0), (r_max, false, 2.0)] {
            let ptr = |p: KernelArg| match p {
                KernelArg::Ptr(p) => p.0,
                _ => unreachable!("a buffer"),
            };
            if r == 0 {
                host.push(None);
                a_ptrs.push(0u64);
                b_ptrs.push(0);
                g_ptrs.push(0);
            } else {
                let (a, ap) = d.random(adt, r * d_in);
                let (b, bp) = d.random(adt, d_out * r);
                let (g, gp) = d.random(F32, d_out);
                a_ptrs.push(ptr(ap));
                b_ptrs.push(ptr(bp));
                g_ptrs.push(if dora { ptr(gp) } else { 0 });
                host.push(Some((a, b, dora.then_some(g), scale)));
            }
            ranks.push(r as i32);
            scales.push(scale as f32);
        }
        let a_ptrs = d.raw(bytemuck::cast_slice(&a_ptrs)).1;
        let b_ptrs = d.raw(bytemuck::cast_slice(&b_ptrs)).1;
        let g_ptrs = d.raw(bytemuck::cast_slice(&g_ptrs)).1;
        let ranks_arg = d.raw(bytemuck::cast_slice(&ranks)).1;
        let scales = d.raw(bytemuck::cast_slice(&scales)).1;
        Slots {
            host,
            ranks,
            a_ptrs,
            b_ptrs,
            g_ptrs,
            ranks_arg,
            scales,
        }
    }

    fn cpu(&self) -> Vec<Option<ops::MultiSlot<'_>>> {
        (self.host.iter().zip(&self.ranks))
            .map(|(s, &r)| {
                s.as_ref().map(|(a, b, g, scale)| ops::MultiSlot {
                    a,
                    b,
                    g: g.as_deref(),
                    scale: *scale,
                    r: r as usize,
                })
            })
            .collect()
    }
}

/// Tokens on slot 0, on no slot (−1), on the rank-`r_max` slot, on the empty slot and on a
/// slot that does not exist: the last two are flagged in the error word (empty 2, index 1)
/// and finished as base-only tokens.
const INDEX: [i32; 8] = [0, -1, 2, 2, 0, 1, 3, 2];

/// multi_shrink: each token's row of U from its own slot, base-only tokens and ranks past
/// r_k left unwritten; padded row strides of x and U; d_in off the 32 lanes; the bad tokens
/// flagged.
fn multi_shrink<B: TestBackend>() {
    let (t, d_in, d_out, r_max) = (INDEX.len(), 77, 9, 11);
    let (ldx, ldu) = (d_in + 3, r_max + 2);
    for &seed in B::SEEDS {
        for (act, adt) in PAIRS {
            let b = B::with_seed(seed);
            let mut d = Dev::new(&b, seed);
            let slots = Slots::new(&mut d, adt, d_in, d_out, r_max);
            let (xp, xarg) = d.random(act, t * ldx);
            let x: Vec<f64> = (0..t * d_in)
                .map(|e| xp[(e / d_in) * ldx + e % d_in])
                .collect();
            let (_, index) = d.raw(bytemuck::cast_slice(&INDEX));
            let (err_i, err) = d.raw(&[0u8; 4]);
            let (u_i, up) = d.output(F32, t * ldu);
            let name = entry("dora_multi_shrink", act, adt);
            let args = [
                xarg,
                KernelArg::I64(ldx as i64),
                index,
                slots.a_ptrs,
                slots.ranks_arg,
                int(3),
                int(r_max),
                int(t),
                int(d_in),
                up,
                KernelArg::I64(ldu as i64),
                err,
            ];
            d.launch(&name, [t, r_max.div_ceil(8), 1], spec::THREADS, 0, &args);
            let want = ops::multi_shrink(&x, &INDEX, &slots.cpu(), d_in);
            let u = d.read(u_i, F32, t * ldu);
            for (tok, w) in want.iter().enumerate() {
                let row = &u[tok * ldu..(tok + 1) * ldu];
                check(
                    &format!("{name} token {tok}"),
                    &row[..w.len()],
                    w,
                    F32.tolerance(),
                );
                assert!(
                    row[w.len()..].iter().all(|v| v.is_nan()),
                    "{name} token {tok}: wrote past r_k"
                );
            }
            assert_eq!(d.read_raw(err_i), [3, 0, 0, 0], "{name}: error word");
        }
    }
}
test_device!(multi_shrink);

/// multi_expand: DoRA, plain LoRA and base-only tokens in one batch with a bias, d_out off
/// the 256-column block, padded row strides; the bad tokens flagged and given base + bias.
/// B_k is staged through shared memory in chunks of 32 ranks: r_max 11 is one partial chunk,
/// 70 two whole ones and a partial one.
fn multi_expand<B: TestBackend>() {
    for r_max in [11, 70] {
        multi_expand_at::<B>(r_max);
    }
}

fn multi_expand_at<B: TestBackend>(r_max: usize) {
    let (t, d_in, d_out) = (INDEX.len(), 5, spec::THREADS + 9);
    let (ld_base, ld_y, ldu) = (d_out + 3, d_out + 1, r_max + 2);
    for &seed in B::SEEDS {
        for (act, adt) in PAIRS {
            let b = B::with_seed(seed);
            let mut d = Dev::new(&b, seed);
            let slots = Slots::new(&mut d, adt, d_in, d_out, r_max);
            let (base_p, basep) = d.random(act, t * ld_base);
            let base: Vec<f64> = (0..t * d_out)
                .map(|e| base_p[(e / d_out) * ld_base + e % d_out])
                .collect();
            let (u_p, up) = d.random(F32, t * ldu);
            let (bias, biasp) = d.random(F32, d_out);
            let (_, index) = d.raw(bytemuck::cast_slice(&INDEX));
            let (err_i, err) = d.raw(&[0u8; 4]);
            let (y_i, yp) = d.output(act, t * ld_y);
            let name = entry("dora_multi_expand", act, adt);
            let label = format!("{name} (r_max {r_max})");
            let args = [
                basep,
                KernelArg::I64(ld_base as i64),
                yp,
                KernelArg::I64(ld_y as i64),
                up,
                KernelArg::I64(ldu as i64),
                index,
                slots.b_ptrs,
                slots.g_ptrs,
                slots.ranks_arg,
                slots.scales,
                int(3),
                int(r_max),
                biasp,
                int(t),
                int(d_out),
                err,
            ];
            d.launch(
                &name,
                [t, d_out.div_ceil(spec::THREADS), 1],
                spec::THREADS,
                0,
                &args,
            );
            let u: Vec<Vec<f64>> = (0..t)
                .map(|tok| {
                    let r = usize::try_from(INDEX[tok])
                        .ok()
                        .and_then(|k| slots.ranks.get(k))
                        .map_or(0, |&r| r as usize);
                    u_p[tok * ldu..tok * ldu + r].to_vec()
                })
                .collect();
            let want = ops::multi_expand(&base, &u, &INDEX, &slots.cpu(), Some(&bias), d_out);
            let y_p = d.read(y_i, act, t * ld_y);
            let y: Vec<f64> = (0..t * d_out)
                .map(|e| y_p[(e / d_out) * ld_y + e % d_out])
                .collect();
            check(&label, &y, &want, act.tolerance());
            assert_eq!(d.read_raw(err_i), [3, 0, 0, 0], "{label}: error word");
        }
    }
}
test_device!(multi_expand);
