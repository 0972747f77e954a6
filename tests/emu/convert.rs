//! The emulator's f16/bf16 conversions round to nearest even exactly like the hardware (and
//! the `half` crate), on edge values: ties, subnormals, overflow, infinities, NaN.

use dorafuse::backend::{Backend, DeviceBuffer, KernelArg, LaunchDims};
use dorafuse::emu::EmuBackend;

fn edge_values() -> Vec<f32> {
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.1,
        1.0 / 3.0,
        65504.0,
        65519.99,
        65520.0,
        65536.0,
        -65520.0,
        6.1035156e-5, // smallest normal half
        6.097555e-5,  // just below it
        5.9604645e-8, // smallest subnormal half
        2.9802322e-8, // half of it: ties to zero
        2.9802326e-8, // just above: rounds up
        8.940697e-8,  // 1.5 ulp subnormal: tie to even (2 ulp)
        f32::MIN_POSITIVE,
        f32::MAX,
        -f32::MAX,
        f32::EPSILON,
        1.0e-40,
        3.0e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7F80_0001), // signalling NaN
        f32::from_bits(0x3F80_8000), // bf16 tie, even below
        f32::from_bits(0x3F81_8000), // bf16 tie, odd below
        f32::from_bits(0x3F80_8001),
        f32::from_bits(0x7F7F_8000), // bf16 rounds up to infinity
        f32::from_bits(0x3F80_1000), // f16 tie, even below (1 + 2^-11)
        f32::from_bits(0x3F80_3000), // f16 tie, odd below
    ];
    // A sweep of bit patterns through every exponent, with the low bits at tie positions.
    for e in 0..255u32 {
        for m in [
            0x0000_0000u32,
            0x0000_1000,
            0x0000_8000,
            0x0000_F000,
            0x0040_1000,
            0x007F_FFFF,
        ] {
            v.push(f32::from_bits((e << 23) | m));
            v.push(-f32::from_bits((e << 23) | m));
        }
    }
    v
}

fn same(a: f32, b: f32) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

#[test]
fn conversions_round_to_nearest_even_like_the_half_crate() {
    let x = edge_values();
    let n = x.len();
    let be = EmuBackend::new(1);
    let mut xb = be.alloc_zeroed(n * 4).unwrap();
    be.upload(&mut xb, bytemuck::cast_slice(&x)).unwrap();
    let hb = be.alloc_zeroed(n * 2).unwrap();
    let bb = be.alloc_zeroed(n * 2).unwrap();
    let back = be.alloc_zeroed(n * 8).unwrap();
    let pair = be.alloc_zeroed(n * 4).unwrap();
    let dims = LaunchDims {
        grid: [n.div_ceil(128) as u32, 1, 1],
        block: [128, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: (x [n] f32, h [n] u16, bf [n] u16, back [2n] f32, pair [n] u32, n).
    unsafe {
        be.launch(
            "emu_convert",
            dims,
            &[
                KernelArg::Ptr(xb.ptr()),
                KernelArg::Ptr(hb.ptr()),
                KernelArg::Ptr(bb.ptr()),
                KernelArg::Ptr(back.ptr()),
                KernelArg::Ptr(pair.ptr()),
                KernelArg::I32(n as i32),
            ],
        )
        .unwrap();
    }
    let mut h = vec![0u16; n];
    let mut bf = vec![0u16; n];
    let mut bk = vec![0f32; 2 * n];
    let mut pr = vec![0u32; n];
    be.download(&hb, bytemuck::cast_slice_mut(&mut h)).unwrap();
    be.download(&bb, bytemuck::cast_slice_mut(&mut bf)).unwrap();
    be.download(&back, bytemuck::cast_slice_mut(&mut bk))
        .unwrap();
    be.download(&pair, bytemuck::cast_slice_mut(&mut pr))
        .unwrap();
    for i in 0..n {
        let wh = half::f16::from_f32(x[i]);
        let wb = half::bf16::from_f32(x[i]);
        let gh = half::f16::from_bits(h[i]);
        let gb = half::bf16::from_bits(bf[i]);
        if x[i].is_nan() {
            assert!(
                gh.is_nan() && gb.is_nan(),
                "NaN {:#x} must stay NaN",
                x[i].to_bits()
            );
            assert!(bk[2 * i].is_nan() && bk[2 * i + 1].is_nan());
            continue;
        }
        assert_eq!(
            h[i],
            wh.to_bits(),
            "f16 of {:e} ({:#010x})",
            x[i],
            x[i].to_bits()
        );
        assert_eq!(
            bf[i],
            wb.to_bits(),
            "bf16 of {:e} ({:#010x})",
            x[i],
            x[i].to_bits()
        );
        assert!(same(bk[2 * i], wh.to_f32()), "f16 -> f32 of {:#06x}", h[i]);
        assert!(
            same(bk[2 * i + 1], wb.to_f32()),
            "bf16 -> f32 of {:#06x}",
            bf[i]
        );
        let wn = half::bf16::from_f32(-x[i]).to_bits() as u32;
        assert_eq!(
            pr[i],
            wb.to_bits() as u32 | (wn << 16),
            "bf16x2 of ({}, {})",
            x[i],
            -x[i]
        );
    }
}

#[test]
fn sixteen_bit_arithmetic_rounds_once() {
    // Values exactly representable in f16 and bf16 (8 significant bits, moderate exponents),
    // chosen so sums, products and quotients land on and between ties.
    let vals: Vec<f32> = (0..48i32)
        .map(|i| {
            let m = 129 + ((i * 37) % 127); // 8-bit significand
            let e = (i % 9) - 4;
            let s = if i % 5 == 0 { -1.0 } else { 1.0 };
            s * m as f32 * 2f32.powi(e - 7)
        })
        .collect();
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c = Vec::new();
    for (i, &x) in vals.iter().enumerate() {
        for (j, &y) in vals.iter().enumerate() {
            a.push(x);
            b.push(y);
            c.push(vals[(i * 7 + j * 3) % vals.len()]);
        }
    }
    let n = a.len();
    let be = EmuBackend::new(2);
    let up = |v: &[f32]| {
        let mut buf = be.alloc_zeroed(v.len() * 4).unwrap();
        be.upload(&mut buf, bytemuck::cast_slice(v)).unwrap();
        buf
    };
    let (ab, bb, cb) = (up(&a), up(&b), up(&c));
    let ob = be.alloc_zeroed(14 * n * 2).unwrap();
    let dims = LaunchDims {
        grid: [n.div_ceil(256) as u32, 1, 1],
        block: [256, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: (a, b, c [n] f32, out16 [14 n] u16, n).
    unsafe {
        be.launch(
            "emu_half_arith",
            dims,
            &[
                KernelArg::Ptr(ab.ptr()),
                KernelArg::Ptr(bb.ptr()),
                KernelArg::Ptr(cb.ptr()),
                KernelArg::Ptr(ob.ptr()),
                KernelArg::I32(n as i32),
            ],
        )
        .unwrap();
    }
    let mut out = vec![0u16; 14 * n];
    be.download(&ob, bytemuck::cast_slice_mut(&mut out))
        .unwrap();
    for i in 0..n {
        let (x, y, z) = (a[i] as f64, b[i] as f64, c[i] as f64);
        // Exact in f64 for these operands (quotients: correctly rounded), then one RNE rounding.
        let exact = [x + y, x - y, x * y, x / y, x * y + z, x + y, x * y];
        for (k, &e) in exact.iter().enumerate() {
            let want_h = half::f16::from_f64(e).to_bits();
            let want_b = half::bf16::from_f64(e).to_bits();
            assert_eq!(out[k * n + i], want_h, "f16 op {k} on ({x}, {y}, {z})");
            assert_eq!(
                out[(7 + k) * n + i],
                want_b,
                "bf16 op {k} on ({x}, {y}, {z})"
            );
        }
    }
}
