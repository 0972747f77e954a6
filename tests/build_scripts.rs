//! Unit tests of the build script's modules, which build.rs itself cannot run: the kernel
//! list and its generated code (`build/kernel_list.rs`) and the emulator's `__shared__`
//! rewrite (`build/shared_rewrite.rs`). Each module carries its tests; this target includes
//! the files by path so that `cargo test` runs them.

// build.rs uses every item of these modules; the tests here use some of them.
#[allow(dead_code)]
#[path = "../build/kernel_list.rs"]
mod kernel_list;

#[allow(dead_code)]
#[path = "../build/shared_rewrite.rs"]
mod shared_rewrite;
