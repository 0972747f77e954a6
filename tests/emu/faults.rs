//! Faults the emulator makes loud: a race caught by the shuffled schedule and the NaN fill of
//! shared memory, barrier divergence, a missing warp lane, deadlocks, a missing cp.async wait,
//! __trap, and launch mistakes. Every failure must name the kernel, the block and the thread.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::EmuBackend;

fn seeds() -> Vec<u64> {
    vec![
        1,
        2,
        3,
        0xC0FFEE,
        EmuBackend::from_env().expect("DORAFUSE_EMU_SEED").seed(),
    ]
}

fn dims(grid: u32, block: u32) -> LaunchDims {
    LaunchDims {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes: 0,
    }
}

/// Launches `kernel` with one zeroed f32 output of `grid * block` elements (plus `extra`).
fn launch_out(
    b: &EmuBackend,
    kernel: &str,
    grid: u32,
    block: u32,
    extra: &[KernelArg],
) -> (anyhow::Result<()>, Vec<f32>) {
    let n = (grid * block) as usize;
    let out = b.alloc_zeroed(n * 4).unwrap();
    let mut args = vec![KernelArg::Ptr(out.ptr())];
    args.extend_from_slice(extra);
    // SAFETY: every kernel used here takes (float* out [gridDim.x * blockDim.x], extra...).
    let r = unsafe { b.launch(kernel, dims(grid, block), &args) };
    let mut v = vec![0f32; n];
    b.download(&out, bytemuck::cast_slice_mut(&mut v)).unwrap();
    (r, v)
}

fn error_text(r: anyhow::Result<()>) -> String {
    format!("{:#}", r.expect_err("the launch must fail"))
}

#[test]
fn racy_kernel_is_caught_under_every_schedule() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let (r, out) = launch_out(&b, "emu_racy", 4, 256, &[]);
        r.unwrap();
        let wrong = out
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != ((i % 256 + 1) % 256) as f32)
            .count();
        assert!(wrong > 0, "seed {seed}: the race went unnoticed");
        // What the race reads is the NaN fill of shared memory.
        assert!(out.iter().any(|v| v.is_nan()), "seed {seed}: no NaN read");
    }
}

#[test]
fn race_free_kernel_passes_under_every_schedule() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let (r, out) = launch_out(&b, "emu_race_free", 4, 256, &[]);
        r.unwrap();
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, ((i % 256 + 1) % 256) as f32, "seed {seed}: out[{i}]");
        }
    }
}

#[test]
fn barrier_not_reached_by_all_threads_fails_naming_the_thread() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let e = error_text(launch_out(&b, "emu_divergent_exit", 3, 128, &[]).0);
        assert!(e.contains("barrier divergence"), "{e}");
        assert!(
            e.contains("emu_divergent_exit") && e.contains("block (") && e.contains("thread ("),
            "{e}"
        );
        assert!(
            e.contains("exited without reaching the __syncthreads()") && e.contains("faults.cu"),
            "{e}"
        );
    }
}

#[test]
fn threads_at_different_barriers_fail() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let e = error_text(launch_out(&b, "emu_divergent_sites", 2, 64, &[]).0);
        assert!(
            e.contains("barrier divergence") && e.contains("emu_divergent_sites"),
            "{e}"
        );
        assert!(e.contains("block (") && e.contains("thread ("), "{e}");
    }
}

#[test]
fn deadlock_between_a_shuffle_and_a_barrier_fails() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let e = error_text(launch_out(&b, "emu_deadlock", 1, 64, &[]).0);
        assert!(e.contains("deadlock") && e.contains("emu_deadlock"), "{e}");
        assert!(
            e.contains("__shfl_sync") && e.contains("__syncthreads()"),
            "{e}"
        );
        assert!(e.contains("block (0,0,0), thread ("), "{e}");
    }
}

#[test]
fn missing_warp_lane_fails() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let e = error_text(launch_out(&b, "emu_missing_lane", 2, 64, &[]).0);
        assert!(
            e.contains("missing warp lane") && e.contains("emu_missing_lane"),
            "{e}"
        );
        assert!(
            e.contains("lane 31")
                || e.contains("lane 31,")
                || e.contains("(warp 0, lane 31)")
                || e.contains("lane 31)"),
            "{e}"
        );
        assert!(e.contains("block (") && e.contains("thread ("), "{e}");
    }
}

#[test]
fn spin_wait_on_a_flag_nobody_sets_fails() {
    let b = EmuBackend::new(7);
    let flag = b.alloc_zeroed(4).unwrap();
    // SAFETY: (int* flag [1]).
    let r = unsafe { b.launch("emu_spin", dims(1, 32), &[KernelArg::Ptr(flag.ptr())]) };
    let e = error_text(r);
    assert!(
        e.contains("no progress") && e.contains("emu_spin") && e.contains("thread (0,0,0)"),
        "{e}"
    );
}

#[test]
fn trap_fails_naming_the_thread() {
    let b = EmuBackend::new(3);
    let out = b.alloc_zeroed(64 * 4).unwrap();
    // SAFETY: (int* out [blockDim.x], int bad).
    let r = unsafe {
        b.launch(
            "emu_trap",
            dims(1, 64),
            &[KernelArg::Ptr(out.ptr()), KernelArg::I32(37)],
        )
    };
    let e = error_text(r);
    assert!(
        e.contains("__trap") && e.contains("emu_trap") && e.contains("thread (37,0,0)"),
        "{e}"
    );
}

#[test]
fn cp_async_read_before_the_wait_sees_nan() {
    for &seed in &seeds() {
        let b = EmuBackend::new(seed);
        let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
        for wait in [0, 1] {
            let mut inb = b.alloc_zeroed(4096).unwrap();
            b.upload(&mut inb, bytemuck::cast_slice(&x)).unwrap();
            let out = b.alloc_zeroed(4096).unwrap();
            // SAFETY: (in [4*256] f32, out [4*256] f32, int wait).
            unsafe {
                b.launch(
                    "emu_cp_async_no_wait",
                    dims(1, 256),
                    &[
                        KernelArg::Ptr(inb.ptr()),
                        KernelArg::Ptr(out.ptr()),
                        KernelArg::I32(wait),
                    ],
                )
                .unwrap();
            }
            let mut got = vec![0f32; 1024];
            b.download(&out, bytemuck::cast_slice_mut(&mut got))
                .unwrap();
            if wait == 1 {
                assert_eq!(got, x, "seed {seed}: with the wait");
            } else {
                assert!(
                    got.iter().all(|v| v.is_nan()),
                    "seed {seed}: read before the wait"
                );
            }
        }
    }
}

#[test]
fn launch_mistakes_are_errors() {
    let b = EmuBackend::new(1);
    let out = b.alloc_zeroed(1024).unwrap();
    // SAFETY (all below): the emulator rejects these before running any kernel code.
    let e = error_text(unsafe { b.launch("no_such_kernel", dims(1, 32), &[]) });
    assert!(e.contains("no kernel no_such_kernel"), "{e}");
    let e = error_text(unsafe { b.launch("emu_racy", dims(1, 32), &[]) });
    assert!(e.contains("emu_racy") && e.contains("0 arguments"), "{e}");
    let e = error_text(unsafe { b.launch("emu_racy", dims(1, 32), &[KernelArg::I32(1)]) });
    assert!(
        e.contains("emu_racy") && e.contains("argument 0 is int"),
        "{e}"
    );
    let e =
        error_text(unsafe { b.launch("emu_racy", dims(1, 2048), &[KernelArg::Ptr(out.ptr())]) });
    assert!(e.contains("emu_racy") && e.contains("invalid block"), "{e}");
    let big = LaunchDims {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 300 << 10,
    };
    let e = error_text(unsafe { b.launch("emu_racy", big, &[KernelArg::Ptr(out.ptr())]) });
    assert!(e.contains("exceed 227 KiB"), "{e}");
    // The backend still works after failed launches.
    let (r, _) = launch_out(&b, "emu_race_free", 1, 32, &[]);
    r.unwrap();
}

/// Runs `emu_oob` on a 64-float buffer.
fn run_oob(idx: i32, widx: i32) -> Vec<f32> {
    let b = EmuBackend::new(1);
    let out = b.alloc_zeroed(64 * 4).unwrap();
    // SAFETY: (float* out [64], int idx, int widx); in bounds for idx, widx < 64 (the
    // out-of-bounds calls run only in the AddressSanitizer child process).
    unsafe {
        b.launch(
            "emu_oob",
            dims(1, 64),
            &[
                KernelArg::Ptr(out.ptr()),
                KernelArg::I32(idx),
                KernelArg::I32(widx),
            ],
        )
        .unwrap();
    }
    let mut v = vec![0f32; 64];
    b.download(&out, bytemuck::cast_slice_mut(&mut v)).unwrap();
    v
}

/// The child of `out_of_bounds_accesses_fail_under_asan`: accesses out of bounds.
#[test]
#[ignore = "run by out_of_bounds_accesses_fail_under_asan in an AddressSanitizer build"]
fn oob_child() {
    match std::env::var("DFEMU_OOB_CHILD").as_deref() {
        Ok("shared") => drop(run_oob(64 + 3, 0)),
        Ok("global") => drop(run_oob(0, 64 + 1)),
        _ => {}
    }
}

#[test]
fn out_of_bounds_accesses_fail_under_asan() {
    // In bounds, the kernel works in every build.
    assert_eq!(run_oob(5, 7)[7], 5.0);
    if option_env!("DORAFUSE_EMU_ASAN") != Some("1") {
        return; // only an AddressSanitizer build (kernels/emu/README.md) can see the rest
    }
    for what in ["shared", "global"] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "faults::oob_child", "--ignored", "--nocapture"])
            .env("DFEMU_OOB_CHILD", what)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what} out-of-bounds access went unnoticed: {err}"
        );
        assert!(err.contains("AddressSanitizer"), "{what}: {err}");
    }
}

#[test]
fn ldmatrix_from_global_memory_fails_naming_the_lane() {
    let b = EmuBackend::new(5);
    let m = b.alloc_zeroed(64 * 2).unwrap();
    let out = b.alloc_zeroed(32 * 4).unwrap();
    // SAFETY: (const unsigned short* m [8, 8], unsigned int* out [32]).
    let r = unsafe {
        b.launch(
            "emu_ldmatrix_global",
            dims(1, 32),
            &[KernelArg::Ptr(m.ptr()), KernelArg::Ptr(out.ptr())],
        )
    };
    let e = error_text(r);
    assert!(
        e.contains("not in this block's shared memory") && e.contains("emu_ldmatrix_global"),
        "{e}"
    );
}
