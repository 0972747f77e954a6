//! The one list of kernel entry points, shared by build.rs (emulator and nvcc builds), the
//! Rust dispatcher and the tests.
//!
//! Format of `kernels/kernels.list`: one entry per line, `<file stem> <entry point>`, where
//! `<file stem>.cu` in the list's folder defines `extern "C" __global__ void <entry point>`.
//! `#` starts a comment; blank lines are ignored.

use std::path::Path;

/// One entry point: the `.cu` file (stem) that defines it, and its name.
#[derive(Debug, Clone)]
pub struct Entry {
    /// File stem, e.g. `norm` for `kernels/norm.cu`.
    pub file: String,
    /// Entry-point name, e.g. `dora_norm_bf16`.
    pub name: String,
}

/// Reads and checks the list; panics (failing the build) with the line on malformed input.
pub fn read(path: &Path) -> Vec<Entry> {
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dir = path.parent().unwrap();
    let mut out: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts.len() == 2,
            "{}:{}: expected `<file stem> <entry point>`, got {line:?}",
            path.display(),
            i + 1
        );
        let (file, name) = (parts[0].to_string(), parts[1].to_string());
        assert!(
            dir.join(format!("{file}.cu")).is_file(),
            "{}:{}: {file}.cu does not exist",
            path.display(),
            i + 1
        );
        assert!(
            !out.iter().any(|e| e.name == name),
            "{}:{}: entry point {name} listed twice",
            path.display(),
            i + 1
        );
        out.push(Entry { file, name });
    }
    out
}

/// Writes `pub const KERNELS: &[(&str, &str)]` (file stem, entry point) for `include!`.
pub fn write_rust_table(list: &[Entry], dest: &Path) {
    let mut s = String::from(
        "/// Every kernel entry point as (file stem, name), from kernels/kernels.list.\n\
         pub const KERNELS: &[(&str, &str)] = &[\n",
    );
    for e in list {
        s.push_str(&format!("    ({:?}, {:?}),\n", e.file, e.name));
    }
    s.push_str("];\n");
    std::fs::write(dest, s).unwrap();
}
