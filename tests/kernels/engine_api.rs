//! The engine API (`DoraLinear`, `DoraAdapter`, typed views) on the emulator: results against
//! the CPU path for every base-result source, g per adapter, caller workspace, and a one-line
//! error naming the tensor for each misuse (overlap, another device, too short, misaligned,
//! wrong dtype or shape), with the error kind a caller branches on.

use dorafuse::backend::{Backend, DevPtr, DeviceMemory};
use dorafuse::dtype::DType;
use dorafuse::emu::{EmuBackend, EmuSlice};
use dorafuse::error::{kind, ErrorKind};
use dorafuse::kernels::{
    download_tensor, BaseResult, DevView, DevViewMut, DoraAdapter, DoraLinear, MatShape,
};
use dorafuse::layer::Layer;
use dorafuse::tensor::{rel_l2, Tensor};
use half::bf16;
use std::sync::Arc;

// Off every kernel tile: d_in 72, d_out 40, r 6, t 5.
const D_IN: usize = 72;
const D_OUT: usize = 40;
const R: usize = 6;
const T: usize = 5;

/// Deterministic values uniform in [−scale, scale) (SplitMix64 of the seed and index).
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (u64::from(seed) << 32 | i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            scale * (2.0 * ((z >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
        })
        .collect()
}

/// A bf16 DoRA layer with f32 adapters (PEFT's default mix) and a bias; `seed` varies the
/// adapter only, so layers of different seeds share W0.
fn layer(seed: u32, dora: bool) -> Layer {
    let w = Tensor::from_f32(
        DType::BF16,
        vec![D_OUT, D_IN],
        &values(D_OUT * D_IN, 1, 0.2),
    )
    .unwrap();
    let m: Vec<f32> = values(D_OUT, seed + 7, 0.5)
        .iter()
        .map(|v| 1.5 + v)
        .collect();
    Layer {
        weight: w,
        bias: Some(Tensor::from_f32(DType::F32, vec![D_OUT], &values(D_OUT, 2, 0.3)).unwrap()),
        lora_a: Tensor::from_f32(DType::F32, vec![R, D_IN], &values(R * D_IN, seed + 3, 0.3))
            .unwrap(),
        lora_b: Tensor::from_f32(
            DType::F32,
            vec![D_OUT, R],
            &values(D_OUT * R, seed + 5, 0.3),
        )
        .unwrap(),
        magnitude: dora.then(|| Tensor::from_f32(DType::F32, vec![D_OUT], &m).unwrap()),
        scaling: 1.25,
        fan_in_fan_out: false,
    }
}

fn x_host(t: usize) -> Vec<bf16> {
    values(t * D_IN, 9, 1.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

fn adapter_module(l: &Layer, name: &str) -> dorafuse::adapter::AdapterModule {
    dorafuse::adapter::AdapterModule {
        name: name.to_string(),
        lora_a: l.lora_a.clone(),
        lora_b: l.lora_b.clone(),
        magnitude: l.magnitude.clone(),
        rank: R,
        alpha: l.scaling * R as f64,
        scaling: l.scaling,
        kind: dorafuse::adapter::ModuleKind::Linear,
        lora_bias: None,
    }
}

struct Setup {
    emu: Arc<EmuBackend>,
    linear: DoraLinear<EmuBackend>,
    adapter: DoraAdapter<EmuBackend>,
    layer: Layer,
}

fn setup() -> Setup {
    let emu = Arc::new(EmuBackend::new(3));
    let layer = layer(0, true);
    let linear = DoraLinear::upload(emu.clone(), &layer).unwrap();
    let mut adapter =
        DoraAdapter::upload(&*emu, &adapter_module(&layer, "proj"), DType::F32).unwrap();
    adapter.compute_scale(&linear).unwrap();
    Setup {
        emu,
        linear,
        adapter,
        layer,
    }
}

fn cpu_y(layer: &Layer, x: &[bf16], t: usize) -> Vec<f64> {
    let xt = Tensor::from_f32(
        DType::BF16,
        vec![t, D_IN],
        &x.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
    )
    .unwrap();
    dorafuse::cpu::forward(layer, &xt).unwrap().to_f64()
}

/// The message (one line) and kind of a failed call.
fn fails(r: anyhow::Result<()>) -> String {
    let e = r.expect_err("the call must fail");
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "not one line: {msg}");
    assert_eq!(kind(&e), Some(ErrorKind::InvalidInput), "{msg}");
    msg
}

#[test]
fn every_base_result_source_matches_the_cpu_path() {
    let mut s = setup();
    let emu = s.emu.clone();
    for t in [1, T, 33] {
        let xh = x_host(t);
        let want = cpu_y(&s.layer, &xh, t);
        let x = emu.upload_slice(&xh).unwrap();
        let xv = emu.view(&x, MatShape::new(t, D_IN));

        // Computed by the layer.
        let mut y = emu.alloc_slice::<bf16>(t * D_OUT).unwrap();
        {
            let mut yv = emu.view_mut(&mut y, MatShape::new(t, D_OUT));
            s.linear
                .forward(&s.adapter, &xv, BaseResult::Compute, &mut yv)
                .unwrap();
        }
        let got = download_tensor::<_, bf16>(&*emu, &y, vec![t, D_OUT])
            .unwrap()
            .to_f64();
        let e = rel_l2(&got, &want);
        assert!(e < 1e-2, "t={t} computed base: rel-L2 {e:e}");

        // Given by the engine, then in place in a wider buffer (columns 7..47 of 60).
        let mut base = emu.alloc_slice::<bf16>(t * D_OUT).unwrap();
        {
            let mut bv = emu.view_mut(&mut base, MatShape::new(t, D_OUT));
            s.linear.base_product(&xv, &mut bv).unwrap();
        }
        let mut y2 = emu.alloc_slice::<bf16>(t * D_OUT).unwrap();
        {
            let bv = emu.view(&base, MatShape::new(t, D_OUT));
            let mut yv = emu.view_mut(&mut y2, MatShape::new(t, D_OUT));
            s.linear
                .forward(&s.adapter, &xv, BaseResult::Given(bv), &mut yv)
                .unwrap();
        }
        let got2 = download_tensor::<_, bf16>(&*emu, &y2, vec![t, D_OUT])
            .unwrap()
            .to_f64();
        assert_eq!(
            got2, got,
            "t={t}: a given base result gives the computed one's bits"
        );

        let mut wide = emu.alloc_slice::<bf16>(t * 60).unwrap();
        {
            let mut wv = emu.view_mut(&mut wide, MatShape::new(t, 60));
            let mut cols = wv.columns(7, D_OUT).unwrap();
            s.linear.base_product(&xv, &mut cols).unwrap();
            s.linear
                .forward(&s.adapter, &xv, BaseResult::InPlace, &mut cols)
                .unwrap();
        }
        let w = download_tensor::<_, bf16>(&*emu, &wide, vec![t, 60])
            .unwrap()
            .to_f64();
        let got3: Vec<f64> = (0..t)
            .flat_map(|i| w[i * 60 + 7..i * 60 + 7 + D_OUT].to_vec())
            .collect();
        assert_eq!(
            got3, got,
            "t={t}: in place in a column slice gives the same bits"
        );
        // Columns outside the slice are untouched (zero).
        assert!((0..t).all(|i| w[i * 60..i * 60 + 7].iter().all(|&v| v == 0.0)));
    }
}

#[test]
fn g_is_per_adapter_and_switching_costs_no_norm() {
    let s = setup();
    let emu = s.emu.clone();
    let other = layer(100, true);
    let mut b = DoraAdapter::upload(&*emu, &adapter_module(&other, "proj"), DType::F32).unwrap();

    // Before compute_scale: refused, naming the adapter.
    let xh = x_host(T);
    let x = emu.upload_slice(&xh).unwrap();
    let xv = emu.view(&x, MatShape::new(T, D_IN));
    let mut y = emu.alloc_slice::<bf16>(T * D_OUT).unwrap();
    let mut ws = emu
        .alloc_slice::<f32>(s.linear.workspace_len(T, R))
        .unwrap();
    let wl = ws.len();
    let msg = fails(s.linear.forward_with_workspace(
        &b,
        &xv,
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut emu.view_mut(&mut ws, MatShape::new(1, wl)),
    ));
    assert!(msg.starts_with("adapter: g not computed"), "{msg}");

    // g into memory the caller supplies: n then g, equal to the CPU path's.
    let mem = emu.alloc_slice::<f32>(b.scale_len()).unwrap();
    b.compute_scale_into(&s.linear, mem).unwrap();
    let ng = b.scale_memory().unwrap().as_slice().to_vec();
    let want_n = dorafuse::cpu::norm(&other).unwrap();
    let want_g = dorafuse::cpu::magnitude_scale(&other).unwrap().unwrap();
    let e = rel_l2(
        &ng.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &want_n
            .iter()
            .chain(&want_g)
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
    );
    assert!(e < 1e-3, "n, g vs the CPU path: rel-L2 {e:e}");

    // Alternating adapters: each call gives its own adapter's result, and no norm runs.
    let want_a = cpu_y(&s.layer, &xh, T);
    let want_b = cpu_y(&other, &xh, T);
    for (ad, want) in [(&s.adapter, &want_a), (&b, &want_b), (&s.adapter, &want_a)] {
        let launches = emu.launch_count();
        {
            let mut yv = emu.view_mut(&mut y, MatShape::new(T, D_OUT));
            let mut wv = emu.view_mut(&mut ws, MatShape::new(1, wl));
            s.linear
                .forward_with_workspace(ad, &xv, BaseResult::Compute, &mut yv, &mut wv)
                .unwrap();
        }
        // The GEMM is no launch; shrink and compose are the only kernels: no norm.
        assert_eq!(emu.launch_count() - launches, 2);
        let got = download_tensor::<_, bf16>(&*emu, &y, vec![T, D_OUT])
            .unwrap()
            .to_f64();
        assert!(rel_l2(&got, want) < 1e-2);
        assert!(
            rel_l2(
                &got,
                if std::ptr::eq(want, &want_a) {
                    &want_b
                } else {
                    &want_a
                }
            ) > 0.05
        );
    }

    // g computed for one layer is refused by another (same shapes, different W0).
    let mut l2 = layer(0, true);
    l2.weight = Tensor::from_f32(
        DType::BF16,
        vec![D_OUT, D_IN],
        &values(D_OUT * D_IN, 77, 0.2),
    )
    .unwrap();
    let lin2 = DoraLinear::upload(emu.clone(), &l2).unwrap();
    let msg = fails(lin2.forward_with_workspace(
        &b,
        &xv,
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut emu.view_mut(&mut ws, MatShape::new(1, wl)),
    ));
    assert!(
        msg.starts_with("adapter: its g was computed for another layer"),
        "{msg}"
    );

    // The caller's memory comes back.
    assert_eq!(b.take_scale_memory().map(|m| m.len()), Some(2 * D_OUT));
}

#[test]
fn workspace_is_planned_and_the_owned_one_stops_growing() {
    let mut s = setup();
    let emu = s.emu.clone();
    // The query covers every token count and every rank up to the maximum.
    let max = s.linear.workspace_len(64, R);
    assert!((1..=64).all(|t| s.linear.workspace_len(t, R) <= max));
    assert!((1..=R).all(|r| s.linear.workspace_len(64, r) <= max));
    let xh = x_host(64);
    let x = emu.upload_slice(&xh).unwrap();
    let mut y = emu.alloc_slice::<bf16>(64 * D_OUT).unwrap();
    for t in [64, 1, 17, 64] {
        let xv = emu.view(&x, MatShape::new(t, D_IN));
        let mut yv = emu.view_mut(&mut y, MatShape::new(t, D_OUT));
        s.linear
            .forward(&s.adapter, &xv, BaseResult::Compute, &mut yv)
            .unwrap();
        assert_eq!(s.linear.owned_workspace_len(), max, "t={t}");
    }
    // One element short of the query: refused, naming the workspace.
    let need = s.linear.workspace_len(T, R);
    let mut ws = emu.alloc_slice::<f32>(need - 1).unwrap();
    let xv = emu.view(&x, MatShape::new(T, D_IN));
    let msg = fails(s.linear.forward_with_workspace(
        &s.adapter,
        &xv,
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut emu.view_mut(&mut ws, MatShape::new(1, need - 1)),
    ));
    assert!(msg.contains("workspace: too short"), "{msg}");
}

/// Raw views into one emulator slice, for the misuse tests (safe code cannot alias them).
fn raw_in(
    s: &EmuSlice<bf16>,
    offset_bytes: usize,
    len: usize,
    shape: MatShape,
) -> DevView<'_, bf16> {
    let m = s.info();
    // SAFETY: inside (or, for the alignment test, one byte into) a live emulator slice; the
    // call under test refuses the view before any kernel reads it.
    unsafe { DevView::from_raw(DevPtr(m.ptr.0 + offset_bytes as u64), len, m.device, shape) }
}

fn raw_out(
    s: &EmuSlice<bf16>,
    offset_bytes: usize,
    len: usize,
    shape: MatShape,
) -> DevViewMut<'_, bf16> {
    let m = s.info();
    // SAFETY: as in raw_in: the call refuses the view before any kernel writes through it.
    unsafe { DevViewMut::from_raw(DevPtr(m.ptr.0 + offset_bytes as u64), len, m.device, shape) }
}

#[test]
fn an_output_overlapping_an_input_is_refused() {
    let s = setup();
    let emu = s.emu.clone();
    let big = emu.upload_slice(&x_host(4 * T)).unwrap();
    let mut ws = emu
        .alloc_slice::<f32>(s.linear.workspace_len(T, R))
        .unwrap();
    let wl = ws.len();
    let x = raw_in(&big, 0, T * D_IN, MatShape::new(T, D_IN));
    // y starts inside x: with a computed base, the GEMM would overwrite x before the shrink.
    let mut y = raw_out(&big, 2 * 64, T * D_OUT, MatShape::new(T, D_OUT));
    let msg = fails(s.linear.forward_with_workspace(
        &s.adapter,
        &x,
        BaseResult::Compute,
        &mut y,
        &mut emu.view_mut(&mut ws, MatShape::new(1, wl)),
    ));
    assert!(msg.starts_with("y overlaps x"), "{msg}");

    // A given base result overlapping y (not the documented in-place call).
    let x2 = emu.upload_slice(&x_host(T)).unwrap();
    let xv = emu.view(&x2, MatShape::new(T, D_IN));
    let base = raw_in(&big, 0, T * D_OUT, MatShape::new(T, D_OUT));
    let mut y = raw_out(&big, 2 * 8, T * D_OUT, MatShape::new(T, D_OUT));
    let msg = fails(s.linear.forward_with_workspace(
        &s.adapter,
        &xv,
        BaseResult::Given(base),
        &mut y,
        &mut emu.view_mut(&mut ws, MatShape::new(1, wl)),
    ));
    assert!(msg.starts_with("y overlaps base"), "{msg}");

    // A workspace overlapping y (f32 raw view over the same bytes).
    let mut y3 = emu.alloc_slice::<bf16>(T * D_OUT).unwrap();
    let ym = y3.info();
    // SAFETY: the bytes of y3 (plus the slice's 256-byte aligned tail); refused before use.
    let mut ws_alias =
        unsafe { DevViewMut::<f32>::from_raw(ym.ptr, wl, ym.device, MatShape::new(1, wl)) };
    let msg = fails(s.linear.forward_with_workspace(
        &s.adapter,
        &xv,
        BaseResult::Compute,
        &mut emu.view_mut(&mut y3, MatShape::new(T, D_OUT)),
        &mut ws_alias,
    ));
    assert!(msg.starts_with("workspace overlaps y"), "{msg}");
}

#[test]
fn memory_of_another_device_is_refused() {
    let s = setup();
    let emu = s.emu.clone();
    let other = EmuBackend::new(3).with_device(1);
    let x = other.upload_slice(&x_host(T)).unwrap();
    let mut y = emu.alloc_slice::<bf16>(T * D_OUT).unwrap();
    let mut ws = emu
        .alloc_slice::<f32>(s.linear.workspace_len(T, R))
        .unwrap();
    let wl = ws.len();
    let msg = fails(s.linear.forward_with_workspace(
        &s.adapter,
        &other.view(&x, MatShape::new(T, D_IN)),
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws_view(&emu, &mut ws, wl),
    ));
    assert_eq!(
        msg,
        "x: memory of emulator device 1, but the layer runs on emulator device 0"
    );
    // Weights of another device, at construction.
    let w = Arc::new(other.upload_slice(&vec![bf16::ZERO; D_OUT * D_IN]).unwrap());
    let msg = fails(DoraLinear::new(emu.clone(), w, None, D_OUT, D_IN, false).map(|_| ()));
    assert!(
        msg.starts_with("weight: memory of emulator device 1"),
        "{msg}"
    );
    // An adapter of another device.
    let ad = DoraAdapter::upload(&other, &adapter_module(&s.layer, "proj"), DType::F32).unwrap();
    let xe = emu.upload_slice(&x_host(T)).unwrap();
    let msg = fails(s.linear.forward_with_workspace(
        &ad,
        &emu.view(&xe, MatShape::new(T, D_IN)),
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws_view(&emu, &mut ws, wl),
    ));
    assert!(
        msg.starts_with("adapter: uploaded to emulator device 1"),
        "{msg}"
    );
}

fn ws_view<'a>(emu: &'a EmuBackend, ws: &'a mut EmuSlice<f32>, len: usize) -> DevViewMut<'a, f32> {
    emu.view_mut(ws, MatShape::new(1, len))
}

#[test]
fn short_misaligned_and_mis_shaped_views_are_refused() {
    let s = setup();
    let emu = s.emu.clone();
    let mut ws = emu
        .alloc_slice::<f32>(s.linear.workspace_len(T, R))
        .unwrap();
    let wl = ws.len();
    let mut y = emu.alloc_slice::<bf16>(T * D_OUT).unwrap();
    let call = |x: &DevView<bf16>, y: &mut DevViewMut<bf16>, ws: &mut EmuSlice<f32>| {
        s.linear.forward_with_workspace(
            &s.adapter,
            x,
            BaseResult::Compute,
            y,
            &mut emu.view_mut(ws, MatShape::new(1, wl)),
        )
    };

    // Too short: a slice of T·d_in − 1 elements seen as [T, d_in].
    let short = emu.upload_slice(&x_host(T)[..T * D_IN - 1]).unwrap();
    let msg = fails(call(
        &emu.view(&short, MatShape::new(T, D_IN)),
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws,
    ));
    assert_eq!(
        msg,
        format!(
            "x: too short: [{T}, {D_IN}] needs {} elements, the view has {}",
            T * D_IN,
            T * D_IN - 1
        )
    );
    // A row stride that runs past the end is too short too.
    let x = emu.upload_slice(&x_host(T)).unwrap();
    let msg = fails(call(
        &emu.view(&x, MatShape::strided(T, D_IN, D_IN + 8)),
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws,
    ));
    assert!(msg.starts_with("x: too short"), "{msg}");

    // Misaligned: one byte into a bf16 slice.
    let big = emu.upload_slice(&x_host(T + 1)).unwrap();
    let msg = fails(call(
        &raw_in(&big, 1, T * D_IN, MatShape::new(T, D_IN)),
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws,
    ));
    assert!(
        msg.starts_with("x: address 0x")
            && msg.ends_with("is not aligned to its 2-byte bf16 elements"),
        "{msg}"
    );

    // Wrong shape: y with d_out − 1 columns; x with another token count than y.
    let msg = fails(call(
        &emu.view(&x, MatShape::new(T, D_IN)),
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT - 1)),
        &mut ws,
    ));
    assert_eq!(
        msg,
        format!("y: shape [{T}, {}], expected [{T}, {D_OUT}]", D_OUT - 1)
    );
    let msg = fails(call(
        &emu.view(&x, MatShape::new(T - 1, D_IN)),
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
        &mut ws,
    ));
    assert_eq!(
        msg,
        format!("y: shape [{T}, {D_OUT}], expected [{}, {D_OUT}]", T - 1)
    );

    // Activations of another dtype than the layer's.
    let xf = emu.upload_slice(&vec![half::f16::ZERO; T * D_IN]).unwrap();
    let mut yf = emu.alloc_slice::<half::f16>(T * D_OUT).unwrap();
    let e = s
        .linear
        .forward_with_workspace(
            &s.adapter,
            &emu.view(&xf, MatShape::new(T, D_IN)),
            BaseResult::Compute,
            &mut emu.view_mut(&mut yf, MatShape::new(T, D_OUT)),
            &mut emu.view_mut(&mut ws, MatShape::new(1, wl)),
        )
        .unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "x: f16 activations for a layer whose weight is bf16"
    );
    assert_eq!(kind(&e), Some(ErrorKind::InvalidInput));
}

#[test]
fn plain_lora_needs_no_scale() {
    let emu = Arc::new(EmuBackend::new(5));
    let l = layer(4, false);
    let linear = DoraLinear::upload(emu.clone(), &l).unwrap();
    let mut ad = DoraAdapter::upload(&*emu, &adapter_module(&l, "proj"), DType::F32).unwrap();
    assert!(!ad.is_dora());
    ad.compute_scale(&linear).unwrap();
    assert!(ad.scale_memory().is_none(), "LoRA has no g");
    let xh = x_host(T);
    let x = emu.upload_slice(&xh).unwrap();
    let mut y = emu.alloc_slice::<bf16>(T * D_OUT).unwrap();
    let mut lin = linear;
    lin.forward(
        &ad,
        &emu.view(&x, MatShape::new(T, D_IN)),
        BaseResult::Compute,
        &mut emu.view_mut(&mut y, MatShape::new(T, D_OUT)),
    )
    .unwrap();
    let got = download_tensor::<_, bf16>(&*emu, &y, vec![T, D_OUT])
        .unwrap()
        .to_f64();
    let e = rel_l2(&got, &cpu_y(&l, &xh, T));
    assert!(e < 1e-2, "rel-L2 {e:e}");
}

/// A kernel that fails is reported with the `Launch` kind, through the launchers' context,
/// naming the kernel.
#[test]
fn a_failing_kernel_has_the_launch_kind() {
    use dorafuse::backend::{DeviceBuffer, KernelArg, LaunchDims};
    let b = EmuBackend::new(3);
    let out = b.alloc_zeroed(64 * 4).unwrap();
    let dims = LaunchDims {
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: 0,
    };
    // SAFETY: emu_trap takes (int* out [blockDim.x], int bad); `out` holds 64 ints.
    let r = unsafe {
        b.launch(
            "emu_trap",
            dims,
            &[KernelArg::Ptr(out.ptr()), KernelArg::I32(37)],
        )
    };
    let e = anyhow::Context::context(r, "forward of attn.q_proj").unwrap_err();
    assert_eq!(kind(&e), Some(ErrorKind::Launch));
    assert!(format!("{e:#}").contains("emu_trap"), "{e:#}");
}

/// Layers and adapters sit in an engine's structs, shared across threads.
#[test]
fn layers_and_adapters_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DoraLinear<EmuBackend>>();
    send_sync::<DoraAdapter<EmuBackend>>();
    send_sync::<DoraLinear<dorafuse::cuda::CudaBackend>>();
    send_sync::<DoraAdapter<dorafuse::cuda::CudaBackend>>();
}

#[test]
fn compute_scale_launches_the_tuned_norm_split_over_d_in() {
    use dorafuse::emu::RecordOptions;
    use dorafuse::kernels::spec::{self, Tuning};
    // A recording emulator lists the launches; d_in = 72 spans two 64-column chunks, so the
    // tuned norm (v1 for bf16 with f32 adapters) splits it in two and sums the partials.
    let emu = Arc::new(EmuBackend::new(3).recording(RecordOptions::default()));
    let layer = layer(0, true);
    let linear = DoraLinear::upload(emu.clone(), &layer).unwrap();
    let mut adapter =
        DoraAdapter::upload(&*emu, &adapter_module(&layer, "proj"), DType::F32).unwrap();
    emu.take_records();
    adapter.compute_scale(&linear).unwrap();
    let launches: Vec<(String, [u32; 3])> = emu
        .take_records()
        .into_iter()
        .map(|r| (r.kernel, r.grid))
        .collect();
    let (splits, _) = spec::norm_splits(1, DType::F32, D_OUT, D_IN, R, Tuning::Tuned);
    assert_eq!(splits, 2);
    assert_eq!(
        launches,
        vec![
            (
                "dora_norm_v1_bf16_a32".to_string(),
                [D_OUT.div_ceil(16) as u32, splits as u32, 1]
            ),
            ("dora_norm_reduce_f32".to_string(), [1, 1, 1]),
        ]
    );
    // n and g bit-identical to the library's norm (the same tuned launches), and the adapter
    // keeps only n and g.
    let (n, g) = dorafuse::kernels::norm(&*emu, &layer, None).unwrap();
    let mem = adapter.scale_memory().unwrap();
    assert_eq!(mem.len(), 2 * D_OUT);
    let got = emu.download_slice(mem).unwrap();
    assert_eq!(&got[..D_OUT], &n[..]);
    assert_eq!(&got[D_OUT..], &g.unwrap()[..]);
}

#[test]
fn ranges_that_overflow_are_refused_not_wrapped() {
    let s = setup();
    let emu = s.emu.clone();
    let buf = emu.alloc_zeroed(64 * 4).unwrap();
    let whole = dorafuse::kernels::DevTensor::of(&buf, DType::F32);
    let mid = whole.slice(16, 16).unwrap();
    for (start, len) in [(usize::MAX, 2), (2, usize::MAX), (usize::MAX / 4 + 1, 1)] {
        let e = mid.slice(start, len).expect_err("an overflowing slice");
        assert!(e.to_string().contains("of a 16-element f32 view"), "{e}");
    }
    let x = emu.alloc_slice::<bf16>(T * D_IN).unwrap();
    let v = emu.view(&x, MatShape::new(T, D_IN));
    assert!(fails(v.columns(usize::MAX, 2).map(drop)).contains("outside"));
    assert!(fails(v.rows(1, usize::MAX).map(drop)).contains("outside"));
    // A shape whose span passes usize::MAX is too long for any memory.
    let huge = MatShape::strided(3, 1, usize::MAX / 2);
    assert_eq!(huge.span(), usize::MAX);
}

#[test]
fn an_adapter_module_built_by_hand_is_checked_against_its_rank() {
    let s = setup();
    let emu = s.emu.clone();
    let good = adapter_module(&s.layer, "proj");
    let upload =
        |m: &dorafuse::adapter::AdapterModule| DoraAdapter::upload(&*emu, m, DType::F32).map(drop);
    let t = |shape: Vec<usize>| {
        Tensor::from_f32(
            DType::F32,
            shape.clone(),
            &vec![0.5; shape.iter().product()],
        )
        .unwrap()
    };
    let cases = [
        (
            dorafuse::adapter::AdapterModule {
                rank: R - 1,
                ..good.clone()
            },
            "lora_A is [6, 72], expected [5, d_in]",
        ),
        (
            dorafuse::adapter::AdapterModule {
                lora_b: t(vec![D_OUT, R + 1]),
                ..good.clone()
            },
            "lora_B is [40, 7], expected [d_out, 6]",
        ),
        (
            dorafuse::adapter::AdapterModule {
                magnitude: Some(t(vec![D_OUT + 3])),
                ..good.clone()
            },
            "magnitude is [43], expected 40 elements",
        ),
        (
            dorafuse::adapter::AdapterModule {
                lora_a: t(vec![R * D_IN]),
                ..good.clone()
            },
            "lora_A is [432], expected [6, d_in]",
        ),
    ];
    for (m, want) in cases {
        let msg = fails(upload(&m));
        assert!(
            msg.contains("adapter module proj") && msg.contains(want),
            "{msg}"
        );
    }
}
