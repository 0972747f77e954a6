//! The one list of kernels (`kernels/kernels.list`) and the tile constants of
//! `kernels/common.cuh`, and everything generated from them for build.rs (emulator and nvcc
//! builds), the Rust crate and the tests.
//!
//! Format of a list: one kernel family per line, `<file stem> <name> [<suffix>...]`, where
//! `<file stem>.cu` in the list's folder defines the entry points. Without suffixes the line
//! is one entry point named `<name>`. With suffixes it is one entry point `<name>_<suffix>`
//! per suffix, stamped from one templated body by `DF_STAMP(<name>, MACRO)` (common.cuh),
//! which expands `MACRO(sfx, T, TA)` once per listed suffix with the suffix's storage types
//! ([`SUFFIXES`]). `#` starts a comment; blank lines are ignored.

use std::fmt::Write as _;
use std::path::Path;

/// The dtype suffixes a family may be stamped for: (suffix, activation type `T`, adapter type
/// `TA`). `_a32` reads f32 adapters (lora_A/lora_B) beside 16-bit activations, PEFT's
/// default mix.
pub const SUFFIXES: &[(&str, &str, &str)] = &[
    ("f32", "float", "float"),
    ("f16", "__half", "__half"),
    ("bf16", "__nv_bfloat16", "__nv_bfloat16"),
    ("f16_a32", "__half", "float"),
    ("bf16_a32", "__nv_bfloat16", "float"),
];

/// One line of the list: a kernel family.
#[derive(Debug, Clone)]
pub struct Family {
    /// File stem, e.g. `norm` for `kernels/norm.cu`.
    pub file: String,
    /// Entry point, or the prefix of the stamped entry points, e.g. `dora_norm_v2`.
    pub name: String,
    /// Dtype suffixes it is stamped for (empty: one entry point named `name`).
    pub suffixes: Vec<String>,
}

/// One entry point: the `.cu` file (stem) that defines it, and its name.
#[derive(Debug, Clone)]
pub struct Entry {
    /// File stem, e.g. `norm` for `kernels/norm.cu`.
    pub file: String,
    /// Entry-point name, e.g. `dora_norm_v2_bf16`.
    pub name: String,
}

/// Parses the text of a list (`path` names it in errors). Errors carry `path:line:`.
pub fn parse(text: &str, path: &str) -> Result<Vec<Family>, String> {
    let mut out: Vec<Family> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("{path}:{}", i + 1);
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 2 {
            return Err(format!(
                "{at}: expected `<file stem> <name> [<suffix>...]`, got {line:?}"
            ));
        }
        let ident = |s: &str| {
            !s.is_empty()
                && !s.as_bytes()[0].is_ascii_digit()
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        };
        let (file, name) = (parts[0].to_string(), parts[1].to_string());
        if !ident(&file) || !ident(&name) {
            return Err(format!("{at}: {file:?} / {name:?} is not a C identifier"));
        }
        let mut suffixes: Vec<String> = Vec::new();
        for s in &parts[2..] {
            if !SUFFIXES.iter().any(|(k, _, _)| k == s) {
                let known: Vec<&str> = SUFFIXES.iter().map(|(k, _, _)| *k).collect();
                return Err(format!(
                    "{at}: unknown dtype suffix {s:?} (one of {})",
                    known.join(" ")
                ));
            }
            if suffixes.iter().any(|k| k == s) {
                return Err(format!("{at}: suffix {s} listed twice for {name}"));
            }
            suffixes.push(s.to_string());
        }
        if out.iter().any(|f| f.name == name) {
            return Err(format!("{at}: {name} listed twice"));
        }
        out.push(Family {
            file,
            name,
            suffixes,
        });
    }
    let entries = entries(&out);
    for (k, e) in entries.iter().enumerate() {
        if entries[..k].iter().any(|o| o.name == e.name) {
            return Err(format!("{path}: entry point {} listed twice", e.name));
        }
    }
    Ok(out)
}

/// Reads and checks a list; panics (failing the build) with the line on malformed input or
/// a missing `.cu` file.
pub fn read(path: &Path) -> Vec<Family> {
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let list = parse(&text, &path.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
    let dir = path.parent().unwrap();
    for f in &list {
        assert!(
            dir.join(format!("{}.cu", f.file)).is_file(),
            "{}: {} names {}.cu, which does not exist",
            path.display(),
            f.name,
            f.file
        );
    }
    list
}

/// Every entry point of the families, in list order.
pub fn entries(list: &[Family]) -> Vec<Entry> {
    let mut out = Vec::new();
    for f in list {
        if f.suffixes.is_empty() {
            out.push(Entry {
                file: f.file.clone(),
                name: f.name.clone(),
            });
        }
        for s in &f.suffixes {
            out.push(Entry {
                file: f.file.clone(),
                name: format!("{}_{s}", f.name),
            });
        }
    }
    out
}

/// The C header of stamp macros: `DF_STAMPS_<name>(X)` expands `X(sfx, T, TA)` once per
/// listed suffix of each stamped family (`DF_STAMP` in common.cuh pastes the name).
pub fn stamps_header(list: &[Family]) -> String {
    let mut s = String::from(
        "// Generated by build/kernel_list.rs from kernels/kernels.list: do not edit.\n\
         #pragma once\n",
    );
    for f in list.iter().filter(|f| !f.suffixes.is_empty()) {
        write!(s, "#define DF_STAMPS_{}(X)", f.name).unwrap();
        for sfx in &f.suffixes {
            let (_, t, ta) = SUFFIXES.iter().find(|(k, _, _)| k == sfx).unwrap();
            write!(s, " X({sfx}, {t}, {ta})").unwrap();
        }
        s.push('\n');
    }
    s
}

/// `KERNELS` for `include!` (in `dorafuse::kernels` and `dorafuse::cuda`): every entry point
/// as (file stem, name).
pub fn rust_entries(list: &[Family]) -> String {
    let mut s = String::from(
        "/// Every kernel entry point as (file stem, name), from kernels/kernels.list.\n\
         pub const KERNELS: &[(&str, &str)] = &[\n",
    );
    for e in entries(list) {
        writeln!(s, "    ({:?}, {:?}),", e.file, e.name).unwrap();
    }
    s.push_str("];\n");
    s
}

/// `FAMILIES` for `include!` in `dorafuse::kernels`: the list's lines.
pub fn rust_families(list: &[Family]) -> String {
    let mut s = String::from(
        "/// Every kernel family of kernels/kernels.list: (file stem, name, dtype suffixes; \
         empty for a single entry point named `name`).\n\
         pub const FAMILIES: &[(&str, &str, &[&str])] = &[\n",
    );
    for f in list {
        writeln!(s, "    ({:?}, {:?}, &{:?}),", f.file, f.name, f.suffixes).unwrap();
    }
    s.push_str("];\n");
    s
}

/// One tile constant of common.cuh: `constexpr int NAME = <integer>;  // <doc>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    /// Name, e.g. `THREADS`.
    pub name: String,
    /// Value.
    pub value: u64,
    /// The trailing `//` comment, which becomes the Rust doc comment.
    pub doc: String,
}

/// The tile constants of common.cuh: every line `constexpr int NAME = <integer>;  // doc`
/// at the start of a line (file scope). Errors on such a line without a value or a comment.
pub fn parse_constants(text: &str, path: &str) -> Result<Vec<Constant>, String> {
    let mut out: Vec<Constant> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("constexpr int ") else {
            continue;
        };
        let at = format!("{path}:{}", i + 1);
        let (decl, doc) = rest
            .split_once("//")
            .ok_or_else(|| format!("{at}: a tile constant needs a `// doc` comment"))?;
        let (name, value) = decl
            .trim()
            .strip_suffix(';')
            .and_then(|d| d.split_once('='))
            .ok_or_else(|| format!("{at}: expected `constexpr int NAME = <integer>;`"))?;
        let value: u64 = value
            .trim()
            .parse()
            .map_err(|_| format!("{at}: {} must be a plain integer", name.trim()))?;
        let doc = doc.trim();
        if doc.is_empty() {
            return Err(format!("{at}: empty comment on {}", name.trim()));
        }
        out.push(Constant {
            name: name.trim().to_string(),
            value,
            doc: doc.to_string(),
        });
    }
    Ok(out)
}

/// The Rust module of the tile constants (`usize`), for `include!` in `kernels::spec`.
pub fn rust_constants(constants: &[Constant]) -> String {
    let mut s = String::from("// Generated by build/kernel_list.rs from kernels/common.cuh.\n");
    for c in constants {
        writeln!(
            s,
            "/// {} (`df::{}` in kernels/common.cuh).\npub const {}: usize = {};",
            c.doc, c.name, c.name, c.value
        )
        .unwrap();
    }
    s
}

/// Writes `text` to `path` unless it already holds exactly that (so a rebuild that changes
/// nothing does not recompile what includes it).
pub fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_stamps_one_entry_point_per_suffix() {
        let list = parse(
            "# comment\n\nnorm dora_norm_v2 f16 bf16  # tensor cores\nbackward dora_mag_reduce_f32\n",
            "k.list",
        )
        .unwrap();
        let names: Vec<String> = entries(&list).into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "dora_norm_v2_f16",
                "dora_norm_v2_bf16",
                "dora_mag_reduce_f32"
            ]
        );
        assert_eq!(list[1].file, "backward");
        let h = stamps_header(&list);
        assert!(h.contains(
            "#define DF_STAMPS_dora_norm_v2(X) X(f16, __half, __half) \
             X(bf16, __nv_bfloat16, __nv_bfloat16)\n"
        ));
        assert!(
            !h.contains("dora_mag_reduce"),
            "single entry points are not stamped"
        );
        let f = rust_families(&list);
        assert!(f.contains("(\"norm\", \"dora_norm_v2\", &[\"f16\", \"bf16\"]),"));
        assert!(f.contains("(\"backward\", \"dora_mag_reduce_f32\", &[]),"));
        assert!(rust_entries(&list).contains("(\"norm\", \"dora_norm_v2_bf16\"),"));
    }

    #[test]
    fn the_adapter_suffixes_read_f32_adapters() {
        let list = parse("forward dora_shrink bf16_a32", "k.list").unwrap();
        assert!(stamps_header(&list).contains("X(bf16_a32, __nv_bfloat16, float)"));
    }

    #[test]
    fn malformed_lists_fail_naming_the_line() {
        for (text, want) in [
            ("norm", "k.list:1: expected"),
            (
                "\nnorm dora_x f64",
                "k.list:2: unknown dtype suffix \"f64\"",
            ),
            ("norm dora_x f16 f16", "suffix f16 listed twice"),
            (
                "norm dora_x\nforward dora_x",
                "k.list:2: dora_x listed twice",
            ),
            (
                "norm dora_x f32\nnorm dora_x_f32",
                "entry point dora_x_f32 listed twice",
            ),
            ("norm dora-x", "not a C identifier"),
        ] {
            let e = parse(text, "k.list").unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn tile_constants_come_with_their_comment() {
        let src = "namespace df {\nconstexpr int THREADS = 256;  // Threads per block\n    \
                   constexpr int Q = 4;  // (indented: a local, not a tile constant)\n}\n";
        let c = parse_constants(src, "c.cuh").unwrap();
        assert_eq!(
            c,
            [Constant {
                name: "THREADS".into(),
                value: 256,
                doc: "Threads per block".into()
            }]
        );
        assert_eq!(
            rust_constants(&c),
            "// Generated by build/kernel_list.rs from kernels/common.cuh.\n\
             /// Threads per block (`df::THREADS` in kernels/common.cuh).\n\
             pub const THREADS: usize = 256;\n"
        );
        for (src, want) in [
            (
                "constexpr int A = 1;",
                "c.cuh:1: a tile constant needs a `// doc` comment",
            ),
            (
                "constexpr int A = B + 8;  // x",
                "A must be a plain integer",
            ),
            ("constexpr int A = 1;  //  ", "empty comment on A"),
        ] {
            let e = parse_constants(src, "c.cuh").unwrap_err();
            assert!(e.contains(want), "{src:?}: {e}");
        }
    }
}
