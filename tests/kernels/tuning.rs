//! The launch geometry of the tuned kernels (`spec::Tuning`): the wave targets at the
//! reference shapes, the split rule, and the before/after table of kernels/README.md, which
//! must be what `dorafuse profile --device emu --markdown kernels/README.md` writes (never
//! typed by hand).
//! The kernels under both configurations are checked against float64 truth in layer.rs.

use dorafuse::dtype::DType;
use dorafuse::kernels::spec::{self, Tuning, H200};

#[test]
fn readme_table_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let name = dorafuse::profile::README_SECTIONS[1];
    assert_eq!(
        dorafuse::markdown::section(&text, name).unwrap(),
        dorafuse::profile::geometry_table().to_markdown().trim_end(),
        "kernels/README.md is out of date: run `dorafuse profile --device emu --markdown \
         kernels/README.md`"
    );
}

/// Waves on H200 of a launch of `blocks` blocks.
fn waves(blocks: usize, threads: usize, shared: usize) -> f64 {
    H200.waves(blocks, threads, shared)
}

#[test]
fn tuned_launches_fill_an_h200_at_the_reference_shapes() {
    let (d_out, d_in, r, t) = (4096, 4096, 16, 512);
    // norm v2 (tensor cores, bf16 adapters and f32 adapters) and v1 (CUDA cores, f32
    // adapters): ≥ 2 full waves.
    for (version, adapter, rows) in [
        (2, DType::BF16, spec::NT_ROWS),
        (2, DType::F32, spec::NT_ROWS),
        (1, DType::F32, spec::VT_ROWS),
    ] {
        let (threads, shared) = (
            spec::norm_threads(version),
            spec::norm_shared_bytes(version, adapter, r),
        );
        let (before, _) = spec::norm_splits(version, adapter, d_out, d_in, r, Tuning::Previous);
        let (splits, per) = spec::norm_splits(version, adapter, d_out, d_in, r, Tuning::Tuned);
        assert_eq!(before, 1);
        assert_eq!(per % 64, 0, "v{version}: whole 64-column chunks per split");
        assert!(splits * per >= d_in && (splits - 1) * per < d_in);
        let w = waves(d_out.div_ceil(rows) * splits, threads, shared);
        assert!(w >= 2.0, "norm v{version}: {w} waves");
        assert!(splits * d_out <= spec::norm_partials_len(d_out, d_in));
    }
    // bwd_dz: ≥ 1 full wave at T = 512.
    let (tt, jt) = spec::bwd_dz_tiles(r);
    let sh = spec::bwd_dz_shared_bytes(tt, jt, r);
    let (splits, per) = spec::bwd_dz_splits(t, d_out, r, Tuning::Tuned);
    assert_eq!(per % jt, 0);
    assert!(splits * per >= d_out && (splits - 1) * per < d_out);
    let w = waves(t.div_ceil(tt) * splits, spec::THREADS, sh);
    assert!(w >= 1.0, "bwd_dz: {w} waves");
    assert!(waves(t.div_ceil(tt), spec::THREADS, sh) < 1.0);
    // tn (grad_B over d_out columns, grad_A over d_in): ≥ 1 full wave at T = 512.
    for ncols in [d_out, d_in] {
        let tile = spec::tn_rank_tile(r);
        let (splits, per) = spec::tn_splits(t, r, ncols, Tuning::Tuned);
        assert_eq!(per % spec::TN_TCHUNK, 0);
        assert!(splits * per >= t && (splits - 1) * per < t);
        let blocks = ncols.div_ceil(spec::TN_COLS) * r.div_ceil(tile) * splits;
        let w = waves(blocks, spec::THREADS, spec::tn_static_shared_bytes(tile));
        assert!(w >= 1.0, "tn: {w} waves");
    }
}

#[test]
fn split_rule_covers_every_chunk_once_within_the_limit() {
    for chunks in [1, 2, 3, 7, 64, 100, 1000, 70_000] {
        for base in [1, 3, 64, 5000] {
            for target in [1, 264, 1056, 3432] {
                for max in [1, 5, spec::MAX_GRID_YZ] {
                    let (s, per) = spec::split_chunks(chunks, base, target, max);
                    assert!(s >= 1 && s <= max, "{chunks} {base} {target} {max}: {s}");
                    assert!(s * per >= chunks && (s - 1) * per < chunks);
                    // The target is met whenever there are enough chunks and one chunk per
                    // split fits the limit.
                    let reachable = target.div_ceil(base) <= chunks && chunks <= max;
                    assert!(!reachable || s * base >= target, "{chunks} {base} {target}");
                }
            }
        }
    }
}

#[test]
fn residency_follows_the_h200_limits() {
    // 128 threads and no shared memory: 16 blocks (2048 threads); 256: 8.
    assert_eq!(H200.resident_blocks(128, 0), 16);
    assert_eq!(H200.resident_blocks(256, 0), 8);
    // 48 KB + 1 KB reserved per block: 228 KiB holds 4.
    assert_eq!(H200.resident_blocks(128, 48 * 1024), 4);
    // 32 threads: the 32-block limit.
    assert_eq!(H200.resident_blocks(32, 0), 32);
}
