//! The example's run: arguments, tokenizer, adapters, encoder, pooling, output (main.rs
//! and tests/candle call [`run`]).

use crate::encoder::{Bert, Config, Projections};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use dorafuse::candle::{AdapterSet, CpuRoute};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

struct Args {
    model: PathBuf,
    adapters: Vec<(String, PathBuf)>,
    sentences: PathBuf,
    out: PathBuf,
    device: String,
    merged: bool,
    repeat: usize,
}

const USAGE: &str =
    "usage: minilm_dora --model MODEL_DIR --adapter NAME=ADAPTER_DIR [--adapter ...] \
--sentences FILE.tsv --out EMB.safetensors [--device cpu|emu|cuda] [--merged] [--repeat N]";

fn parse_args(argv: &[String]) -> Result<Args> {
    let mut it = argv.iter().cloned();
    let (mut model, mut sentences, mut out) = (None, None, None);
    let mut adapters = Vec::new();
    let mut device = "cpu".to_string();
    let (mut merged, mut repeat) = (false, 0);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .with_context(|| format!("{flag} needs a value; {USAGE}"))
        };
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(value("--model")?)),
            "--adapter" => {
                let v = value("--adapter")?;
                let (name, dir) = v
                    .split_once('=')
                    .with_context(|| format!("--adapter {v:?}: expected NAME=ADAPTER_DIR"))?;
                adapters.push((name.to_string(), PathBuf::from(dir)));
            }
            "--sentences" => sentences = Some(PathBuf::from(value("--sentences")?)),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--device" => device = value("--device")?,
            "--merged" => merged = true,
            "--repeat" => {
                let v = value("--repeat")?;
                repeat = v
                    .parse()
                    .with_context(|| format!("--repeat {v:?}: expected a count"))?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    Ok(Args {
        model: model.with_context(|| format!("--model is required; {USAGE}"))?,
        adapters,
        sentences: sentences.with_context(|| format!("--sentences is required; {USAGE}"))?,
        out: out.with_context(|| format!("--out is required; {USAGE}"))?,
        device,
        merged,
        repeat,
    })
}

/// `NAME<TAB>sentence` lines (empty lines skipped).
fn read_sentences(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (name, s) = line.split_once('\t').with_context(|| {
            format!(
                "{} line {}: expected NAME<TAB>sentence",
                path.display(),
                i + 1
            )
        })?;
        rows.push((name.to_string(), s.to_string()));
    }
    ensure!(!rows.is_empty(), "{}: no sentences", path.display());
    Ok(rows)
}

/// Token ids `[N, S]` u32 and attention mask `[N, S]` f32 (1 = token, 0 = padding).
pub fn tokenize(
    model: &Path,
    rows: &[(String, String)],
    max_len: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let path = model.join("tokenizer.json");
    let mut tok = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // The file pads to 128 and truncates; sentence-transformers' tokenizer call does neither
    // for one sentence, and a batch is padded to its longest sentence here.
    tok.with_padding(None);
    tok.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut ids = Vec::with_capacity(rows.len());
    for (i, (_, s)) in rows.iter().enumerate() {
        let enc = tok
            .encode(s.as_str(), true)
            .map_err(|e| anyhow::anyhow!("sentence {}: {e}", i + 1))?;
        ensure!(
            enc.get_ids().len() <= max_len,
            "sentence {} has {} tokens, more than the model's {max_len} positions",
            i + 1,
            enc.get_ids().len()
        );
        ids.push(enc.get_ids().to_vec());
    }
    let s = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = Vec::with_capacity(ids.len() * s);
    let mut mask = Vec::with_capacity(ids.len() * s);
    for row in &ids {
        flat.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat(0).take(s - row.len())),
        );
        mask.extend((0..s).map(|j| if j < row.len() { 1.0f32 } else { 0.0 }));
    }
    let n = ids.len();
    Ok((
        Tensor::from_vec(flat, (n, s), dev)?,
        Tensor::from_vec(mask, (n, s), dev)?,
    ))
}

/// Mean over the attention mask, then L2 normalisation (sentence-transformers' Pooling with
/// `pooling_mode_mean_tokens` and its Normalize module).
fn mean_pool(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.unsqueeze(2)?;
    let sum = h.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    let e = sum.broadcast_div(&count)?;
    let norm = e.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(e.broadcast_div(&norm)?)
}

fn device(name: &str) -> Result<(Device, CpuRoute)> {
    match name {
        "cpu" => Ok((Device::Cpu, CpuRoute::CpuPath)),
        "emu" => Ok((Device::Cpu, CpuRoute::EmulatedKernels)),
        // CUDA tensors: the layers run dorafuse's kernels on candle's stream (the route is
        // for CPU tensors only).
        #[cfg(feature = "candle-cuda")]
        "cuda" => Ok((
            Device::new_cuda(0).context("--device cuda: CUDA device 0")?,
            CpuRoute::CpuPath,
        )),
        #[cfg(not(feature = "candle-cuda"))]
        "cuda" => bail!(
            "--device cuda: this build has no CUDA tensors; rebuild with --features candle-cuda"
        ),
        other => bail!("--device {other:?}: expected cpu, emu or cuda"),
    }
}

/// Writes `embeddings` to `out` through a temporary file in the same directory, renamed at
/// the end (never a half-written output).
fn save(emb: &Tensor, out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".minilm_dora")
        .suffix(".safetensors")
        .tempfile_in(dir)
        .with_context(|| format!("--out {}: cannot write in {}", out.display(), dir.display()))?;
    let map = HashMap::from([("embeddings".to_string(), emb.to_device(&Device::Cpu)?)]);
    candle_core::safetensors::save(&map, tmp.path())
        .with_context(|| format!("writing {}", out.display()))?;
    tmp.persist(out)
        .with_context(|| format!("--out {}: renaming the finished file", out.display()))?;
    Ok(())
}

/// The example's whole run for `argv` (the arguments after the program name).
///
/// # Errors
/// Bad arguments, unreadable inputs, an adapter that does not fit the model, a failed write;
/// each on one line naming the file, adapter, module or tensor.
pub fn run(argv: &[String]) -> Result<()> {
    let args = parse_args(argv)?;
    let (dev, route) = device(&args.device)?;
    let rows = read_sentences(&args.sentences)?;
    let set = AdapterSet::load(&args.adapters)?;
    let slots: Vec<i32> = rows
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            set.slot(name)
                .with_context(|| format!("{} line {}", args.sentences.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    let cfg = Config::read(&args.model)?;
    let weights = args.model.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &dev)
        .with_context(|| format!("loading {}", weights.display()))?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let (ids, mask) = tokenize(&args.model, &rows, cfg.max_position_embeddings, &dev)?;

    let t0 = Instant::now();
    let encode: Box<dyn Fn() -> Result<Tensor>> = if args.merged {
        // One model per adapter with that adapter merged, and the base; each sentence group
        // through its own model, rows put back in input order.
        let mut models = vec![(-1, Bert::load(&cfg, vb.clone(), &Projections::Base)?)];
        for (k, _) in set.names().iter().enumerate() {
            models.push((
                k as i32,
                Bert::load(&cfg, vb.clone(), &Projections::Merged(&set, k))?,
            ));
        }
        let (ids, mask, slots) = (ids.clone(), mask.clone(), slots.clone());
        Box::new(move || {
            let mut out: Vec<Option<Tensor>> = vec![None; slots.len()];
            for (k, model) in &models {
                let rows: Vec<u32> = (0..slots.len() as u32)
                    .filter(|&i| slots[i as usize] == *k)
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let idx = Tensor::new(rows.as_slice(), ids.device())?;
                let (ids, mask) = (ids.index_select(&idx, 0)?, mask.index_select(&idx, 0)?);
                let h = model.forward(&ids, &mask, None)?;
                let e = mean_pool(&h, &mask)?;
                for (j, &i) in rows.iter().enumerate() {
                    out[i as usize] = Some(e.get(j)?);
                }
            }
            let out: Vec<Tensor> = out
                .into_iter()
                .map(|e| e.expect("every row has a model"))
                .collect();
            Ok(Tensor::stack(&out, 0)?)
        })
    } else {
        let model = Bert::load(&cfg, vb, &Projections::Adapted(&set, route))?;
        set.check_all_placed()?;
        let s = ids.dims()[1];
        // One adapter slot per token: each sentence's tokens (padding included) on its slot.
        let per_token: Vec<i32> = slots
            .iter()
            .flat_map(|&k| std::iter::repeat(k).take(s))
            .collect();
        let (ids, mask) = (ids.clone(), mask.clone());
        Box::new(move || {
            let h = model.forward(&ids, &mask, Some(&per_token))?;
            mean_pool(&h, &mask)
        })
    };
    let load_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let emb = encode()?;
    // CUDA work is asynchronous: a batch is timed until its last kernel has finished.
    dev.synchronize()?;
    let first_s = t1.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for _ in 0..args.repeat {
        let t = Instant::now();
        encode()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    save(&emb, &args.out)?;
    eprintln!(
        "minilm_dora: {} sentences, {} adapters, device {}{}: layers built in {:.2} s, batch in {:.3} s; wrote {}",
        rows.len(),
        set.names().len(),
        args.device,
        if args.merged { " (merged)" } else { "" },
        load_s,
        first_s,
        args.out.display()
    );
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        println!(
            "timing: mode={} device={} sentences={} tokens={} repeat={} median_ms={:.3} min_ms={:.3} max_ms={:.3}",
            if args.merged { "merged" } else { "unmerged" },
            args.device,
            rows.len(),
            ids.dims().iter().product::<usize>(),
            times.len(),
            med * 1e3,
            times[0] * 1e3,
            times[times.len() - 1] * 1e3
        );
    }
    Ok(())
}
