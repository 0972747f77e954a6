//! A compact BERT encoder (transformers' `BertModel`, absolute positions, post-LN, exact-erf
//! GELU) whose six linear layers per block take DoRA adapters.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use dorafuse::candle::{AdapterSet, CpuRoute, DoraLinear, MultiDoraLinear};
use std::path::Path;

/// The fields of `config.json` the encoder uses.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: String,
}

impl Config {
    /// `MODEL_DIR/config.json`, refusing what this encoder does not implement.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
        ensure!(
            c.hidden_act == "gelu",
            "{}: hidden_act {:?} is not supported (gelu only)",
            path.display(),
            c.hidden_act
        );
        ensure!(
            c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
            "{}: hidden_size {} is not a multiple of num_attention_heads {}",
            path.display(),
            c.hidden_size,
            c.num_attention_heads
        );
        Ok(c)
    }
}

/// What the encoder's linear layers hold.
pub enum Projections<'a> {
    /// The base weights.
    Base,
    /// Adapter `k` of the set merged into the weights it targets (dorafuse's CPU merge).
    Merged(&'a AdapterSet, usize),
    /// Every adapter of the set, unmerged, selected per token.
    Adapted(&'a AdapterSet, CpuRoute),
}

enum Proj {
    Plain(Linear),
    Multi(Box<MultiDoraLinear>),
}

impl Proj {
    fn load(
        vb: &VarBuilder,
        module: &str,
        d_in: usize,
        d_out: usize,
        p: &Projections,
    ) -> Result<Self> {
        let vb = vb.pp(module);
        let w = vb.get((d_out, d_in), "weight")?;
        let b = vb.get(d_out, "bias")?;
        Ok(match p {
            Projections::Base => Proj::Plain(Linear::new(w, Some(b))),
            Projections::Merged(set, k) => match set.adapters()[*k].modules.get(module) {
                Some(m) => {
                    let merged =
                        DoraLinear::from_peft(&w, Some(&b), m)?.merged_weight(w.device())?;
                    Proj::Plain(Linear::new(merged, Some(b)))
                }
                None => Proj::Plain(Linear::new(w, Some(b))),
            },
            Projections::Adapted(set, route) => Proj::Multi(Box::new(
                set.multi_linear(module, &w, Some(&b))?.with_route(*route),
            )),
        })
    }

    fn forward(&self, x: &Tensor, index: Option<&[i32]>) -> Result<Tensor> {
        Ok(match (self, index) {
            (Proj::Plain(l), _) => l.forward(x)?,
            (Proj::Multi(l), Some(i)) => l.with_index(i).forward(x)?,
            (Proj::Multi(l), None) => {
                l.forward_indexed(x, &vec![-1; x.dims()[..x.rank() - 1].iter().product()])?
            }
        })
    }
}

struct Block {
    query: Proj,
    key: Proj,
    value: Proj,
    attn_out: Proj,
    attn_ln: LayerNorm,
    intermediate: Proj,
    output: Proj,
    out_ln: LayerNorm,
}

/// The encoder: embeddings, then the blocks; returns the last hidden state.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    emb_ln: LayerNorm,
    blocks: Vec<Block>,
    heads: usize,
}

impl Bert {
    /// The model from `vb` (transformers' `BertModel` tensor names) with `p` in its linears.
    pub fn load(c: &Config, vb: VarBuilder, p: &Projections) -> Result<Self> {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, c.layer_norm_eps, vb);
        let emb = vb.pp("embeddings");
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let pre = format!("encoder.layer.{i}");
            let m = |s: &str| format!("{pre}.{s}");
            blocks.push(Block {
                query: Proj::load(&vb, &m("attention.self.query"), h, h, p)?,
                key: Proj::load(&vb, &m("attention.self.key"), h, h, p)?,
                value: Proj::load(&vb, &m("attention.self.value"), h, h, p)?,
                attn_out: Proj::load(&vb, &m("attention.output.dense"), h, h, p)?,
                attn_ln: ln(vb.pp(m("attention.output.LayerNorm")))?,
                intermediate: Proj::load(&vb, &m("intermediate.dense"), h, f, p)?,
                output: Proj::load(&vb, &m("output.dense"), f, h, p)?,
                out_ln: ln(vb.pp(m("output.LayerNorm")))?,
            });
        }
        Ok(Self {
            word: candle_nn::embedding(c.vocab_size, h, emb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                c.max_position_embeddings,
                h,
                emb.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(
                c.type_vocab_size,
                h,
                emb.pp("token_type_embeddings"),
            )?,
            emb_ln: ln(emb.pp("LayerNorm"))?,
            blocks,
            heads: c.num_attention_heads,
        })
    }

    /// The last hidden state `[N, S, hidden]` for token ids `[N, S]` (u32) and the attention
    /// mask `[N, S]` (f32, 1 = token), each token on its adapter slot (`index`, N·S entries)
    /// or all on the base (`None`).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, index: Option<&[i32]>) -> Result<Tensor> {
        let (n, s) = ids.dims2()?;
        let dev = ids.device();
        let pos = Tensor::arange(0u32, s as u32, dev)?;
        let x = self
            .word
            .forward(ids)?
            .broadcast_add(&self.position.forward(&pos)?)?
            .broadcast_add(
                &self
                    .token_type
                    .forward(&Tensor::zeros(s, DType::U32, dev)?)?,
            )?;
        let mut x = self.emb_ln.forward(&x)?;
        // Additive mask [N, 1, 1, S]: 0 on tokens, the f32 minimum on padding (transformers').
        let bias = ((mask.ones_like()? - mask)? * f64::from(f32::MIN))?.reshape((n, 1, 1, s))?;
        let hd = x.dim(2)? / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, s, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        for b in &self.blocks {
            let q = split(b.query.forward(&x, index)?)?;
            let k = split(b.key.forward(&x, index)?)?;
            let v = split(b.value.forward(&x, index)?)?;
            let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?.broadcast_add(&bias)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx =
                p.matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((n, s, self.heads * hd))?;
            let a = b
                .attn_ln
                .forward(&(b.attn_out.forward(&ctx, index)? + &x)?)?;
            let f = b.intermediate.forward(&a, index)?.gelu_erf()?;
            x = b.out_ln.forward(&(b.output.forward(&f, index)? + &a)?)?;
        }
        Ok(x)
    }
}
