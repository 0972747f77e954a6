//! The serving rows of `dorafuse bench --serving`: one module's mixed batch served from an
//! adapter pool ([`AdapterPool`]), against the base GEMM alone, the same batch as plain LoRA
//! through the same kernels, and the naive loop (the single-adapter layer once per adapter
//! segment). Adapter k has rank 8, 16 or 64 (k mod 3).
//!
//! Batches: decode (one token per request, slots in arbitrary order: token i on adapter
//! i mod A) and prefill (A adapters × n tokens, in segments). The naive loop gets the tokens
//! already grouped by adapter (its gather is not timed), so it is favoured. Every row computes
//! the base product itself (`BaseResult::Compute`), as a layer of an engine would.
//!
//! The GPU goal (docs/design.md §2b): a decode batch of 64 tokens over 64 DoRA adapters costs
//! at most [`GOAL`]× the same batch as plain LoRA.

use super::inputs::{tensor, uniform};
use super::measure::{measure_timed, Clock, HostClock, Plan};
use super::stats::{fmt_time, Stats};
use crate::adapter::{AdapterModule, ModuleKind};
use crate::backend::{Backend, Elem};
use crate::case_multi::{AdapterWeights, MultiLayer};
use crate::cpu::gemm::{gemm, View, ViewMut};
use crate::dtype::DType;
use crate::kernels::{AdapterPool, BaseResult, DoraAdapter, DoraLinear, MatShape, SlotIndex};
use crate::layer::Layer;
use crate::markdown::{columns, Table};
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use std::sync::Arc;

/// The GPU goal: DoRA decode (64 tokens, 64 adapters) over LoRA, at most.
pub const GOAL: f64 = 1.10;
/// Ranks of the adapters, adapter k taking `RANKS[k % 3]`.
pub const RANKS: [usize; 3] = [8, 16, 64];

/// One batch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// `"decode"` or `"prefill"`.
    pub kind: &'static str,
    /// Tokens T.
    pub tokens: usize,
    /// Distinct adapters A.
    pub adapters: usize,
}

impl Batch {
    const fn new(kind: &'static str, tokens: usize, adapters: usize) -> Batch {
        Batch {
            kind,
            tokens,
            adapters,
        }
    }
}

/// What a serving run measures: the module, its dtype, the batches.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizes {
    /// d_in, d_out.
    pub dims: (usize, usize),
    /// Activations, weights and adapters.
    pub dtype: DType,
    /// The batches.
    pub batches: Vec<Batch>,
}

fn batches(decode_t: &[usize], decode_a: &[usize], prefill: &[(usize, usize)]) -> Vec<Batch> {
    let mut v = Vec::new();
    for &tokens in decode_t {
        for &adapters in decode_a.iter().filter(|&&a| a <= tokens) {
            v.push(Batch::new("decode", tokens, adapters));
        }
    }
    for &(adapters, n) in prefill {
        v.push(Batch::new("prefill", adapters * n, adapters));
    }
    v
}

impl Sizes {
    /// A GPU: a 4096×4096 projection in bf16; decode 1–256 tokens over 1–64 adapters,
    /// prefill 4–8 adapters × 128–512 tokens.
    pub fn gpu() -> Sizes {
        Sizes {
            dims: (4096, 4096),
            dtype: DType::BF16,
            batches: batches(
                &[1, 16, 64, 256],
                &[1, 8, 64],
                &[(4, 128), (4, 512), (8, 128), (8, 512)],
            ),
        }
    }

    /// The CPU path: the same batches on a 512×512 module in f32 (two cores' worth).
    pub fn cpu() -> Sizes {
        Sizes {
            dims: (512, 512),
            dtype: DType::F32,
            ..Sizes::gpu()
        }
    }

    /// The emulator, scaled down (every GPU thread is a host fiber): a 96×80 module in f32,
    /// decode 1–16 tokens over 1–8 adapters, prefill 4 adapters × 8 tokens.
    pub fn emu() -> Sizes {
        Sizes {
            dims: (96, 80),
            dtype: DType::F32,
            batches: batches(&[1, 8, 16], &[1, 4, 8], &[(4, 8)]),
        }
    }
}

/// The four rows of one batch.
#[derive(Debug, Clone)]
pub struct ServingRow {
    /// The batch.
    pub batch: Batch,
    /// In order: the base GEMM alone, the multi-adapter DoRA layer (pool), the same batch as
    /// plain LoRA through the same kernels, the single-adapter DoRA layer once per segment.
    pub stats: [Stats; 4],
}

/// The slot of each token: decode i mod A (arbitrary order for the kernels), prefill in
/// segments of T/A.
fn index(b: Batch) -> Vec<i32> {
    let per = b.tokens / b.adapters;
    (0..b.tokens)
        .map(|i| match b.kind {
            "decode" => (i % b.adapters) as i32,
            _ => (i / per).min(b.adapters - 1) as i32,
        })
        .collect()
}

/// Tokens of each adapter as contiguous `(first, count)` segments, as the naive loop sees them.
fn segments(b: Batch) -> Vec<(usize, usize)> {
    let counts: Vec<usize> = (0..b.adapters)
        .map(|k| index(b).iter().filter(|&&s| s == k as i32).count())
        .collect();
    let mut first = 0;
    counts
        .iter()
        .map(|&n| {
            first += n;
            (first - n, n)
        })
        .collect()
}

/// Adapter k: A, B, m (DoRA; `None` for the LoRA copy), s.
fn adapter_module(
    rng: &mut SmallRng,
    k: usize,
    dims: (usize, usize),
    dt: DType,
) -> Result<AdapterModule> {
    let (d_in, d_out, r) = (dims.0, dims.1, RANKS[k % 3]);
    let m: Vec<f32> = uniform(rng, d_out, 0.5).iter().map(|v| 1.0 + v).collect();
    Ok(AdapterModule {
        name: format!("adapter{k}"),
        lora_a: tensor(rng, dt, vec![r, d_in], 1.0 / (d_in as f32).sqrt())?,
        lora_b: tensor(rng, dt, vec![d_out, r], 0.1)?,
        magnitude: Some(Tensor::from_f32(DType::F32, vec![d_out], &m)?),
        rank: r,
        alpha: 2.0 * r as f64,
        scaling: 2.0,
        kind: ModuleKind::Linear,
        lora_bias: None,
    })
}

/// The rows of `sizes` on a backend: `main` serves, `side` loads the pools.
///
/// # Errors
/// A device or launch failure, naming the batch.
pub fn run_device<B: Backend, T: Elem>(
    main: Arc<B>,
    side: &B,
    clock: &mut dyn Clock,
    sizes: &Sizes,
    plan: &Plan,
) -> Result<Vec<ServingRow>> {
    let ((d_in, d_out), dt) = (sizes.dims, T::DTYPE);
    let mut rng = SmallRng::seed_from_u64(0x5e71ce);
    let a_max = sizes.batches.iter().map(|b| b.adapters).max().unwrap_or(1);
    let modules = (0..a_max)
        .map(|k| adapter_module(&mut rng, k, sizes.dims, dt))
        .collect::<Result<Vec<_>>>()?;
    let layer = Layer {
        weight: tensor(&mut rng, dt, vec![d_out, d_in], 1.0 / (d_in as f32).sqrt())?,
        bias: Some(tensor(&mut rng, DType::F32, vec![d_out], 0.5)?),
        lora_a: modules[0].lora_a.clone(),
        lora_b: modules[0].lora_b.clone(),
        magnitude: None,
        scaling: 1.0,
        fan_in_fan_out: false,
    };
    let linear = DoraLinear::upload(main.clone(), &layer)?;
    let mut dora = AdapterPool::new(&linear, a_max, 64, dt)?;
    let mut lora = AdapterPool::new(&linear, a_max, 64, dt)?;
    let mut naive = Vec::new();
    for (k, m) in modules.iter().enumerate() {
        dora.load(&linear, side, k, DoraAdapter::upload(side, m, dt)?)?;
        let plain = AdapterModule {
            magnitude: None,
            ..m.clone()
        };
        lora.load(&linear, side, k, DoraAdapter::upload(side, &plain, dt)?)?;
        let mut a = DoraAdapter::upload(&*main, m, dt)?;
        a.compute_scale(&linear)?;
        naive.push(a);
    }
    side.synchronize()?;
    let mut rows = Vec::new();
    for &b in &sizes.batches {
        let t = b.tokens;
        let x = main.upload_slice::<T>(bytemuck::cast_slice(
            tensor(&mut rng, dt, vec![t, d_in], 1.0)?.as_bytes(),
        ))?;
        let mut y = main.alloc_slice::<T>(t * d_out)?;
        let mut ib = main.alloc_zeroed(4 * t)?;
        main.upload(&mut ib, bytemuck::cast_slice(&index(b)))?;
        let ws_len = dora.workspace_len(t).max(linear.workspace_len(t, 64));
        let mut ws = main.alloc_slice::<f32>(ws_len)?;
        let segs = segments(b);
        let stats = {
            let idx = SlotIndex::from_buffer(&*main, &ib, t)?;
            let xv = main.view(&x, MatShape::new(t, d_in));
            let mut yv = main.view_mut(&mut y, MatShape::new(t, d_out));
            let mut wv = main.view_mut(&mut ws, MatShape::new(1, ws_len));
            measure_timed(clock, plan, 1, 4, |k, _| match k {
                0 => linear.base_product(&xv, &mut yv),
                1 | 2 => {
                    let p = if k == 1 { &dora } else { &lora };
                    p.forward(&linear, &xv, &idx, BaseResult::Compute, &mut yv, &mut wv)
                }
                _ => segs.iter().zip(&naive).try_for_each(|(&(s0, n), a)| {
                    let xs = xv.rows(s0, n)?;
                    let mut ys = yv.rows(s0, n)?;
                    linear.forward_with_workspace(a, &xs, BaseResult::Compute, &mut ys, &mut wv)
                }),
            })
            .with_context(|| format!("serving rows, {} T={t} A={}", b.kind, b.adapters))?
        };
        dora.check_errors()?;
        rows.push(ServingRow {
            batch: b,
            stats: stats.try_into().expect("four rows"),
        });
    }
    Ok(rows)
}

/// `out[t, d_out] = x·Wᵀ` on the CPU (the base GEMM).
fn cpu_base(x: &[f32], w: &[f32], (t, d_in, d_out): (usize, usize, usize), out: &mut [f32]) {
    let wv = View::new(w, d_out, d_in);
    gemm(
        1.0,
        View::new(x, t, d_in),
        wv.t(),
        0.0,
        ViewMut::new(out, t, d_out),
    );
}

/// The rows of `sizes` on the CPU path (f32): base GEMM, then `cpu::multi::forward_on_base`
/// with g computed once (untimed), per batch or per adapter segment.
///
/// # Errors
/// A failure of the CPU path, naming the batch.
pub fn run_cpu(sizes: &Sizes, plan: &Plan) -> Result<Vec<ServingRow>> {
    use crate::cpu::multi::{forward_on_base, magnitude_scales};
    let (d_in, d_out) = sizes.dims;
    let mut rng = SmallRng::seed_from_u64(0x5e7);
    let a_max = sizes.batches.iter().map(|b| b.adapters).max().unwrap_or(1);
    let weight = tensor(
        &mut rng,
        DType::F32,
        vec![d_out, d_in],
        1.0 / (d_in as f32).sqrt(),
    )?;
    let w = weight.to_f32();
    let adapters = (0..a_max)
        .map(|k| {
            let m = adapter_module(&mut rng, k, sizes.dims, DType::F32)?;
            Ok(AdapterWeights {
                lora_a: m.lora_a,
                lora_b: m.lora_b,
                magnitude: m.magnitude,
                scaling: m.scaling,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let layer = |adapters: Vec<AdapterWeights>| MultiLayer {
        weight: weight.clone(),
        bias: None,
        fan_in_fan_out: false,
        adapters,
    };
    let dora = layer(adapters.clone());
    let lora = layer(
        adapters
            .iter()
            .map(|a| AdapterWeights {
                magnitude: None,
                ..a.clone()
            })
            .collect(),
    );
    let singles: Vec<MultiLayer> = adapters.iter().map(|a| layer(vec![a.clone()])).collect();
    let (gd, gl) = (magnitude_scales(&dora)?, magnitude_scales(&lora)?);
    let gs = singles
        .iter()
        .map(magnitude_scales)
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for &b in &sizes.batches {
        let t = b.tokens;
        let x = tensor(&mut rng, DType::F32, vec![t, d_in], 1.0)?;
        let xf = x.to_f32();
        let idx = index(b);
        let segs: Vec<(Tensor, usize)> = segments(b)
            .iter()
            .map(|&(s0, n)| {
                Ok((
                    Tensor::from_f32(DType::F32, vec![n, d_in], &xf[s0 * d_in..(s0 + n) * d_in])?,
                    n,
                ))
            })
            .collect::<Result<_>>()?;
        let mut base = vec![0f32; t * d_out];
        let zeros = vec![0i32; t];
        let stats = measure_timed(&mut HostClock, plan, 1, 4, |k, _| {
            match k {
                0 => cpu_base(&xf, &w, (t, d_in, d_out), &mut base),
                1 | 2 => {
                    cpu_base(&xf, &w, (t, d_in, d_out), &mut base);
                    let (l, g) = if k == 1 { (&dora, &gd) } else { (&lora, &gl) };
                    forward_on_base(l, &x, &idx, &base, g)?;
                }
                _ => {
                    for ((xs, n), (l, g)) in segs.iter().zip(singles.iter().zip(&gs)) {
                        let xv = xs.to_f32();
                        cpu_base(&xv, &w, (*n, d_in, d_out), &mut base[..n * d_out]);
                        forward_on_base(l, xs, &zeros[..*n], &base[..n * d_out], g)?;
                    }
                }
            }
            Ok(())
        })
        .with_context(|| format!("serving rows, {} T={t} A={}", b.kind, b.adapters))?;
        rows.push(ServingRow {
            batch: b,
            stats: stats.try_into().expect("four rows"),
        });
    }
    Ok(rows)
}

/// The table: one line per batch, medians, and the ratios the goal is stated in.
pub fn table(rows: &[ServingRow]) -> Table {
    let rows = rows.iter().map(|r| {
        let [base, dora, lora, naive] = r.stats.map(|s| s.median_s);
        let b = r.batch;
        let mut v = vec![
            b.kind.to_string(),
            b.tokens.to_string(),
            b.adapters.to_string(),
        ];
        v.extend([base, dora, lora, naive].map(fmt_time));
        v.extend([dora / lora, dora / base, naive / dora].map(|q| format!("{q:.2}×")));
        v
    });
    Table {
        header: columns(
            "batch|T|adapters|base GEMM|DoRA pool|LoRA pool|naive loop|DoRA/LoRA|DoRA/base|naive/DoRA",
        ),
        rows: rows.collect(),
    }
}

/// The goal line: the decode batch of 64 tokens over 64 adapters, DoRA over LoRA, against
/// [`GOAL`] (a verdict only on a GPU, `on_gpu`).
pub fn goal_line(rows: &[ServingRow], on_gpu: bool) -> String {
    let r = rows
        .iter()
        .find(|r| r.batch.kind == "decode" && r.batch.tokens == 64 && r.batch.adapters == 64);
    match r {
        None => format!("GPU goal: decode T=64 over 64 DoRA adapters ≤ {GOAL:.2}× plain LoRA (batch not in this run)"),
        Some(r) => {
            let q = r.stats[1].median_s / r.stats[2].median_s;
            let verdict = match (on_gpu, q <= GOAL) {
                (false, _) => "not a GPU: no verdict",
                (true, true) => "met",
                (true, false) => "missed",
            };
            format!("GPU goal: decode T=64 over 64 DoRA adapters ≤ {GOAL:.2}× plain LoRA: {q:.2}× ({verdict})")
        }
    }
}

/// Runs the serving rows on `device` (`"cuda"`: GPU 0, bf16; `"cpu"`; `"emu"`: scaled down),
/// `reps` timed runs per row if given. Returns the text for the terminal and the Markdown
/// body for BENCHMARKS.md (both with the goal line).
///
/// # Errors
/// No such device, or a failure in a row.
pub fn run(device: &str, reps: Option<usize>) -> Result<(String, String)> {
    let fixed = |p: Plan| reps.map_or(p, |n| Plan::fixed(p.warmup, n));
    let (rows, sizes, note) = match device {
        "cuda" => {
            let main = Arc::new(crate::cuda::CudaBackend::new(0)?);
            let stream = main.context().new_stream().context("a side CUDA stream")?;
            let side = crate::cuda::CudaBackend::from_stream(stream)?;
            let mut clock = super::cuda::CudaClock::new(&main, 0)?;
            let sizes = Sizes::gpu();
            let plan = fixed(Plan::new(5, 20, 100, 0.05));
            let rows = run_device::<_, half::bf16>(main.clone(), &side, &mut clock, &sizes, &plan)?;
            let note = format!(
                "{}; CUDA events, L2 not flushed (a serving loop keeps it warm)",
                main.device_description()?
            );
            (rows, sizes, note)
        }
        "emu" => {
            let main = Arc::new(crate::emu::EmuBackend::from_env()?);
            let side = main.new_stream();
            let sizes = Sizes::emu();
            let plan = fixed(Plan::new(1, 2, 2, 0.0));
            let rows = run_device::<_, f32>(main.clone(), &side, &mut HostClock, &sizes, &plan)?;
            (rows, sizes, "the CUDA kernels on the CPU emulator, scaled down; emulator times say nothing about GPU speed".into())
        }
        "cpu" => {
            let sizes = Sizes::cpu();
            let plan = fixed(Plan::new(1, 3, 10, 0.2));
            (
                run_cpu(&sizes, &plan)?,
                sizes,
                "the CPU path (f32), host clock".into(),
            )
        }
        other => anyhow::bail!("serving rows: no device {other:?} (cuda, cpu or emu)"),
    };
    let head = format!(
        "Serving rows on {device}: {note}. Module {}x{} {}, adapter ranks {RANKS:?} (k mod 3), medians.",
        sizes.dims.0, sizes.dims.1, sizes.dtype
    );
    let goal = goal_line(&rows, device == "cuda");
    let t = table(&rows);
    Ok((
        format!("{head}\n{}{goal}\n", t.to_text()),
        format!("{head}\n\n{}\n{goal}\n", t.to_markdown()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_the_stated_sizes_and_segments_every_token() {
        let gpu = Sizes::gpu();
        assert!(gpu.batches.contains(&Batch::new("decode", 64, 64)));
        assert!(gpu.batches.iter().all(|b| b.adapters <= b.tokens));
        let sizes = [Sizes::emu().batches, Sizes::cpu().batches].concat();
        for b in sizes.into_iter().chain(gpu.batches) {
            let idx = index(b);
            let segs = segments(b);
            assert_eq!(segs.len(), b.adapters, "{b:?}");
            assert_eq!(segs.iter().map(|s| s.1).sum::<usize>(), b.tokens, "{b:?}");
            for (k, &(_, n)) in segs.iter().enumerate() {
                assert!(n >= 1, "{b:?}: adapter {k} has no token");
                assert_eq!(idx.iter().filter(|&&s| s == k as i32).count(), n, "{b:?}");
            }
        }
    }

    #[test]
    fn the_goal_line_gives_a_verdict_on_a_gpu_only() {
        let s = |t: f64| Stats::from_samples(&[t]).unwrap();
        let r = |dora: f64| ServingRow {
            batch: Batch::new("decode", 64, 64),
            stats: [s(1.0), s(dora), s(1.0), s(3.0)],
        };
        assert!(goal_line(&[r(1.05)], true).ends_with("1.05× (met)"));
        assert!(goal_line(&[r(1.2)], true).ends_with("1.20× (missed)"));
        assert!(goal_line(&[r(1.2)], false).contains("no verdict"));
        assert!(goal_line(&[], true).contains("not in this run"));
    }
}
