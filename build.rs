//! Build script: reads the one list of kernels (`kernels/kernels.list`) and the tile constants
//! of `kernels/common.cuh`, generates from them the stamp macros the `.cu` files expand
//! (`$OUT_DIR/kernel_stamps.cuh`), the Rust entry-point table (`$OUT_DIR/kernel_table.rs`, `kernel_families.rs`) and
//! the Rust tile constants (`$OUT_DIR/tile_constants.rs`), then compiles the `.cu` sources for
//! the CPU emulator with the host C++ compiler (feature `emu`) and, when nvcc is found, into a
//! fatbin for the GPU (feature `cuda`).

#[path = "build/kernel_list.rs"]
mod kernel_list;

#[cfg(feature = "emu")]
#[path = "build/emu.rs"]
mod emu;

#[cfg(feature = "emu")]
#[path = "build/shared_rewrite.rs"]
mod shared_rewrite;

#[path = "build/nvcc.rs"]
mod nvcc;

#[path = "build/commit.rs"]
mod commit;

fn main() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    commit::stamp(&root);
    let list = kernel_list::read(&root.join("kernels/kernels.list"));
    let entries = kernel_list::entries(&list);
    kernel_list::write_if_changed(
        &out.join("kernel_table.rs"),
        &kernel_list::rust_entries(&list),
    );
    kernel_list::write_if_changed(
        &out.join("kernel_families.rs"),
        &kernel_list::rust_families(&list),
    );
    let stamps = out.join("kernel_stamps.cuh");
    kernel_list::write_if_changed(&stamps, &kernel_list::stamps_header(&list));
    let common = root.join("kernels/common.cuh");
    println!("cargo:rerun-if-changed={}", common.display());
    let text = std::fs::read_to_string(&common)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", common.display()));
    let constants =
        kernel_list::parse_constants(&text, "kernels/common.cuh").unwrap_or_else(|e| panic!("{e}"));
    kernel_list::write_if_changed(
        &out.join("tile_constants.rs"),
        &kernel_list::rust_constants(&constants),
    );
    // DORAFUSE_REQUIRE_MODEL=1 (CI sets it): the tests on the real all-MiniLM-L6-v2 run, and
    // fail when its model package is missing; without it they are ignored, with the reason.
    println!("cargo::rustc-check-cfg=cfg(dorafuse_require_model)");
    println!("cargo:rerun-if-env-changed=DORAFUSE_REQUIRE_MODEL");
    if std::env::var("DORAFUSE_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=dorafuse_require_model");
    }
    // The host emulator build (cc) and the nvcc fatbin are independent: run them side by side,
    // which saves the shorter of the two on every kernel edit.
    // Each is skipped when its feature is off: a library build with `cuda` alone runs no C++
    // compiler, and one without `cuda` no nvcc.
    std::thread::scope(|_s| {
        #[cfg(feature = "emu")]
        _s.spawn(|| emu::build(&root, &out, &entries, &stamps));
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            nvcc::build(&root, &out, &entries, &stamps);
        }
    });
    #[cfg(feature = "emu")]
    emu::write_registers(&out);
}
