//! The adapter pool (`kernels::AdapterPool`), written once over the backend (`test_device!`):
//! mixed LoRA/DoRA/base-only batches against the float64 truth in every dtype, batch
//! invariance bitwise, hot swap on a side stream (only the slot's tokens change, from the next
//! batch on; the serving stream waits on the side stream only through the swap's event, and
//! no forward waits at all), in-place finishing of a fused-QKV column slice with the
//! neighbouring columns bit-untouched, and refusals as one-line errors.

use super::device::{test_device, TestBackend};
use super::multi_adapter::{
    index, make_layer, make_x, one_line, rng, select_rows, truth, Pattern, Spec,
};
use dorafuse::backend::{Backend, DevPtr, DeviceBuffer, Elem};
use dorafuse::case_multi::{AdapterWeights, MultiLayer};
use dorafuse::kernels::{AdapterPool, BaseResult, DoraAdapter, DoraLinear, MatShape, SlotIndex};
use dorafuse::tensor::rel_l2;
use dorafuse::{DType, Tensor};
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::Rng;
use std::sync::Arc;

/// A module's layer on the main stream, a side stream, and a pool holding adapter k in slot k.
struct Served<B: Backend> {
    main: Arc<B>,
    side: B,
    linear: DoraLinear<B>,
    pool: AdapterPool<B>,
}

fn typed<T: Elem>(t: &Tensor) -> Vec<T> {
    bytemuck::cast_slice::<u8, T>(t.cast(T::DTYPE).as_bytes()).to_vec()
}

fn adapter_as<B: Backend, T: Elem>(
    b: &B,
    a: &AdapterWeights,
    (d_in, d_out): (usize, usize),
) -> DoraAdapter<B> {
    let up = |t: &Tensor| Arc::new(b.upload_slice::<T>(&typed::<T>(t)).unwrap());
    let m = a
        .magnitude
        .as_ref()
        .map(|m| Arc::new(b.upload_slice::<f32>(&typed::<f32>(m)).unwrap()));
    let r = a.rank();
    DoraAdapter::new(
        b,
        up(&a.lora_a),
        up(&a.lora_b),
        m,
        a.scaling as f32,
        r,
        d_in,
        d_out,
    )
    .unwrap()
}

/// Adapter `a` on `b`, its factors stored in `adt`.
fn adapter<B: Backend>(
    b: &B,
    a: &AdapterWeights,
    adt: DType,
    dims: (usize, usize),
) -> DoraAdapter<B> {
    match adt {
        DType::F32 => adapter_as::<B, f32>(b, a, dims),
        DType::F16 => adapter_as::<B, f16>(b, a, dims),
        DType::BF16 => adapter_as::<B, bf16>(b, a, dims),
    }
}

fn serve<B: TestBackend>(
    seed: u64,
    layer: &MultiLayer,
    dt: DType,
    adt: DType,
    slots: usize,
    r_max: usize,
) -> Served<B> {
    let main = Arc::new(B::with_seed(seed));
    let side = main.side_stream();
    let (d_in, d_out) = layer.dims().unwrap();
    let mut base = layer.adapter_layer(0);
    base.weight = base.weight.cast(dt);
    let linear = DoraLinear::upload(main.clone(), &base).unwrap();
    let mut pool = AdapterPool::new(&linear, slots, r_max, adt).unwrap();
    for (k, a) in layer.adapters.iter().enumerate().take(slots) {
        let ad = adapter(&side, a, adt, (d_in, d_out));
        pool.load(&linear, &side, k, ad).unwrap();
    }
    Served {
        main,
        side,
        linear,
        pool,
    }
}

/// How the batch's base result reaches the pool.
#[derive(Clone, Copy)]
enum Base<'a> {
    Compute,
    /// Given `[T, d_out]`.
    Given(&'a Tensor),
    /// Columns `col0..col0 + d_out` of `out [T, ld]` hold it, finished in place.
    InPlace(&'a Tensor, usize),
}

fn forward_as<B: Backend, T: Elem>(
    b: &B,
    linear: &DoraLinear<B>,
    pool: &AdapterPool<B>,
    x: &Tensor,
    idx: &[i32],
    base: Base,
) -> anyhow::Result<Tensor> {
    let (t, d_in, d_out) = (x.shape()[0], linear.d_in(), linear.d_out());
    let xs = b.upload_slice::<T>(&typed::<T>(x))?;
    let mut ib = b.alloc_zeroed(4 * t)?;
    b.upload(&mut ib, bytemuck::cast_slice(idx))?;
    let index = SlotIndex::from_buffer(b, &ib, t)?;
    let mut ws = b.alloc_slice::<f32>(pool.workspace_len(t))?;
    let (mut out, shape) = match base {
        Base::InPlace(o, _) => (b.upload_slice::<T>(&typed::<T>(o))?, o.shape().to_vec()),
        _ => (b.alloc_slice::<T>(t * d_out)?, vec![t, d_out]),
    };
    let given = match base {
        Base::Given(g) => Some(b.upload_slice::<T>(&typed::<T>(g))?),
        _ => None,
    };
    {
        let xv = b.view(&xs, MatShape::new(t, d_in));
        let ld = shape[1];
        let mut yv = b.view_mut(&mut out, MatShape::new(t, ld));
        let len = pool.workspace_len(t);
        let mut wv = b.view_mut(&mut ws, MatShape::new(1, len));
        let gv = given.as_ref().map(|g| b.view(g, MatShape::new(t, d_out)));
        let (col0, mode) = match (base, &gv) {
            (Base::Compute, _) => (0, BaseResult::Compute),
            (Base::Given(_), Some(v)) => (0, BaseResult::Given(v.rows(0, t)?)),
            (Base::InPlace(_, c), _) => (c, BaseResult::InPlace),
            _ => unreachable!(),
        };
        let mut slice = yv.columns(col0, d_out)?;
        pool.forward(linear, &xv, &index, mode, &mut slice, &mut wv)?;
    }
    let host = b.download_slice(&out)?;
    Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(&host))
}

/// One batch through `pool`, then the device error word checked.
fn forward_on<B: Backend>(
    b: &B,
    linear: &DoraLinear<B>,
    pool: &mut AdapterPool<B>,
    x: &Tensor,
    idx: &[i32],
    base: Base,
) -> anyhow::Result<Tensor> {
    let y = match x.dtype() {
        DType::F32 => forward_as::<B, f32>(b, linear, pool, x, idx, base),
        DType::F16 => forward_as::<B, f16>(b, linear, pool, x, idx, base),
        DType::BF16 => forward_as::<B, bf16>(b, linear, pool, x, idx, base),
    }?;
    pool.check_errors()?;
    Ok(y)
}

fn forward<B: Backend>(
    s: &mut Served<B>,
    x: &Tensor,
    idx: &[i32],
    base: Base,
) -> anyhow::Result<Tensor> {
    forward_on(&*s.main, &s.linear, &mut s.pool, x, idx, base)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_f32().iter().map(|v| v.to_bits()).collect()
}

const SPECS: [Spec; 5] = [
    Spec { r: 8, dora: true },
    Spec { r: 16, dora: false },
    Spec { r: 64, dora: true },
    Spec { r: 3, dora: true },
    Spec { r: 33, dora: false },
];

/// Mixed LoRA, DoRA and base-only tokens in every pattern engines use, in every dtype and
/// with f32 adapters beside 16-bit activations, against the float64 truth.
fn mixed_batches_match_the_truth<B: TestBackend>() {
    let combos = [
        (DType::F32, DType::F32),
        (DType::F16, DType::F16),
        (DType::BF16, DType::BF16),
        (DType::F16, DType::F32),
        (DType::BF16, DType::F32),
    ];
    let patterns = [Pattern::Segments, Pattern::Decode, Pattern::Unsorted];
    for (ci, &(dt, adt)) in combos.iter().enumerate() {
        let (d_in, d_out) = [(33, 65), (129, 257), (65, 31)][ci % 3];
        let layer = make_layer(
            ci as u64 + 3,
            (d_in, d_out),
            &SPECS,
            dt,
            adt,
            ci != 1,
            false,
        );
        let mut s = serve::<B>(B::SEEDS[0], &layer, dt, adt, 6, 64);
        for (pi, &p) in patterns.iter().enumerate() {
            let t = [1, 17, 40][(ci + pi) % 3];
            let x = make_x(ci as u64 * 7 + pi as u64, t, d_in, dt);
            let idx = index(p, t, SPECS.len(), pi as u64);
            let want = truth(&layer, &x, &idx);
            let y = forward(&mut s, &x, &idx, Base::Compute).unwrap();
            let e = rel_l2(&y.to_f64(), &want);
            assert!(
                e <= dt.tolerance(),
                "{dt}/{adt} {p:?} T={t}: {e:.3e} > {:.0e}",
                dt.tolerance()
            );
        }
    }
}
test_device!(mixed_batches_match_the_truth);

/// A token's output alone and inside shuffled batches of other adapters' tokens, bitwise, for
/// T across 1, 2, the tile and block edges and 257; the base is given, so the pool's kernels
/// alone are under test.
fn a_token_is_bit_identical_alone_and_in_any_batch<B: TestBackend>() {
    let (d_in, d_out) = (137, 70);
    for (dt, adt) in [(DType::F32, DType::F32), (DType::BF16, DType::F32)] {
        let layer = make_layer(31, (d_in, d_out), &SPECS, dt, adt, true, false);
        let mut s = serve::<B>(B::SEEDS[0], &layer, dt, adt, 5, 64);
        let n = 257;
        let xs = make_x(32, n, d_in, dt);
        let bases = make_x(33, n, d_out, dt);
        let mut g = rng(34);
        let slots: Vec<i32> = (0..n).map(|_| g.gen_range(-1..5)).collect();
        let mut run = |sel: &[usize]| -> Vec<u32> {
            let idx: Vec<i32> = sel.iter().map(|&i| slots[i]).collect();
            let b = select_rows(&bases, sel);
            bits(&forward(&mut s, &select_rows(&xs, sel), &idx, Base::Given(&b)).unwrap())
        };
        for k in [0, 1, 2, -1] {
            let target = (0..n).find(|&i| slots[i] == k).unwrap();
            let alone = run(&[target]);
            for t in [
                1, 2, 3, 7, 8, 9, 31, 32, 33, 64, 65, 128, 129, 255, 256, 257,
            ] {
                let mut others: Vec<usize> = (0..n).filter(|&i| i != target).collect();
                others.shuffle(&mut g);
                let mut sel = others[..t - 1].to_vec();
                let pos = g.gen_range(0..t);
                sel.insert(pos, target);
                let y = run(&sel);
                assert!(
                    y[pos * d_out..(pos + 1) * d_out] == alone[..],
                    "{dt}/{adt}: token {target} (slot {k}) at {pos} of {t} differs from alone"
                );
            }
        }
    }
}
test_device!(a_token_is_bit_identical_alone_and_in_any_batch);

/// Replacing slot 1 on the side stream: a batch issued before the swap is served by the old
/// adapter, one issued after by the new; tokens of other slots are bit-identical.
fn hot_swap_changes_only_that_slots_tokens<B: TestBackend>() {
    let (d_in, d_out, t) = (29, 45, 12);
    let specs = [
        Spec { r: 8, dora: true },
        Spec { r: 16, dora: true },
        Spec { r: 4, dora: false },
        Spec { r: 12, dora: true },
    ];
    let layer = make_layer(
        41,
        (d_in, d_out),
        &specs,
        DType::F32,
        DType::F32,
        true,
        false,
    );
    let mut s = serve::<B>(B::SEEDS[0], &layer, DType::F32, DType::F32, 3, 16);
    let x = make_x(43, t, d_in, DType::F32);
    let idx = vec![0, 1, 2, -1, 1, 1, 0, 2, 1, -1, 0, 1];
    let y1 = forward(&mut s, &x, &idx, Base::Compute).unwrap();
    let new = adapter(&s.side, &layer.adapters[3], DType::F32, (d_in, d_out));
    s.pool.replace(&s.linear, &s.side, 1, new).unwrap();
    let y2 = forward(&mut s, &x, &idx, Base::Compute).unwrap();
    let mut swapped = layer.clone();
    swapped.adapters[1] = layer.adapters[3].clone();
    let want = truth(&swapped, &x, &idx);
    let before = truth(&layer, &x, &idx);
    let (b1, b2) = (bits(&y1), bits(&y2));
    let (y1, y2) = (y1.to_f64(), y2.to_f64());
    for (i, &k) in idx.iter().enumerate() {
        let r = i * d_out..(i + 1) * d_out;
        if k == 1 {
            let e_old = rel_l2(&y1[r.clone()], &before[r.clone()]);
            assert!(
                e_old <= 1e-5,
                "token {i} before the swap: old adapter, {e_old:.3e}"
            );
            let e_new = rel_l2(&y2[r.clone()], &want[r.clone()]);
            assert!(
                e_new <= 1e-5,
                "token {i} after the swap: new adapter, {e_new:.3e}"
            );
            assert!(
                b1[r.clone()] != b2[r],
                "token {i} on the swapped slot changed"
            );
        } else {
            assert!(
                b1[r.clone()] == b2[r],
                "token {i} (slot {k}) must not change"
            );
        }
    }
    // Clearing the slot: its tokens are flagged as naming an empty slot.
    s.pool.clear(&s.side, 1).unwrap();
    let e = forward(&mut s, &x, &idx, Base::Compute).unwrap_err();
    assert!(one_line(&e).contains("empty slot"), "{e:#}");
    assert_eq!(
        s.pool.reclaim().unwrap(),
        0,
        "every swap passed once synchronised"
    );
}
test_device!(hot_swap_changes_only_that_slots_tokens);

/// The k columns of a fused QKV output `[T, 3·d_out]` finished in place: the slice equals the
/// same batch with the base given, bitwise; the q and v columns are bit-untouched.
fn finishes_a_fused_qkv_slice_in_place<B: TestBackend>() {
    let (d_in, d_out, t) = (40, 33, 9);
    for (dt, adt) in [(DType::F32, DType::F32), (DType::F16, DType::F32)] {
        let layer = make_layer(51, (d_in, d_out), &SPECS, dt, adt, true, false);
        let mut s = serve::<B>(B::SEEDS[0], &layer, dt, adt, 5, 64);
        let x = make_x(52, t, d_in, dt);
        let qkv = make_x(53, t, 3 * d_out, dt);
        let idx = vec![0, 4, -1, 2, 2, 1, 3, -1, 0];
        let base: Vec<f32> = (0..t)
            .flat_map(|i| qkv.to_f32()[i * 3 * d_out + d_out..i * 3 * d_out + 2 * d_out].to_vec())
            .collect();
        let base = Tensor::from_f32(dt, vec![t, d_out], &base).unwrap();
        let want = bits(&forward(&mut s, &x, &idx, Base::Given(&base)).unwrap());
        let out = bits(&forward(&mut s, &x, &idx, Base::InPlace(&qkv, d_out)).unwrap());
        let before = bits(&qkv);
        for i in 0..t {
            let row = i * 3 * d_out;
            assert!(
                out[row..row + d_out] == before[row..row + d_out]
                    && out[row + 2 * d_out..row + 3 * d_out]
                        == before[row + 2 * d_out..row + 3 * d_out],
                "{dt}: token {i}: a neighbouring column changed"
            );
            assert!(
                out[row + d_out..row + 2 * d_out] == want[i * d_out..(i + 1) * d_out],
                "{dt}: token {i}: the slice differs from the given-base forward"
            );
        }
    }
}
test_device!(finishes_a_fused_qkv_slice_in_place);

/// Bad input is refused with one line naming what is wrong.
fn refusals_are_one_line_errors<B: TestBackend>() {
    let (d_in, d_out) = (24, 40);
    let small = [SPECS[0], SPECS[1], SPECS[3]];
    let layer = make_layer(
        61,
        (d_in, d_out),
        &small,
        DType::F32,
        DType::F32,
        false,
        false,
    );
    let mut s = serve::<B>(B::SEEDS[0], &layer, DType::F32, DType::F32, 3, 16);
    let x = make_x(62, 4, d_in, DType::F32);
    // An index out of range and a negative one: flagged on the device, finished base-only.
    for bad in [3, -2] {
        let e = forward(&mut s, &x, &[0, bad, 1, -1], Base::Compute).unwrap_err();
        let m = one_line(&e);
        assert!(m.contains("adapter_index") && m.contains("-1..=2"), "{m}");
    }
    // The flag was cleared: a good batch passes.
    forward(&mut s, &x, &[0, 1, 2, -1], Base::Compute).unwrap();
    // Rank above the pool's limit.
    let big = make_layer(
        63,
        (d_in, d_out),
        &[Spec { r: 17, dora: true }],
        DType::F32,
        DType::F32,
        false,
        false,
    );
    let a = adapter(&s.side, &big.adapters[0], DType::F32, (d_in, d_out));
    let e = s.pool.replace(&s.linear, &s.side, 0, a).unwrap_err();
    let m = one_line(&e);
    assert!(
        m.contains("slot 0") && m.contains("rank 17") && m.contains("16"),
        "{m}"
    );
    // Adapter/base mismatch.
    let other = make_layer(
        64,
        (d_in + 1, d_out),
        &SPECS,
        DType::F32,
        DType::F32,
        false,
        false,
    );
    let a = adapter(&s.side, &other.adapters[0], DType::F32, (d_in + 1, d_out));
    let e = s.pool.replace(&s.linear, &s.side, 1, a).unwrap_err();
    let m = one_line(&e);
    assert!(m.contains("slot 1") && m.contains("d_in=25"), "{m}");
    // Another storage dtype than the pool's.
    let a = adapter(&s.side, &layer.adapters[0], DType::BF16, (d_in, d_out));
    let e = s.pool.replace(&s.linear, &s.side, 2, a).unwrap_err();
    assert!(one_line(&e).contains("bf16"), "{e:#}");
    // Loading into an occupied slot, and a slot outside the pool.
    let a = adapter(&s.side, &layer.adapters[0], DType::F32, (d_in, d_out));
    let e = s.pool.load(&s.linear, &s.side, 2, a).unwrap_err();
    assert!(one_line(&e).contains("slot 2: already holds"), "{e:#}");
    let a = adapter(&s.side, &layer.adapters[0], DType::F32, (d_in, d_out));
    let e = s.pool.replace(&s.linear, &s.side, 3, a).unwrap_err();
    assert!(one_line(&e).contains("slot 3 outside"), "{e:#}");
    // Activations of another dtype, a short workspace.
    let e = forward(&mut s, &x.cast(DType::F16), &[0, 1, 2, -1], Base::Compute).unwrap_err();
    assert!(one_line(&e).contains("x: f16"), "{e:#}");
    // Slot indices at an address off their 4-byte i32 elements, named as i32.
    {
        let b = &*s.main;
        let t = 4;
        let xs = b.upload_slice::<f32>(&typed::<f32>(&x)).unwrap();
        let mut out = b.alloc_slice::<f32>(t * d_out).unwrap();
        let mut ws = b.alloc_slice::<f32>(s.pool.workspace_len(t)).unwrap();
        let ib = b.alloc_zeroed(4 * t + 4).unwrap();
        // SAFETY: the buffer holds 4·t bytes from byte 2 on; the pool refuses the misaligned
        // address before any launch reads it.
        let index = unsafe { SlotIndex::from_raw(DevPtr(ib.ptr().0 + 2), t, b.device()) };
        let xv = b.view(&xs, MatShape::new(t, d_in));
        let mut yv = b.view_mut(&mut out, MatShape::new(t, d_out));
        let len = s.pool.workspace_len(t);
        let mut wv = b.view_mut(&mut ws, MatShape::new(1, len));
        let e = s
            .pool
            .forward(
                &s.linear,
                &xv,
                &index,
                BaseResult::Compute,
                &mut yv,
                &mut wv,
            )
            .unwrap_err();
        let m = one_line(&e);
        assert!(
            m.starts_with("adapter_index: address") && m.contains("4-byte i32 elements"),
            "{m}"
        );
    }
    // Nothing of the refused swaps took effect: the pool still serves its adapters.
    let y = forward(&mut s, &x, &[0, 1, 2, -1], Base::Compute).unwrap();
    let e = rel_l2(&y.to_f64(), &truth(&layer, &x, &[0, 1, 2, -1]));
    assert!(e <= 1e-5, "{e:.3e}");
}
test_device!(refusals_are_one_line_errors);

/// On the emulator, the order its streams recorded: a swap makes the serving stream wait on
/// exactly one event, recorded by the side stream after its load (the norm of the new adapter
/// ran there), before the one launch that commits the table; the serving stream's host never
/// waits during the swap, the side stream never waits on the serving stream, and no forward,
/// before or after the swap, waits on anything.
#[test]
fn a_swap_orders_the_serving_stream_through_one_event_and_forwards_wait_for_nothing() {
    use dorafuse::emu::{EmuBackend, EmuStreamOp};
    let (d_in, d_out) = (29, 45);
    let layer = make_layer(
        71,
        (d_in, d_out),
        &SPECS,
        DType::F32,
        DType::F32,
        true,
        false,
    );
    let mut s = serve::<EmuBackend>(1, &layer, DType::F32, DType::F32, 2, 64);
    let (main, side) = (s.main.stream_id(), s.side.stream_id());
    let x = make_x(72, 5, d_in, DType::F32);
    let idx = [0, 1, -1, 1, 0];
    s.main.clear_stream_log();
    forward(&mut s, &x, &idx, Base::Compute).unwrap();
    let before = s.main.stream_log();
    s.main.clear_stream_log();
    let new = adapter(&s.side, &layer.adapters[2], DType::F32, (d_in, d_out));
    s.pool.replace(&s.linear, &s.side, 1, new).unwrap();
    let swap = s.main.stream_log();
    s.main.clear_stream_log();
    forward(&mut s, &x, &idx, Base::Compute).unwrap();
    let after = s.main.stream_log();

    let launches = |ops: &[EmuStreamOp], on: u64| -> Vec<String> {
        ops.iter()
            .filter_map(|o| match o {
                EmuStreamOp::Launch { stream, kernel } if *stream == on => Some(kernel.clone()),
                _ => None,
            })
            .collect()
    };
    for (what, ops) in [("before", &before), ("after", &after)] {
        assert!(
            !ops.iter().any(|o| matches!(o, EmuStreamOp::Wait { .. })),
            "the forward {what} the swap waited on an event: {ops:?}"
        );
        let l = launches(ops, main);
        assert!(
            l.iter().any(|k| k.starts_with("dora_multi_shrink"))
                && l.iter().any(|k| k.starts_with("dora_multi_expand")),
            "the forward {what} the swap ran on the serving stream: {l:?}"
        );
        assert!(launches(ops, side).is_empty(), "{what}: {ops:?}");
    }
    // The swap: side = [norm launch(es).., record E]; main = [wait E, copy table, record].
    let side_launches = launches(&swap, side);
    assert!(
        side_launches.iter().all(|k| k.starts_with("dora_norm")) && !side_launches.is_empty(),
        "the new adapter's g is computed on the side stream: {side_launches:?}"
    );
    let waits: Vec<(usize, _)> = swap
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            EmuStreamOp::Wait { stream, event } => Some((i, (*stream, *event))),
            _ => None,
        })
        .collect();
    assert_eq!(waits.len(), 1, "one wait per swap: {swap:?}");
    let (wi, (waiter, event)) = waits[0];
    assert_eq!(
        waiter, main,
        "the serving stream waits, not the side stream"
    );
    assert_eq!(event.stream, side, "on the side stream's event");
    let recorded = swap
        .iter()
        .position(|o| matches!(o, EmuStreamOp::Record { event: e, .. } if *e == event))
        .expect("the event was recorded during the swap");
    let last_side_launch = swap
        .iter()
        .rposition(|o| matches!(o, EmuStreamOp::Launch { stream, .. } if *stream == side))
        .unwrap();
    assert!(last_side_launch < recorded && recorded < wi, "{swap:?}");
    let main_launches: Vec<usize> = swap
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, EmuStreamOp::Launch { stream, .. } if *stream == main))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(launches(&swap, main), ["dora_multi_copy_table"], "{swap:?}");
    assert!(
        main_launches[0] > wi,
        "the commit is ordered after the wait: {swap:?}"
    );
    assert!(
        !swap
            .iter()
            .any(|o| matches!(o, EmuStreamOp::HostWait { stream } if *stream == main)),
        "the host never waits for the serving stream during a swap: {swap:?}"
    );
}

/// On a GPU: with the side stream held busy (a queue of large GEMMs), a batch served on the
/// main stream after a swap completes while the side stream's work is still running: the
/// forward waits for nothing on the side stream. A warm-up batch of the same shape runs first,
/// as an engine's would: under CUDA's lazy loading the first launch of a cuBLAS kernel loads it,
/// and loading can synchronise the context (dorafuse's own kernels are all loaded with the
/// module). Not named `cuda`: the sanitizer runs of `--ignored cuda` serialise streams, so
/// scripts/gpu-check.sh runs it on its own, unsanitised.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_forward_does_not_wait_for_a_busy_side_stream_on_gpu() {
    use dorafuse::backend::GemmDesc;
    use dorafuse::cuda::CudaBackend;
    let (d_in, d_out) = (256, 512);
    let layer = make_layer(
        81,
        (d_in, d_out),
        &SPECS,
        DType::F32,
        DType::F32,
        true,
        false,
    );
    let mut s = serve::<CudaBackend>(0, &layer, DType::F32, DType::F32, 5, 64);
    let new = adapter(&s.side, &layer.adapters[3], DType::F32, (d_in, d_out));
    s.pool.replace(&s.linear, &s.side, 0, new).unwrap();
    let x = make_x(82, 64, d_in, DType::F32);
    let idx: Vec<i32> = (0..64).map(|i| i % 6 - 1).collect();
    let warm = forward(&mut s, &x, &idx, Base::Compute).unwrap();
    let n = 4096;
    let buf = |b: &CudaBackend| b.alloc_zeroed(4 * n * n).unwrap();
    let (a, bm, mut c) = (buf(&s.side), buf(&s.side), buf(&s.side));
    let g = GemmDesc {
        m: n,
        n,
        k: n,
        a: a.ptr(),
        a_dtype: DType::F32,
        lda: n,
        trans_a: false,
        b: bm.ptr(),
        b_dtype: DType::F32,
        ldb: n,
        trans_b: false,
        c: c.ptr(),
        c_dtype: DType::F32,
        ldc: n,
        alpha: 1.0,
        beta: 1.0,
    };
    for _ in 0..60 {
        // SAFETY: a, b and c each hold n·n f32.
        unsafe { s.side.gemm(&g) }.unwrap();
    }
    let busy = s.side.record_event().unwrap();
    let y = forward(&mut s, &x, &idx, Base::Compute).unwrap();
    assert!(
        !s.side.event_complete(&busy).unwrap(),
        "the forward finished only after the side stream's work: it waited on it"
    );
    let mut swapped = layer.clone();
    swapped.adapters[0] = layer.adapters[3].clone();
    let e = rel_l2(&y.to_f64(), &truth(&swapped, &x, &idx));
    assert!(e <= 1e-5, "{e:.3e}");
    assert_eq!(
        bits(&warm),
        bits(&y),
        "the warm-up and the timed batch give the same bits"
    );
    s.side.synchronize().unwrap();
    let _ = &mut c;
}

fn engine_fixture(what: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/engine")
        .join(what)
}

/// The two PEFT DoRA adapters of tests/fixtures/engine (gen_engine.py: a on q, k, v with
/// r = 8; b on q, v with r = 4 and rsLoRA) loaded into the pools of one base model: every
/// module's mixed batch (a, b, base-only) against the float64 truth of each adapter's layer as
/// PEFT holds it; k_proj, which b leaves alone, serves b's tokens as base-only, unflagged.
fn peft_adapters_through_the_pools_match_the_truth<B: TestBackend>() {
    use dorafuse::adapter::{AdaptedModel, Adapter, BaseModel, ModelPools, PoolOptions};
    let base = BaseModel::open(&engine_fixture("base")).unwrap();
    let a = Adapter::load(&engine_fixture("adapter_a")).unwrap();
    let b = Adapter::load(&engine_fixture("adapter_b")).unwrap();
    let main = Arc::new(B::with_seed(B::SEEDS[0]));
    let side = main.side_stream();
    let list = [("a".to_string(), &a), ("b".to_string(), &b)];
    let mut pools =
        ModelPools::load(main.clone(), &side, &base, &list, &PoolOptions::default()).unwrap();
    let names: Vec<&String> = pools.modules.keys().collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let models = [
        AdaptedModel::new(&base, &a).unwrap(),
        AdaptedModel::new(&base, &b).unwrap(),
    ];
    let t = 13;
    let idx: Vec<i32> = (0..t as i32)
        .map(|i| [0, 1, -1, 1, 0][i as usize % 5])
        .collect();
    let mut seen_base_only = false;
    for (n, m) in pools.modules.iter_mut() {
        let mut adapters = Vec::new();
        let mut truth_idx = idx.clone();
        let mut weight = None;
        for (k, model) in models.iter().enumerate() {
            if model.adapter.modules.contains_key(n) {
                let l = model.layer(n).unwrap();
                weight.get_or_insert((l.weight.clone(), l.bias.clone(), l.fan_in_fan_out));
                adapters.push(AdapterWeights {
                    lora_a: l.lora_a,
                    lora_b: l.lora_b,
                    magnitude: l.magnitude,
                    scaling: l.scaling,
                });
            } else {
                // The adapter leaves this module alone: its tokens are base-only.
                seen_base_only = true;
                truth_idx
                    .iter_mut()
                    .filter(|i| **i == k as i32)
                    .for_each(|i| *i = -1);
                adapters.push(adapters[0].clone());
            }
        }
        let (weight, bias, fan_in_fan_out) = weight.unwrap();
        let dt = weight.dtype();
        let layer = MultiLayer {
            weight,
            bias,
            fan_in_fan_out,
            adapters,
        };
        let (d_in, _) = layer.dims().unwrap();
        let x = make_x(91, t, d_in, dt);
        let y = forward_on(&*main, &m.linear, &mut m.pool, &x, &idx, Base::Compute)
            .unwrap_or_else(|e| panic!("{n}: {e:#}"));
        let e = rel_l2(&y.to_f64(), &truth(&layer, &x, &truth_idx));
        assert!(e <= dt.tolerance(), "{n}: {e:.3e} > {:.0e}", dt.tolerance());
    }
    assert!(seen_base_only, "adapter b leaves k_proj alone");
}
test_device!(peft_adapters_through_the_pools_match_the_truth);

/// Adapters that do not fit the base or the pools are refused with one line naming the
/// adapter and the module.
#[test]
fn peft_adapters_that_do_not_fit_are_refused_naming_adapter_and_module() {
    use dorafuse::adapter::{Adapter, BaseModel, ModelPools, PoolOptions};
    use dorafuse::emu::EmuBackend;
    let base = BaseModel::open(&engine_fixture("base")).unwrap();
    let a = Adapter::load(&engine_fixture("adapter_a")).unwrap();
    let main = Arc::new(EmuBackend::new(1));
    let side = main.new_stream();
    let load = |list: &[(String, &Adapter)], opts: &PoolOptions| {
        ModelPools::load(main.clone(), &side, &base, list, opts)
            .err()
            .map(|e| one_line(&e))
            .expect("refused")
    };
    // A rank above the pools' limit.
    let opts = PoolOptions {
        r_max: Some(4),
        ..Default::default()
    };
    let m = load(&[("a".into(), &a)], &opts);
    assert!(
        m.starts_with("adapter a: module attn.") && m.contains("rank 8 above") && m.contains(" 4"),
        "{m}"
    );
    // Target modules absent from the base: an adapter of another model (MiniLM's q, v).
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/minilm/qv_r8/adapter");
    let other = Adapter::load(&dir).unwrap();
    let m = load(
        &[("a".into(), &a), ("minilm".into(), &other)],
        &PoolOptions::default(),
    );
    assert!(m.starts_with("adapter minilm: "), "{m}");
    // More adapters than slots.
    let opts = PoolOptions {
        slots: Some(1),
        ..Default::default()
    };
    let m = load(&[("a".into(), &a), ("a2".into(), &a)], &opts);
    assert!(m.contains("2 adapters") && m.contains("1 slots"), "{m}");
    // 16-bit adapters beside another 16-bit base dtype.
    let opts = PoolOptions {
        adapter_dtype: Some(DType::F16),
        ..Default::default()
    };
    let m = load(&[("a".into(), &a)], &opts);
    assert!(
        m.starts_with("adapter a: module attn.") && m.contains("f16"),
        "{m}"
    );
}
