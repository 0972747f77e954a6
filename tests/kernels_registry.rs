//! The one list of kernels, the specialisation table and the tile constants agree:
//! every entry point the dispatcher can launch is registered in `kernels/kernels.list`
//! (hence built for the emulator and by nvcc), every registered entry point of the fused
//! kernels is reachable from the table, and the constants mirrored in `spec.rs` equal those
//! of `kernels/common.cuh`.

use dorafuse::kernels::{spec, KERNELS};
use dorafuse::DType;
use std::collections::BTreeSet;

/// The `.cu` files of the fused kernels (other entries of the list, if any, are not ours).
const FILES: [&str; 3] = ["norm", "forward", "backward"];

#[test]
fn table_and_kernel_list_agree() {
    let listed: BTreeSet<String> = KERNELS
        .iter()
        .filter(|(f, _)| FILES.contains(f))
        .map(|(_, n)| n.to_string())
        .collect();
    let table: BTreeSet<String> = spec::all_entries().into_iter().collect();
    let missing: Vec<_> = table.difference(&listed).collect();
    let unreachable: Vec<_> = listed.difference(&table).collect();
    assert!(
        missing.is_empty(),
        "in spec.rs but not in kernels.list: {missing:?}"
    );
    assert!(
        unreachable.is_empty(),
        "in kernels.list but not in spec.rs: {unreachable:?}"
    );
}

#[test]
fn every_entry_point_is_defined_in_its_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (file, name) in KERNELS.iter().filter(|(f, _)| FILES.contains(f)) {
        let src = std::fs::read_to_string(format!("{root}/kernels/{file}.cu")).unwrap();
        // Stamped names appear as `<prefix>_##sfx(` in the macro; plain ones literally.
        let found = src.contains(&format!("{name}(")) || {
            let stem = ["_f16_a32", "_bf16_a32", "_f32", "_f16", "_bf16"]
                .iter()
                .find_map(|sfx| name.strip_suffix(sfx))
                .unwrap_or(name);
            src.contains(&format!("{stem}_##sfx("))
        };
        assert!(found, "{name} is not defined in kernels/{file}.cu");
    }
}

#[test]
fn tile_constants_match_common_cuh() {
    let root = env!("CARGO_MANIFEST_DIR");
    let src = std::fs::read_to_string(format!("{root}/kernels/common.cuh")).unwrap();
    let get = |name: &str| -> usize {
        let pat = format!("constexpr int {name} = ");
        let at = src
            .find(&pat)
            .unwrap_or_else(|| panic!("{name} not in common.cuh"));
        let rest = &src[at + pat.len()..];
        rest[..rest.find(';').unwrap()].trim().parse().unwrap()
    };
    let pairs: [(&str, usize); 13] = [
        ("SH_KCHUNK", spec::SH_KCHUNK),
        ("THREADS", spec::THREADS as usize),
        ("SMALL_THREADS", spec::SMALL_THREADS as usize),
        ("VT_ROWS", spec::VT_ROWS),
        ("NT_ROWS", spec::NT_ROWS),
        ("NT_COLS", spec::NT_COLS),
        ("NT_WARPS", spec::NT_WARPS as usize),
        ("SH_ROWS", spec::SH_ROWS),
        ("SH_RANKS", spec::SH_RANKS),
        ("CO_ROWS", spec::CO_ROWS),
        ("CO_COLS", spec::CO_COLS),
        ("TN_COLS", spec::TN_COLS),
        ("TN_TCHUNK", spec::TN_TCHUNK),
    ];
    for (name, v) in pairs {
        assert_eq!(get(name), v, "{name}: common.cuh and spec.rs disagree");
    }
    let norm = std::fs::read_to_string(format!("{root}/kernels/norm.cu")).unwrap();
    assert!(
        norm.contains(&format!("constexpr int NT_RK = {};", spec::NT_RK)),
        "NT_RK: norm.cu and spec.rs disagree"
    );
}

#[test]
fn dispatcher_prefers_tensor_cores_and_falls_back() {
    use spec::{select, Op};
    use DType::{BF16, F16, F32};
    for r in [1, 7, 15] {
        for dt in DType::ALL {
            assert_eq!(
                select(Op::Norm, dt, dt, r).unwrap().version,
                1,
                "{dt} r={r}"
            );
        }
    }
    for r in [16, 17, 64, 256] {
        assert_eq!(select(Op::Norm, BF16, BF16, r).unwrap().version, 2);
        assert_eq!(select(Op::Norm, F16, F16, r).unwrap().version, 2);
        assert_eq!(select(Op::Norm, F32, F32, r).unwrap().version, 1);
        // f32 adapters: the CUDA-core v1 (its `_a32` form), never a rounding to 16 bits.
        let v = select(Op::Norm, BF16, F32, r).unwrap();
        assert_eq!(
            (v.version, v.entry(BF16, F32).as_str()),
            (1, "dora_norm_v1_bf16_a32")
        );
    }
    assert!(
        select(Op::Norm, F32, BF16, 16).is_none(),
        "no kernel reads bf16 adapters beside f32"
    );
    assert!(spec::suffix(F32, BF16).is_none());
    assert_eq!(spec::suffix(F16, F32).as_deref(), Some("f16_a32"));
    assert_eq!(select(Op::Tn, F32, F32, 16).unwrap().rank_tile, 16);
    assert_eq!(select(Op::Tn, F32, F32, 17).unwrap().rank_tile, 64);
    assert!(select(Op::Norm, F32, F32, spec::MAX_RANK + 1).is_none());
    // Every variant's shared memory fits without an opt-in at every rank it accepts.
    for r in 1..=spec::MAX_RANK {
        let (tt, jt) = spec::bwd_dz_tiles(r);
        assert!(
            spec::bwd_dz_shared_bytes(tt, jt, r) <= spec::MAX_DYNAMIC_SHARED,
            "r={r}"
        );
        assert!(
            spec::norm_v2_shared_bytes(r) <= spec::MAX_DYNAMIC_SHARED,
            "r={r}"
        );
        assert!(
            spec::vtile_shared_bytes(r) <= spec::MAX_DYNAMIC_SHARED,
            "r={r}"
        );
    }
}

/// Every fused-kernel entry point is compiled into the emulator, with a parameter list the
/// launch API can pass (no `?` codes), so `Backend::launch` finds each by name.
#[test]
fn every_entry_point_is_registered_on_the_emulator() {
    let emu: std::collections::BTreeMap<String, String> = dorafuse::emu::kernels()
        .into_iter()
        .map(|k| (k.name, k.signature))
        .collect();
    for (file, name) in KERNELS.iter().filter(|(f, _)| FILES.contains(f)) {
        let sig = emu
            .get(*name)
            .unwrap_or_else(|| panic!("{name} ({file}.cu) is not registered on the emulator"));
        assert!(
            !sig.is_empty() && !sig.contains('?'),
            "{name}: signature {sig:?}"
        );
    }
}
