//! Build script: reads the one list of kernels (`kernels/kernels.list`), compiles the `.cu`
//! sources for the CPU emulator with the host C++ compiler (feature `emu`), and, when nvcc is
//! found, into a fatbin for the GPU (feature `cuda`). Writes `$OUT_DIR/kernel_table.rs` (the
//! entry-point table the crate and the tests read).

#[path = "build/kernel_list.rs"]
mod kernel_list;

#[cfg(feature = "emu")]
#[path = "build/emu.rs"]
mod emu;

#[path = "build/nvcc.rs"]
mod nvcc;

fn main() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    build_commit(&root);
    let list = kernel_list::read(&root.join("kernels/kernels.list"));
    kernel_list::write_rust_table(&list, &out.join("kernel_table.rs"));
    // The host emulator build (cc) and the nvcc fatbin are independent: run them side by side,
    // which saves the shorter of the two on every kernel edit.
    // Each is skipped when its feature is off: a library build with `cuda` alone runs no C++
    // compiler, and one without `cuda` no nvcc.
    std::thread::scope(|_s| {
        #[cfg(feature = "emu")]
        _s.spawn(|| emu::build(&root, &out, &list));
        if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            nvcc::build(&root, &out, &list);
        }
    });
}

/// Stamps the source revision the crate is compiled from into `DORAFUSE_BUILD_COMMIT`
/// (`git describe --always --dirty --abbrev=12`, empty outside a git checkout), so a binary
/// reports the commit it was built from, wherever it runs. Rerun when HEAD, the branch it
/// points to, or the index moves.
fn build_commit(root: &std::path::Path) {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    for f in ["HEAD", "index"] {
        if let Some(p) = git(&["rev-parse", "--git-path", f]) {
            println!("cargo:rerun-if-changed={}", root.join(p).display());
        }
    }
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &r]) {
            println!("cargo:rerun-if-changed={}", root.join(p).display());
        }
    }
    let commit = git(&["describe", "--always", "--dirty", "--abbrev=12"]).unwrap_or_default();
    println!("cargo:rustc-env=DORAFUSE_BUILD_COMMIT={commit}");
}
