//! `dorafuse profile` on a subset: the figures of a launch follow from its shape (grid fill)
//! and its record (requests, sectors, unique bytes against each launch's formula).

use dorafuse::layer::Shape;
use dorafuse::profile::{gpu, run, Settings};

#[test]
fn norm_and_compose_profiles_hold_their_shapes_and_figures() {
    // bf16 at a shape off every tile, every block recorded (exact figures).
    let shape = Shape {
        t: 21,
        d_in: 101,
        d_out: 81,
        r: 16,
    };
    for kernel in ["dora_norm_v2_bf16", "dora_compose_bf16"] {
        let p = run(
            &Settings {
                weight_shape: shape,
                shape,
                large_rank: 37,
                kernel: Some(kernel.into()),
                max_blocks: 0,
                ..Settings::default()
            },
            &mut |_| {},
        )
        .unwrap();
        // `--kernel` keeps the names containing the text (here also the `_a32` form).
        assert!(p.kernels.iter().all(|k| k.kernel.contains(kernel)));
        let k = p.kernels.iter().find(|k| k.kernel == kernel).unwrap();
        assert_eq!(k.recorded_blocks, k.blocks);
        assert_eq!(
            k.blocks,
            k.grid.iter().map(|&g| g as u64).product::<u64>(),
            "{kernel}"
        );
        // Grid fill: the H200 figures are those of gpu::H200 for this launch.
        let threads: u32 = k.block.iter().product();
        let f = gpu::H200.fill(k.blocks, threads, k.shared_bytes, k.registers);
        assert_eq!(k.fill[0], f);
        assert_eq!(k.waves_h200, f.waves);
        assert!(k.registers.is_some(), "{kernel}: registers from ptxas");
        // Requests read and write; each touches at least one sector, at most two per lane.
        assert!(k.requests > 0);
        assert!((1.0..=64.0).contains(&k.sectors_per_request), "{k:?}");
        for e in [k.load_efficiency, k.store_efficiency] {
            let e = e.expect("loads and stores");
            assert!(e > 0.0 && e <= 1.0, "{kernel}: efficiency {e}");
        }
        // Unique bytes at least the bytes of the largest tensor read (W0 for the norm, the
        // base output for compose, bf16), and a formula for both (src/profile/formula.rs).
        let biggest = match kernel {
            "dora_norm_v2_bf16" => 2 * shape.d_in * shape.d_out,
            _ => 2 * shape.t * shape.d_out,
        } as f64;
        assert!(
            k.unique_bytes >= biggest,
            "{kernel}: {} < {biggest}",
            k.unique_bytes
        );
        let ratio = k
            .unique_bytes_over_formula
            .expect("the bench has a formula");
        assert_eq!(ratio, k.unique_bytes / k.formula_bytes.unwrap());
        assert!(k.shared_wavefronts_per_request.is_some_and(|w| w >= 1.0));
        assert!(!k.worst_sites.is_empty() || k.load_efficiency == Some(1.0));
    }
}

#[test]
fn a_filter_matching_no_kernel_is_an_error_naming_it() {
    let e = run(
        &Settings {
            kernel: Some("no_such_kernel".into()),
            ..Settings::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("no_such_kernel"), "{e}");
}

#[test]
fn every_kernel_has_a_formula_and_moves_about_its_bytes() {
    // Every block recorded (exact unique bytes), at a shape off every tile, every kernel of
    // the list. Unique bytes (sectors read + sectors written) against each launch's bytes
    // that must move: close to 1 for kernels that read each input once and write each
    // output once; the sector rounding of arrays of a few hundred bytes and re-reads
    // through L1/L2 (counted once here) keep the rest within a few percent.
    let shape = Shape {
        t: 21,
        d_in: 101,
        d_out: 81,
        r: 16,
    };
    let p = run(
        &Settings {
            weight_shape: shape,
            shape,
            large_rank: 37,
            max_blocks: 0,
            ..Settings::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(!p.kernels.is_empty());
    for k in &p.kernels {
        let ratio = k.unique_bytes_over_formula.unwrap_or_else(|| {
            panic!("{}: no formula ({:?})", k.kernel, k.formula_error);
        });
        assert!(k.formula_bytes.is_some_and(|f| f > 0.0), "{}", k.kernel);
        assert!((0.75..=1.25).contains(&ratio), "{}: {ratio}", k.kernel);
    }
    // The streaming kernels, which touch each byte of each array exactly once, within the
    // sector rounding of the small arrays.
    for name in [
        "dora_norm_v2_bf16",
        "dora_norm_v1_bf16_a32",
        "dora_merged_weight_f32out_bf16",
        "dora_compose_bf16",
        "dora_scale_rows_f32",
        "baseline_axpby_f16",
    ] {
        let k = p.kernels.iter().find(|k| k.kernel == name).unwrap();
        let ratio = k.unique_bytes_over_formula.unwrap();
        assert!((0.95..=1.1).contains(&ratio), "{name}: {ratio}");
    }
}

#[test]
fn the_kernels_readme_before_after_table_is_current() {
    // The table `dorafuse profile --device emu --markdown kernels/README.md` writes, at the
    // command's default settings (the same as `Settings::default()`), against the committed one.
    let table = dorafuse::profile::tuning_table(&Settings::default(), &mut |_| {}).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/README.md");
    let text = std::fs::read_to_string(path).unwrap();
    let name = dorafuse::profile::README_SECTIONS[2];
    assert_eq!(
        dorafuse::markdown::section(&text, name).unwrap(),
        table.to_markdown().trim_end(),
        "kernels/README.md's before/after table is out of date: run `dorafuse profile \
         --device emu --markdown kernels/README.md`"
    );
}
