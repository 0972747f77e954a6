//! Layer benchmark (`cargo bench --bench layer`): base layer, LoRA, unfused and fused DoRA,
//! training forward, forward + backward and inference with cached g, through the same
//! library as `dorafuse bench`. On a machine with a CUDA device and compiled kernels it runs
//! the GPU set at two reference shapes; otherwise a small CPU set (under a minute on two
//! cores). Prints the table; `DORAFUSE_BENCH_JSON=FILE` also writes the JSON.

use anyhow::Result;
use dorafuse::bench::formula::Op;
use dorafuse::bench::runner::Config;
use dorafuse::bench::{cpu, cuda, table};

fn main() -> Result<()> {
    let gpu = dorafuse::cuda::device_available() && dorafuse::cuda::KERNELS_COMPILED;
    let rep = if gpu {
        let cfg = Config {
            shapes: vec![(4096, 4096), (4096, 11008)],
            ops: vec![Op::Forward, Op::ForwardBackward, Op::Inference],
            ..Config::default_gpu()
        };
        cuda::run_cuda(&cfg, &mut |l| eprintln!("… {l}"))?
    } else {
        println!("no CUDA device: running the CPU path; these are CPU timings");
        let cfg = Config {
            shapes: vec![(4096, 4096)],
            tokens: vec![1, 64],
            ranks: vec![16],
            ops: vec![Op::Forward, Op::ForwardBackward, Op::Inference],
            ..Config::default_cpu()
        };
        cpu::run_cpu(&cfg, &mut |l| eprintln!("… {l}"))?
    };
    print!("{}", table::render(&rep, false));
    if let Ok(p) = std::env::var("DORAFUSE_BENCH_JSON") {
        rep.write(std::path::Path::new(&p))?;
    }
    Ok(())
}
