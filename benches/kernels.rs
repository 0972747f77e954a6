//! Per-kernel benchmark (`cargo bench --bench kernels`): DoRA's own operations, the norm
//! (g from W0, A, B, m) and the compose (shrink and compose given the base product), fused against PEFT's unfused passes, through the same library as
//! `dorafuse bench`. On a CUDA device: the reference shapes, bf16, with bytes, FLOPs and the
//! fraction of the measured copy bandwidth. Without one: the CPU norm at 4096×4096 and the
//! kernels themselves on the emulator at a small shape (emulator times say nothing about GPU
//! speed; the run shows the kernels execute and the accounting works).

use anyhow::Result;
use dorafuse::bench::formula::Op;
use dorafuse::bench::measure::Plan;
use dorafuse::bench::runner::Config;
use dorafuse::bench::{cpu, cuda, device, table};

fn main() -> Result<()> {
    let gpu = dorafuse::cuda::device_available() && dorafuse::cuda::KERNELS_COMPILED;
    if gpu {
        let cfg = Config {
            shapes: vec![(4096, 4096), (4096, 11008), (8192, 28672)],
            tokens: vec![1, 512, 4096],
            ranks: vec![16, 64, 256],
            ops: vec![Op::Norm, Op::Compose],
            ..Config::default_gpu()
        };
        let rep = cuda::run_cuda(&cfg, &mut |l| eprintln!("… {l}"))?;
        print!("{}", table::render(&rep, false));
        return Ok(());
    }
    println!("no CUDA device: the CPU norm, and the kernels on the emulator (emulator times say nothing about GPU speed)");
    let cpu = Config {
        shapes: vec![(4096, 4096)],
        tokens: vec![1],
        ranks: vec![16, 64],
        ops: vec![Op::Norm],
        ..Config::default_cpu()
    };
    let rep = cpu::run_cpu(&cpu, &mut |l| eprintln!("… {l}"))?;
    print!("{}", table::render(&rep, false));
    let emu = Config {
        shapes: vec![(256, 384)],
        tokens: vec![16],
        ranks: vec![16],
        dtype: dorafuse::DType::BF16,
        ops: vec![Op::Norm, Op::Compose],
        plan: Plan::fixed(1, 3),
    };
    let rep = device::run_emu(&emu, &mut |l| eprintln!("… {l}"))?;
    print!("{}", table::render(&rep, false));
    Ok(())
}
