//! The one list of kernels and the specialisation table agree: every variant the dispatcher
//! can pick is a family of `kernels/kernels.list` (hence built for the emulator and by nvcc),
//! every listed entry point is defined in its file and registered on the emulator, and the
//! table's choices and shared-memory sizes hold at every rank.

use dorafuse::kernels::{spec, FAMILIES, KERNELS};
use dorafuse::DType;

/// The `.cu` files of the fused kernels (other entries of the list, if any, are not ours).
const FILES: [&str; 3] = ["norm", "forward", "backward"];

#[test]
fn every_variant_is_a_listed_family() {
    for v in spec::VARIANTS {
        assert!(
            FAMILIES.iter().any(|(_, name, _)| *name == v.prefix),
            "{} is in spec.rs but not in kernels/kernels.list",
            v.prefix
        );
        // A variant serves each dtype pair its family is stamped for, and no other.
        for act in DType::ALL {
            for adapter in DType::ALL {
                let listed = spec::stamped(v.prefix, act, adapter);
                assert_eq!(
                    v.supports(act, adapter, 1),
                    listed.is_some(),
                    "{}",
                    v.prefix
                );
                if let Some(name) = listed {
                    assert_eq!(v.entry(act, adapter), name);
                    assert!(KERNELS.iter().any(|(_, n)| *n == name), "{name}");
                }
            }
        }
    }
    assert_eq!(
        spec::stamped("dora_norm_v2", DType::F32, DType::F32),
        None,
        "the tensor-core norm has no f32 form"
    );
    assert_eq!(
        spec::stamped("no_such_kernel", DType::F32, DType::F32),
        None
    );
}

#[test]
fn every_entry_point_is_defined_in_its_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    for (file, family, suffixes) in FAMILIES.iter().filter(|(f, _, _)| FILES.contains(f)) {
        let src = std::fs::read_to_string(format!("{root}/kernels/{file}.cu")).unwrap();
        // Stamped families appear as `<family>_##sfx(` in a macro stamped by
        // `DF_STAMP(<family>, ...)`; plain entry points literally.
        let found = if suffixes.is_empty() {
            src.contains(&format!(" {family}("))
        } else {
            src.contains(&format!(" {family}_##sfx("))
                && src.contains(&format!("DF_STAMP({family}, "))
        };
        assert!(found, "{family} is not defined in kernels/{file}.cu");
    }
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
        // f32 adapters: the tensor-core v2 in its `_a32` form (three bf16 terms per f32,
        // never one rounding to 16 bits) where its tiles fit, else the CUDA-core v1.
        let v = select(Op::Norm, BF16, F32, r).unwrap();
        let want = if r <= spec::NORM_V2_A32_MAX_RANK {
            (2, "dora_norm_v2_bf16_a32")
        } else {
            (1, "dora_norm_v1_bf16_a32")
        };
        assert_eq!((v.version, v.entry(BF16, F32).as_str()), want);
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
        // With f32 adapters, v2 is offered exactly where its f32 tiles fit; v1 elsewhere.
        let v2_a32 = spec::norm_v2_a32_shared_bytes(r) <= spec::MAX_DYNAMIC_SHARED;
        assert_eq!(v2_a32, r <= spec::NORM_V2_A32_MAX_RANK, "r={r}");
        for act in [F16, BF16] {
            let v = select(Op::Norm, act, F32, r).unwrap();
            let want = if v2_a32 && r >= 16 { 2 } else { 1 };
            assert_eq!(v.version, want, "{act} with f32 adapters, r={r}");
        }
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
