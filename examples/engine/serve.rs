//! The engine side of docs/engine.md, generic over the backend: the same code runs on a GPU
//! (`main.rs`, through `scripts/gpu-check.sh`) and on the emulator (`tests/kernels/engine_example.rs`,
//! in `cargo test`). No `unsafe`.
//!
//! An attention block's q, k and v projections as an engine serves them: one fused QKV GEMM
//! into the engine's buffer, then each projection's DoRA finished in place on its columns, with
//! the adapter of the request (two adapters loaded from PEFT directories, their g computed once
//! at load), a workspace planned for the largest batch, and nothing allocated per call.

use anyhow::{ensure, Context, Result};
use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel};
use dorafuse::backend::{Backend, DeviceMemory};
use dorafuse::dtype::DType;
use dorafuse::kernels::{download_tensor, BaseResult, DoraAdapter, DoraLinear, MatShape};
use dorafuse::tensor::{rel_l2, Tensor};
use half::bf16;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The projections of the block, in the fused QKV output's column order.
pub const MODULES: [&str; 3] = ["attn.q_proj", "attn.k_proj", "attn.v_proj"];

/// The fixture PEFT generated (tests/fixtures/gen_engine.py): base model and two adapters.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/engine")
}

/// One projection: its layer, where its columns start in the fused output, and one adapter
/// per loaded adapter (`None` where that adapter leaves the module alone).
struct Projection<B: Backend> {
    layer: DoraLinear<B>,
    column: usize,
    adapters: Vec<Option<DoraAdapter<B>>>,
}

/// An attention block's QKV as an engine holds it.
pub struct Qkv<B: Backend> {
    backend: Arc<B>,
    /// `[Wq; Wk; Wv]` `[d_q + d_k + d_v, d_model]`: the engine's own fused GEMM (here through
    /// [`DoraLinear::base_product`]; an engine calls its cuBLAS or CUTLASS GEMM).
    fused: DoraLinear<B>,
    projections: Vec<Projection<B>>,
    adapter_names: Vec<String>,
    /// Planned once for `max_tokens` and the largest rank (DoraLinear::workspace_len).
    workspace: B::Slice<f32>,
    d_model: usize,
    d_qkv: usize,
    max_tokens: usize,
}

/// `name`'s tensor from the base model as bf16 on the device, shared through an `Arc`.
fn upload_bf16<B: Backend>(b: &B, t: &Tensor) -> Result<Arc<B::Slice<bf16>>> {
    let host: Vec<bf16> = t.to_f32().into_iter().map(bf16::from_f32).collect();
    Ok(Arc::new(b.upload_slice(&host)?))
}

impl<B: Backend> Qkv<B> {
    /// Loads the base weights and every adapter, uploads them and computes each adapter's g
    /// once, on `backend`'s stream.
    ///
    /// # Errors
    /// A missing file or module, or a device error.
    pub fn load(
        backend: Arc<B>,
        base_dir: &Path,
        adapters: &[(&str, &Path)],
        max_tokens: usize,
    ) -> Result<Qkv<B>> {
        let base = BaseModel::open(base_dir)?;
        let loaded: Vec<Adapter> = adapters
            .iter()
            .map(|(_, dir)| Adapter::load(dir))
            .collect::<Result<_>>()?;
        let mut fused_rows: Vec<f32> = Vec::new();
        let mut projections = Vec::new();
        let (mut column, mut d_model, mut max_rank) = (0, 0, 1);
        for name in MODULES {
            let w = base.tensor(&format!("{name}.weight"))?;
            let (d_out, d_in) = (w.shape()[0], w.shape()[1]);
            d_model = d_in;
            fused_rows.extend(w.to_f32());
            let bias_name = format!("{name}.bias");
            let bias = if base.tensors.contains_key(&bias_name) {
                let b = base.tensor(&bias_name)?;
                Some(Arc::new(backend.upload_slice(&b.to_f32())?))
            } else {
                None
            };
            let layer = DoraLinear::new(
                backend.clone(),
                upload_bf16(&*backend, &w)?,
                bias,
                d_out,
                d_in,
                false,
            )
            .with_context(|| name.to_string())?;
            let mut per_adapter = Vec::new();
            for a in &loaded {
                per_adapter.push(match a.modules.get(name) {
                    Some(m) => {
                        // PEFT's default: f32 factors beside the bf16 weight.
                        let mut ad = DoraAdapter::upload(&*backend, m, DType::F32)?;
                        ad.compute_scale(&layer).with_context(|| name.to_string())?;
                        max_rank = max_rank.max(ad.rank());
                        Some(ad)
                    }
                    None => {
                        // The fused GEMM carries no bias: an unadapted module with a bias would
                        // need the engine to add it, which this example does not do.
                        ensure!(
                            !base.tensors.contains_key(&format!("{name}.bias")),
                            "{name}: has a bias but no adapter"
                        );
                        None
                    }
                });
            }
            projections.push(Projection {
                layer,
                column,
                adapters: per_adapter,
            });
            column += d_out;
        }
        let d_qkv = column;
        let fused_host = Tensor::from_f32(DType::BF16, vec![d_qkv, d_model], &fused_rows)?;
        let fused = DoraLinear::new(
            backend.clone(),
            upload_bf16(&*backend, &fused_host)?,
            None,
            d_qkv,
            d_model,
            false,
        )?;
        let ws_len = projections
            .iter()
            .map(|p| p.layer.workspace_len(max_tokens, max_rank))
            .max()
            .unwrap_or(1);
        let workspace = backend.alloc_slice::<f32>(ws_len)?;
        Ok(Qkv {
            backend,
            fused,
            projections,
            adapter_names: adapters.iter().map(|(n, _)| n.to_string()).collect(),
            workspace,
            d_model,
            d_qkv,
            max_tokens,
        })
    }

    /// Width of the fused QKV output.
    pub fn d_qkv(&self) -> usize {
        self.d_qkv
    }

    /// Width of the hidden states.
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// `qkv[t, d_qkv] = x[t, d_model]·[Wq; Wk; Wv]ᵀ` with `adapter`'s DoRA applied to each
    /// projection it adapts, finished in place in the engine's buffer. Stream-ordered: nothing
    /// here waits for the device.
    ///
    /// # Errors
    /// An unknown adapter, too many tokens, or a failing call (naming the tensor or kernel).
    pub fn forward(
        &mut self,
        adapter: &str,
        x: &B::Slice<bf16>,
        t: usize,
        qkv: &mut B::Slice<bf16>,
    ) -> Result<()> {
        let which = self
            .adapter_names
            .iter()
            .position(|n| n == adapter)
            .with_context(|| format!("no adapter {adapter:?} loaded"))?;
        ensure!(
            t <= self.max_tokens,
            "{t} tokens; planned for {}",
            self.max_tokens
        );
        let b = &*self.backend;
        let xv = b.view(x, MatShape::new(t, self.d_model));
        let mut out = b.view_mut(qkv, MatShape::new(t, self.d_qkv));
        let ws_len = self.workspace.info().len;
        let mut ws = b.view_mut(&mut self.workspace, MatShape::new(1, ws_len));
        // The engine's fused GEMM (bias-free).
        self.fused.base_product(&xv, &mut out)?;
        for p in &self.projections {
            let Some(ad) = &p.adapters[which] else {
                continue;
            };
            let mut cols = out.columns(p.column, p.layer.d_out())?;
            p.layer
                .forward_with_workspace(ad, &xv, BaseResult::InPlace, &mut cols, &mut ws)?;
        }
        Ok(())
    }
}

/// Deterministic bf16 hidden states `[t, d_model]`, as an engine's previous layer leaves them.
pub fn hidden_states(t: usize, d_model: usize, seed: u32) -> Vec<bf16> {
    (0..t * d_model)
        .map(|i| {
            let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32;
            bf16::from_f32(2.0 * v - 1.0)
        })
        .collect()
}

/// The same block through the CPU path (`dorafuse::cpu::forward` on the layers PEFT's loader
/// gives, g computed by the CPU norm): `[t, d_qkv]` bf16 for `adapter_dir`, modules it leaves
/// alone being the base product alone.
///
/// # Errors
/// A missing file or module.
pub fn cpu_reference(base_dir: &Path, adapter_dir: &Path, x: &[bf16], t: usize) -> Result<Tensor> {
    let base = BaseModel::open(base_dir)?;
    let adapter = Adapter::load(adapter_dir)?;
    let model = AdaptedModel::new(&base, &adapter)?;
    let d_model = x.len() / t;
    let xt = Tensor::from_f32(
        DType::BF16,
        vec![t, d_model],
        &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
    )?;
    let mut cols: Vec<Vec<f32>> = Vec::new();
    for name in MODULES {
        let y = if adapter.modules.contains_key(name) {
            dorafuse::cpu::forward(&model.layer(name)?, &xt)?
        } else {
            // A LoRA layer whose B is zero is the base layer alone.
            let w = base.tensor(&format!("{name}.weight"))?;
            let d_out = w.shape()[0];
            let plain = dorafuse::layer::Layer {
                weight: w,
                bias: None,
                lora_a: Tensor::from_f32(DType::F32, vec![1, d_model], &vec![0.0; d_model])?,
                lora_b: Tensor::from_f32(DType::F32, vec![d_out, 1], &vec![0.0; d_out])?,
                magnitude: None,
                scaling: 1.0,
                fan_in_fan_out: false,
            };
            dorafuse::cpu::forward(&plain, &xt)?
        };
        cols.push(y.to_f32());
    }
    let widths: Vec<usize> = cols.iter().map(|c| c.len() / t).collect();
    let d_qkv: usize = widths.iter().sum();
    let mut out = Vec::with_capacity(t * d_qkv);
    for row in 0..t {
        for (c, &w) in cols.iter().zip(&widths) {
            out.extend_from_slice(&c[row * w..(row + 1) * w]);
        }
    }
    Tensor::from_f32(DType::BF16, vec![t, d_qkv], &out)
}

/// One served call: the adapter, the tokens, and the relative L2 error of the output against
/// the CPU path with that adapter and with the other one (a control: it must be large, or the
/// comparison could not tell the adapters apart).
#[derive(Debug, Clone)]
pub struct Call {
    /// The adapter's name.
    pub adapter: String,
    /// Tokens in the batch.
    pub tokens: usize,
    /// rel-L2 against the CPU path with the same adapter.
    pub error: f64,
    /// rel-L2 against the CPU path with the other adapter.
    pub error_other_adapter: f64,
}

/// Serves a few batches on `backend`, switching between the fixture's two adapters, and
/// returns each call's errors against the CPU path.
///
/// # Errors
/// Any failing step.
pub fn run<B: Backend>(backend: Arc<B>) -> Result<Vec<Call>> {
    let dir = fixture_dir();
    let adapters = [("a", dir.join("adapter_a")), ("b", dir.join("adapter_b"))];
    let named: Vec<(&str, &Path)> = adapters.iter().map(|(n, p)| (*n, p.as_path())).collect();
    let max_tokens = 37;
    let mut qkv = Qkv::load(backend.clone(), &dir.join("base"), &named, max_tokens)?;
    // The engine's buffers, sized for the largest batch.
    let mut out = backend.alloc_slice::<bf16>(max_tokens * qkv.d_qkv())?;
    let mut results = Vec::new();
    // Decode-sized and prefill-sized batches, the adapter switching between calls.
    for (i, (adapter, t)) in [("a", 1), ("b", 1), ("a", 37), ("b", 19), ("a", 5)]
        .into_iter()
        .enumerate()
    {
        let host_x = hidden_states(t, qkv.d_model(), i as u32);
        let x = backend.upload_slice(&host_x)?;
        qkv.forward(adapter, &x, t, &mut out)?;
        let got = download_tensor::<B, bf16>(&backend, &out, vec![t, qkv.d_qkv()])?;
        let error_against = |name: &str| -> Result<f64> {
            let (_, adir) = adapters.iter().find(|(n, _)| *n == name).expect("known");
            let want = cpu_reference(&dir.join("base"), adir, &host_x, t)?;
            Ok(rel_l2(&got.to_f64(), &want.to_f64()))
        };
        results.push(Call {
            adapter: adapter.to_string(),
            tokens: t,
            error: error_against(adapter)?,
            error_other_adapter: error_against(if adapter == "a" { "b" } else { "a" })?,
        });
    }
    Ok(results)
}
