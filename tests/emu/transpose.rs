//! Shared-memory transposes (static tile; dynamic shared memory staged with cp.async) on the
//! emulator, at sizes off the 32x32 tile, under several schedules.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::EmuBackend;

fn seeds() -> Vec<u64> {
    vec![
        1,
        2,
        3,
        EmuBackend::from_env().expect("DORAFUSE_EMU_SEED").seed(),
    ]
}

fn run(kernel: &str, rows: usize, cols: usize, shared_bytes: u32, seed: u64) {
    let b = EmuBackend::new(seed);
    // arange input: a transposed or shifted index shows up as a wrong value.
    let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let mut xb = b.alloc_zeroed(x.len() * 4).unwrap();
    b.upload(&mut xb, bytemuck::cast_slice(&x)).unwrap();
    let ob = b.alloc_zeroed(x.len() * 4).unwrap();
    let dims = LaunchDims {
        grid: [cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, 1],
        block: [32, 8, 1],
        shared_bytes,
    };
    // SAFETY: (in [rows, cols] f32, out [cols, rows] f32, rows, cols); buffers sized so.
    unsafe {
        b.launch(
            kernel,
            dims,
            &[
                KernelArg::Ptr(xb.ptr()),
                KernelArg::Ptr(ob.ptr()),
                KernelArg::I32(rows as i32),
                KernelArg::I32(cols as i32),
            ],
        )
        .unwrap();
    }
    let mut got = vec![0f32; x.len()];
    b.download(&ob, bytemuck::cast_slice_mut(&mut got)).unwrap();
    for c in 0..cols {
        for r in 0..rows {
            assert_eq!(
                got[c * rows + r],
                x[r * cols + c],
                "{kernel} {rows}x{cols} seed {seed}: out[{c}][{r}]"
            );
        }
    }
}

#[test]
fn static_shared_tile_transpose() {
    for &seed in &seeds() {
        for &(r, c) in &[(1, 1), (7, 33), (33, 7), (129, 64), (65, 129)] {
            run("emu_transpose_f32", r, c, 0, seed);
        }
    }
}

#[test]
fn cp_async_dynamic_shared_transpose() {
    for &seed in &seeds() {
        for &(r, c) in &[(1, 4), (7, 36), (33, 8), (129, 68)] {
            run(
                "emu_transpose_cp_async",
                r,
                c,
                (32 * 32 + 32 * 33) * 4,
                seed,
            );
        }
    }
}
