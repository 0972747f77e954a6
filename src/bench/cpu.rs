//! The CPU target: dorafuse's CPU path (`cpu::forward`, `cpu::run`, `cpu::magnitude_scale`),
//! the GEMM crate alone as the base layer (the floor), and PEFT's unfused DoRA through the
//! GEMM crate, all in f32 arithmetic from tensors in their stored dtype (a bf16 row pays its
//! conversions in every implementation alike); and the CPU ceilings (copy bandwidth and the
//! GEMM crate's large sgemm rate).

use super::inputs::{random_set, uniform, InputSet};
use super::measure::{rate, HostClock};
use super::report::{host_cpu, imp, load_average, load_note, Ceilings, Report};
use super::runner::{self, Config, Layer, Machine, RowSpec, Target, WithLayer};
use super::unfused::{self, Passes, T};
use crate::cpu::gemm::{gemm, View, ViewMut};
use crate::dtype::DType;
use crate::formula::{LayerKind, Op};
use crate::layer::{GradMode, Shape, NORM_EPS};
use crate::tensor::{Tensor, TensorData};
use anyhow::{bail, Context, Result};
use std::borrow::Cow;
use std::hint::black_box;

/// The input sets of one shape together exceed this many bytes: twice a 256 MiB last-level
/// cache, more than the CPUs this runs on have.
const ROTATE_BYTES: usize = 512 << 20;
/// At most this many input sets (memory: 12 sets of a 4096×4096 f32 layer are 0.8 GiB).
const MAX_SETS: usize = 12;

/// The tensor's values as f32: borrowed when already f32, converted otherwise.
fn f32_of(t: &Tensor) -> Cow<'_, [f32]> {
    match t.data() {
        TensorData::F32(v) => Cow::Borrowed(v.as_slice()),
        _ => Cow::Owned(t.to_f32()),
    }
}

/// `op(x)` as a `[rows, cols]` view of `data`: `x` itself, or (with `trans`) the transpose
/// of `x` stored `[cols, rows]`.
fn view(data: &[f32], rows: usize, cols: usize, trans: bool) -> View<'_, f32> {
    if trans {
        View::new(&data[..rows * cols], cols, rows).t()
    } else {
        View::new(&data[..rows * cols], rows, cols)
    }
}

/// The unfused passes on the CPU: inputs borrowed from the set (converted to f32 when
/// stored narrower), intermediates in f32 vectors sized for the largest T.
struct CpuPasses<'a> {
    /// The layer (and full-T inputs) of the set.
    set: &'a InputSet,
    /// x `[T, d_in]`, the first T tokens.
    x: &'a Tensor,
    /// dy `[T, d_out]`.
    dy: &'a Tensor,
    /// The intermediates, indexed by `T as usize`, each of `unfused::len` at the largest T.
    tmp: &'a mut [Vec<f32>],
}

/// Zeroed intermediates of the unfused graph at shape `s` (for [`CpuPasses::tmp`]).
fn temporaries(s: Shape) -> Vec<Vec<f32>> {
    let mut tmp = vec![Vec::new(); T::GradM as usize + 1];
    for t in unfused::TEMPORARIES {
        tmp[t as usize] = vec![0.0; unfused::len(t, s)];
    }
    tmp
}

impl CpuPasses<'_> {
    fn get(&self, t: T) -> Result<Cow<'_, [f32]>> {
        let l = &self.set.layer;
        Ok(match t {
            T::W => f32_of(&l.weight),
            T::A => f32_of(&l.lora_a),
            T::B => f32_of(&l.lora_b),
            T::M => f32_of(
                l.magnitude
                    .as_ref()
                    .context("unfused DoRA needs a magnitude")?,
            ),
            T::X => f32_of(self.x),
            T::Dy => f32_of(self.dy),
            _ => Cow::Borrowed(&self.tmp[t as usize]),
        })
    }

    /// Runs `f(out, inputs)` with `out` taken out of the temporaries for the call.
    fn with_out<const N: usize>(
        &mut self,
        out: T,
        ins: [T; N],
        f: impl FnOnce(&mut [f32], [&[f32]; N]),
    ) -> Result<()> {
        let mut o = std::mem::take(&mut self.tmp[out as usize]);
        let got = ins.map(|t| self.get(t));
        let res = (|| {
            let views: Vec<Cow<'_, [f32]>> = got.into_iter().collect::<Result<_>>()?;
            f(&mut o, std::array::from_fn(|k| &views[k][..]));
            Ok(())
        })();
        self.tmp[out as usize] = o;
        res
    }
}

impl Passes for CpuPasses<'_> {
    fn gemm(
        &mut self,
        (m, n, k): (usize, usize, usize),
        a: (T, bool),
        b: (T, bool),
        c: T,
        beta: f32,
    ) -> Result<()> {
        self.with_out(c, [a.0, b.0], |c, [av, bv]| {
            let c = ViewMut::new(&mut c[..m * n], m, n);
            gemm(1.0, view(av, m, k, a.1), view(bv, k, n, b.1), beta, c);
        })
    }

    fn axpby(&mut self, out: T, a: T, b: T, (alpha, beta): (f32, f32), n: usize) -> Result<()> {
        self.with_out(out, [a, b], |o, [a, b]| {
            for ((o, a), b) in o[..n].iter_mut().zip(a).zip(b) {
                *o = alpha * a + beta * b;
            }
        })
    }

    fn scale_cols(
        &mut self,
        out: T,
        a: T,
        (shift, alpha): (f32, f32),
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        self.with_out(out, [a, T::G], |o, [a, g]| {
            for (o, a) in o[..rows * cols].chunks_mut(cols).zip(a.chunks(cols)) {
                for ((o, a), g) in o.iter_mut().zip(a).zip(g) {
                    *o = alpha * (g + shift) * a;
                }
            }
        })
    }

    fn row_norm(&mut self, rows: usize, cols: usize) -> Result<()> {
        self.with_out(T::N, [T::V], |n, [v]| {
            for (n, v) in n[..rows].iter_mut().zip(v.chunks(cols)) {
                *n = v.iter().map(|v| v * v).sum::<f32>().sqrt();
            }
        })?;
        self.with_out(T::G, [T::M, T::N], |g, [m, n]| {
            for ((g, m), n) in g[..rows].iter_mut().zip(m).zip(n) {
                *g = m / n.max(NORM_EPS as f32);
            }
        })
    }

    fn col_dot(&mut self, out: T, a: T, b: T, rows: usize, cols: usize) -> Result<()> {
        self.with_out(out, [a, b, T::N], |o, [a, b, n]| {
            o[..cols].fill(0.0);
            for (a, b) in a[..rows * cols].chunks(cols).zip(b.chunks(cols)) {
                for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                    *o += a * b;
                }
            }
            for (o, n) in o[..cols].iter_mut().zip(n) {
                *o /= n.max(NORM_EPS as f32);
            }
        })
    }
}

/// Whether the CPU target has `row`: everything but the `compose` kernel and the separate
/// backward (the CPU path runs forward and backward as one call).
pub fn has(row: RowSpec) -> bool {
    !matches!(row.op, Op::Compose | Op::Backward)
}

/// The CPU target (see the module documentation).
#[derive(Debug, Default)]
pub struct CpuTarget;

/// One shape on the CPU: the sets at the largest T, their first `t` tokens, cached g per set,
/// and the unfused graph's temporaries.
struct CpuLayer {
    full: Shape,
    sets: Vec<InputSet>,
    cut: Vec<(Tensor, Tensor)>,
    gs: Vec<Vec<f32>>,
    tmp: Vec<Vec<f32>>,
    t: usize,
}

/// The first `t` rows of a `[T, cols]` tensor.
fn first_tokens(x: &Tensor, t: usize) -> Result<Tensor> {
    let cols = x.shape()[1];
    let bytes = &x.as_bytes()[..t * cols * x.dtype().size()];
    Tensor::from_bytes(x.dtype(), vec![t, cols], bytes)
}

impl CpuLayer {
    fn passes(&mut self, i: usize) -> CpuPasses<'_> {
        CpuPasses {
            set: &self.sets[i],
            x: &self.cut[i].0,
            dy: &self.cut[i].1,
            tmp: &mut self.tmp,
        }
    }

    /// The named f32 results as tensors of the layer dtype, as a layer call returns them.
    fn outputs(&self, names: &[T]) -> Result<()> {
        let s = Shape {
            t: self.t,
            ..self.full
        };
        for &n in names {
            let dt = if n == T::GradM {
                DType::F32
            } else {
                self.sets[0].x.dtype()
            };
            let v = &self.tmp[n as usize][..unfused::len(n, s)];
            black_box(Tensor::from_f32(dt, vec![v.len()], v)?);
        }
        Ok(())
    }
}

impl Layer for CpuLayer {
    fn tokens(&mut self, t: usize) -> Result<()> {
        self.t = t;
        self.cut = (self.sets.iter())
            .map(|s| Ok((first_tokens(&s.x, t)?, first_tokens(&s.dy, t)?)))
            .collect::<Result<_>>()?;
        if self.gs.is_empty() {
            self.gs = (self.sets.iter())
                .map(|s| crate::cpu::magnitude_scale(&s.layer)?.context("a DoRA layer"))
                .collect::<Result<_>>()?;
        }
        Ok(())
    }

    fn call(&mut self, row: RowSpec, i: usize) -> Result<()> {
        let s = Shape {
            t: self.t,
            ..self.full
        };
        let scaling = self.sets[i].layer.scaling as f32;
        let (x, dy) = (&self.cut[i].0, &self.cut[i].1);
        match (row.implementation, row.kind, row.op) {
            (imp::UNFUSED | imp::BASE, _, op) => {
                let is_base = row.implementation == imp::BASE;
                let outs = unfused::row(&mut self.passes(i), s, scaling, is_base, op)?;
                self.outputs(outs)?;
            }
            (imp::DORAFUSE, kind, op) => {
                let set = &mut self.sets[i];
                // Plain LoRA is the same layer without its magnitude.
                let m = if kind == LayerKind::Lora {
                    set.layer.magnitude.take()
                } else {
                    None
                };
                let l = &set.layer;
                let res = match op {
                    Op::Norm => crate::cpu::magnitude_scale(l).map(|g| drop(black_box(g))),
                    Op::Forward => crate::cpu::forward(l, x).map(|y| drop(black_box(y))),
                    Op::Inference => crate::cpu::forward_with_scale(l, x, Some(&self.gs[i]))
                        .map(|y| drop(black_box(y))),
                    _ => crate::cpu::run(l, x, Some(dy), GradMode::Detached)
                        .map(|o| drop(black_box(o))),
                };
                if m.is_some() {
                    set.layer.magnitude = m;
                }
                res?;
            }
            _ => bail!("no CPU implementation of this row"),
        }
        Ok(())
    }

    fn extra_mem(&self, row: RowSpec) -> Option<(u64, String)> {
        (row.implementation == imp::UNFUSED).then(|| {
            let s = Shape {
                t: self.t,
                ..self.full
            };
            let what = "allocated temporaries of PEFT's graph (f32)";
            (unfused::extra_bytes(row.op, s, 4), what.to_string())
        })
    }
}

impl Target for CpuTarget {
    fn has(&self, row: RowSpec) -> bool {
        has(row)
    }

    fn with_layer(&self, full: Shape, dtype: DType, sets: usize, f: WithLayer) -> Result<()> {
        let mut layer = CpuLayer {
            full,
            sets: (0..sets)
                .map(|k| random_set(full, dtype, 1000 + k as u64))
                .collect::<Result<_>>()?,
            cut: Vec::new(),
            gs: Vec::new(),
            tmp: temporaries(full),
            t: 0,
        };
        f(&mut layer)
    }
}

/// The CPU ceilings, each the median of a few runs after one warm-up: the copy bandwidth
/// (bytes read plus bytes written, as the formulas count them) of 256 MiB copied between two
/// buffers split over every core, and the GEMM crate's sgemm rate on a 2048³ product.
///
/// # Errors
/// A broken clock.
pub fn ceilings() -> Result<Ceilings> {
    let (bytes, n, threads) = (256usize << 20, 2048, host_cpu().units.unwrap_or(1));
    // Non-zero data, first-touched before timing.
    let src: Vec<f32> = (0..bytes / 4).map(|i| (i % 251) as f32 + 0.5).collect();
    let mut dst = vec![1f32; bytes / 4];
    let per = src.len().div_ceil(threads as usize);
    let copy = rate(&mut HostClock, (1, 5), 2.0 * bytes as f64, || {
        std::thread::scope(|sc| {
            for (d, s) in dst.chunks_mut(per).zip(src.chunks(per)) {
                sc.spawn(move || d.copy_from_slice(s));
            }
        });
        black_box(&mut dst);
        Ok(())
    })?;
    let rng = &mut <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(0x5eed);
    let (a, b) = (uniform(rng, n * n, 1.0), uniform(rng, n * n, 1.0));
    let mut c = vec![0f32; n * n];
    let flops = 2.0 * (n as f64).powi(3);
    let sgemm = rate(&mut HostClock, (1, 3), flops, || {
        let cv = ViewMut::new(&mut c, n, n);
        gemm(1.0, view(&a, n, n, false), view(&b, n, n, false), 0.0, cv);
        Ok(())
    })?;
    Ok(Ceilings {
        copy_gbps: copy / 1e9,
        copy_method: format!(
            "copy_from_slice of 256 MiB split over {threads} threads, read + write bytes, median of 5"
        ),
        gemm_tflops: sgemm / 1e12,
        gemm_dtype: "f32".into(),
        gemm_method: format!("matrixmultiply sgemm {n}x{n}x{n}, median of 3"),
    })
}

/// Runs `cfg` on the CPU with the host clock: ceilings first, then every row the CPU target
/// has. `progress` gets a label before each row.
///
/// # Errors
/// A failure of any implementation, naming the row.
pub fn run_cpu(cfg: &Config, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    runner::check_ops(&CpuTarget, "cpu", cfg)?;
    progress("measuring CPU ceilings (copy bandwidth, sgemm)");
    let ceilings = ceilings()?;
    let before = load_average();
    let machine = Machine {
        clock: &mut HostClock,
        device: host_cpu(),
        ceilings: Some(ceilings),
        rotate_bytes: ROTATE_BYTES,
        max_sets: MAX_SETS,
        cache_policy: format!(
            "the rows of each shape and T interleaved round by round; input sets rotated so \
             together they exceed {} MiB (at most {MAX_SETS} sets)",
            ROTATE_BYTES >> 20
        ),
        notes: vec![
            "CPU timings: the CPU path and the GEMM crate (matrixmultiply) in f32 \
                     arithmetic; they say nothing about GPU speed"
                .into(),
        ],
    };
    let mut rep = runner::run(&CpuTarget, machine, cfg, progress)?;
    rep.notes.extend(load_note(before));
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Outputs;

    #[test]
    fn unfused_matches_the_cpu_path() {
        // PEFT's graph through the CPU passes against the CPU path (itself held against
        // float64 truth in cpu::reference), off every tile, in every dtype.
        let s = Shape {
            t: 7,
            d_in: 33,
            d_out: 19,
            r: 3,
        };
        for (dt, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-3), (DType::BF16, 1e-2)] {
            let set = random_set(s, dt, 11).unwrap();
            let mut tmp = temporaries(s);
            let (x, dy) = (&set.x, &set.dy);
            let p = &mut CpuPasses {
                set: &set,
                x,
                dy,
                tmp: &mut tmp,
            };
            unfused::forward(p, s, 2.0).unwrap();
            unfused::backward(p, s, 2.0).unwrap();
            let Outputs { y, grads } =
                crate::cpu::run(&set.layer, x, Some(dy), GradMode::Detached).unwrap();
            let g = grads.unwrap();
            let to64 = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
            for (name, got, want) in [
                ("y", T::Y, y),
                ("grad_x", T::GradX, g.grad_x),
                ("grad_A", T::GradA, g.grad_lora_a),
                ("grad_B", T::GradB, g.grad_lora_b),
                ("grad_m", T::GradM, g.grad_magnitude.unwrap()),
            ] {
                let got = to64(&tmp[got as usize][..unfused::len(got, s)]);
                let e = crate::tensor::rel_l2(&got, &want.to_f64());
                assert!(e < tol, "{name} {dt}: rel-L2 {e:e} ≥ {tol:e}");
            }
        }
    }
}
