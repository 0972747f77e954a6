//! Build script: reads the one list of kernels (`kernels/kernels.list`), compiles the `.cu`
//! sources for the CPU emulator with the host C++ compiler, and, when nvcc is found, into a
//! fatbin for the GPU. Writes `$OUT_DIR/kernel_table.rs` (the entry-point table the crate and
//! the tests read).

#[path = "build/kernel_list.rs"]
mod kernel_list;

#[path = "build/emu.rs"]
mod emu;

#[path = "build/nvcc.rs"]
mod nvcc;

#[path = "build/commit.rs"]
mod commit;

fn main() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    commit::stamp(&root);
    let list = kernel_list::read(&root.join("kernels/kernels.list"));
    kernel_list::write_rust_table(&list, &out.join("kernel_table.rs"));
    // The host emulator build (cc) and the nvcc fatbin are independent: run them side by side,
    // which saves the shorter of the two on every kernel edit.
    std::thread::scope(|s| {
        s.spawn(|| emu::build(&root, &out, &list));
        nvcc::build(&root, &out, &list);
    });
}
