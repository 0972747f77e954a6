//! The nvcc build: compiles every `.cu` named in `kernels/kernels.list` into ONE fatbin (SASS
//! for each architecture, PTX for the newest), embeds it through `$OUT_DIR/dorafuse.fatbin` and
//! `cfg(dorafuse_kernels)`, and turns register spills or local memory into build failures.
//!
//! # Finding nvcc (first match wins)
//! 1. `NVCC`: the nvcc binary itself (an error if it does not exist);
//! 2. `CUDA_HOME`, then `CUDA_PATH`: `$X/bin/nvcc`;
//! 3. the repository's pinned toolchain from `scripts/install-nvcc.sh`:
//!    `.toolchain/cuda/nvidia/cu13/bin/nvcc`;
//! 4. `nvcc` on `PATH`, then `/usr/local/cuda/bin/nvcc`;
//! 5. NVIDIA's pip wheels in the site-packages of `python3` (`nvidia/cu13/bin/nvcc`, or
//!    `nvidia/cuda_nvcc/bin/nvcc` for CUDA 12 wheels).
//!
//! Without nvcc the crate still builds (CPU and emulator paths work); one `cargo:warning` says
//! how to get nvcc, and `cuda::CudaBackend` reports that the kernels were not compiled.
//!
//! # Environment
//! - `DORAFUSE_CUDA_ARCHS`: architectures, e.g. `80,86,89,90` (the default) or `sm_90a`;
//!   separators `,` `;` or spaces. SASS for each, PTX for the newest (the JIT fallback for newer
//!   GPUs).
//! - `DORAFUSE_ALLOW_SPILLS=1`: report spills / local memory as warnings instead of failing the
//!   build (for experiments only; CI never sets it).
//! - `DORAFUSE_PTXAS_SUMMARY=1`: print one `cargo:warning` line per kernel and architecture
//!   (registers, stack, spills, shared memory). The full report is always written to
//!   `$OUT_DIR/ptxas-report.txt` (`find target -name ptxas-report.txt`).
//! - `DORAFUSE_NVCC_FLAGS`: extra nvcc arguments, split on spaces (e.g. `-G` for cuda-gdb, or
//!   `-DDORAFUSE_DEBUG`).
//! - `DORAFUSE_REQUIRE_NVCC=1`: fail the build when nvcc is not found (CI sets it, so that a
//!   broken toolchain install cannot silently skip rung 3 of the verification ladder).
//! - `DORAFUSE_SKIP_NVCC=1`: do not compile the kernels even though nvcc is present (a quicker
//!   CPU-only build).
//! - `NVCC_CCBIN`, `NVCC_PREPEND_FLAGS`, `NVCC_APPEND_FLAGS`: read by nvcc itself; watched.
//!
//! # Why one translation unit
//! `cuModuleLoadData` loads one image per architecture from a fatbin, so every kernel must be in
//! one cubin per architecture. Compiling the listed `.cu` files as one generated translation unit
//! (`$OUT_DIR/dorafuse_kernels.cu`, which `#include`s each) gives exactly that, with full
//! optimisation (no relocatable device code) and the shared headers parsed once. The price: the
//! `.cu` files must not define two things with the same name (give file-local helpers
//! distinct names or put them in a namespace named after the file).

use crate::kernel_list::Entry;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Default architectures: Ampere (A100, A10/RTX 30), Ada (L4/L40, RTX 40), Hopper (H100/H200).
const DEFAULT_ARCHS: &[&str] = &["80", "86", "89", "90"];

/// Every environment variable this file reads; each gets `rerun-if-env-changed` when read.
fn env(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_flag(name: &str) -> bool {
    env(name).is_some_and(|v| v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Compiles the kernels into a fatbin when nvcc is found (see the module docs).
pub fn build(root: &Path, out: &Path, list: &[Entry], stamps: &Path) {
    println!("cargo::rustc-check-cfg=cfg(dorafuse_kernels)");
    for f in kernel_sources(&root.join("kernels")) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    // Watched whether or not nvcc is found: the NVCC_* variables change what nvcc does.
    for v in ["NVCC_CCBIN", "NVCC_PREPEND_FLAGS", "NVCC_APPEND_FLAGS"] {
        env(v);
    }
    let archs = parse_archs(env("DORAFUSE_CUDA_ARCHS").as_deref());

    let mut info = BuildInfo {
        archs: archs.clone(),
        ..BuildInfo::default()
    };
    if env_flag("DORAFUSE_SKIP_NVCC") {
        info.not_compiled = "kernels were not compiled (DORAFUSE_SKIP_NVCC is set at build time): \
                             unset it and rebuild"
            .into();
        println!("cargo:warning=dorafuse: CUDA kernels not compiled: DORAFUSE_SKIP_NVCC is set");
        info.write(out);
        return;
    }
    let Some(nvcc) = find_nvcc(root) else {
        // The installer touches itself when it finishes, so the next build looks again.
        println!(
            "cargo:rerun-if-changed={}",
            root.join("scripts/install-nvcc.sh").display()
        );
        assert!(
            !env_flag("DORAFUSE_REQUIRE_NVCC"),
            "DORAFUSE_REQUIRE_NVCC is set but nvcc was not found (NVCC, CUDA_HOME, CUDA_PATH, \
             .toolchain/cuda, PATH, /usr/local/cuda, python3's nvidia wheels): run \
             scripts/install-nvcc.sh"
        );
        info.not_compiled = "kernels were not compiled (nvcc not found at build time): run \
                             scripts/install-nvcc.sh and rebuild"
            .into();
        println!(
            "cargo:warning=dorafuse: nvcc not found, CUDA kernels not compiled (CPU and \
             emulator paths only). Get the pinned compiler with `scripts/install-nvcc.sh` \
             (no GPU or root needed), or set NVCC / CUDA_HOME, then rebuild."
        );
        info.write(out);
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());
    info.nvcc_version = nvcc_version(&nvcc);

    // Each listed file once, in list order.
    let mut files: Vec<&str> = Vec::new();
    for e in list {
        if !files.contains(&e.file.as_str()) {
            files.push(&e.file);
        }
    }
    if files.is_empty() {
        info.not_compiled =
            "kernels were not compiled: kernels/kernels.list lists no kernels".into();
        info.write(out);
        return;
    }

    let unity = out.join("dorafuse_kernels.cu");
    let mut src = String::from(
        "// Generated by build/nvcc.rs: every .cu of kernels/kernels.list in one translation unit,\n\
         // so that one cubin per architecture holds every entry point.\n",
    );
    // The stamp macros generated from kernels/kernels.list come first (DF_STAMP in common.cuh).
    writeln!(src, "#include \"{}\"", stamps.display()).unwrap();
    for f in &files {
        let p = root.join("kernels").join(format!("{f}.cu"));
        writeln!(src, "#include \"{}\"", p.display()).unwrap();
    }
    std::fs::write(&unity, src).unwrap();

    let fatbin = out.join("dorafuse.fatbin");
    let newest = archs.iter().max_by_key(|a| arch_number(a)).unwrap().clone();
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin")
        .arg("-std=c++17")
        .arg("-lineinfo")
        .arg("-Xptxas")
        .arg("-v,--warn-on-spills,--warn-on-local-memory-usage")
        .arg("-I")
        .arg(root.join("kernels"));
    for a in &archs {
        if *a == newest {
            cmd.arg(format!(
                "-gencode=arch=compute_{a},code=[sm_{a},compute_{a}]"
            ));
        } else {
            cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
        }
    }
    // nvcc compiles the architectures in parallel threads and prints each one's ptxas report as
    // a block (checked with nvcc 13.0), so the report stays parseable.
    // NUM_JOBS is cargo's -j for this build (not watched: cargo sets it, it changes nothing).
    let jobs = std::env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(2)
        .clamp(1, archs.len());
    cmd.arg("-t").arg(jobs.to_string());
    if let Some(extra) = env("DORAFUSE_NVCC_FLAGS") {
        cmd.args(extra.split_whitespace());
    }
    cmd.arg("-o").arg(&fatbin).arg(&unity);

    let started = std::time::Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        panic!(
            "nvcc failed ({}) compiling kernels {files:?} for {archs:?}:\n{log}\ncommand: {cmd:?}",
            output.status
        );
    }
    let secs = started.elapsed().as_secs_f64();

    let reports = parse_ptxas(&log);
    let mut problems = Vec::new();
    for r in &reports {
        if r.stack > 0 || r.spill_stores > 0 || r.spill_loads > 0 || r.lmem > 0 {
            problems.push(format!(
                "{} on {}: {} bytes stack frame, {} bytes spill stores, {} bytes spill loads, {} \
                 bytes lmem",
                r.function, r.arch, r.stack, r.spill_stores, r.spill_loads, r.lmem
            ));
        }
    }
    // Every listed entry point must have been compiled, under its unmangled name, for every
    // SASS architecture: this catches a missing `extern "C"` or a typo in the list.
    for e in list {
        for a in &archs {
            let arch = format!("sm_{a}");
            if !reports
                .iter()
                .any(|r| r.entry && r.function == e.name && r.arch == arch)
            {
                panic!(
                    "kernels/kernels.list names entry point `{}` in {}.cu, but nvcc compiled no \
                     such entry for {arch} (is it declared `extern \"C\" __global__`?). \
                     ptxas output:\n{log}",
                    e.name, e.file
                );
            }
        }
    }

    let table = report_table(&reports);
    let report_path = out.join("ptxas-report.txt");
    std::fs::write(
        &report_path,
        format!(
            "nvcc {} ({}), archs {archs:?} (PTX for compute_{newest}), {secs:.1} s\n\
             files: {files:?}\n\
             columns: registers per thread, stack frame bytes (local memory), spill store / \
             load bytes, STATIC shared memory bytes (dynamic shared memory is set per launch), \
             barriers\n\n{table}\n--- raw nvcc/ptxas output ---\n{log}",
            info.nvcc_version,
            nvcc.display()
        ),
    )
    .unwrap();

    if !problems.is_empty() {
        let msg = problems.join("\n  ");
        if env_flag("DORAFUSE_ALLOW_SPILLS") {
            for p in &problems {
                println!(
                    "cargo:warning=dorafuse: local memory (allowed by DORAFUSE_ALLOW_SPILLS): {p}"
                );
            }
        } else {
            panic!(
                "register spills or local memory in CUDA kernels (docs/design.md §4: none allowed):\n  \
                 {msg}\nfull report: {}\n(set DORAFUSE_ALLOW_SPILLS=1 to build anyway for an \
                 experiment)",
                report_path.display()
            );
        }
    }
    if env_flag("DORAFUSE_PTXAS_SUMMARY") {
        println!(
            "cargo:warning=dorafuse: nvcc {} compiled {} entry points for {archs:?} in {secs:.1} s; \
             report: {}",
            info.nvcc_version,
            list.len(),
            report_path.display()
        );
        for line in table.lines() {
            println!("cargo:warning={line}");
        }
    }

    println!("cargo:rustc-cfg=dorafuse_kernels");
    info.compiled = true;
    info.write(out);
}

/// What the crate learns about the nvcc build: written to `$OUT_DIR/cuda_build_info.rs`.
#[derive(Default)]
struct BuildInfo {
    compiled: bool,
    not_compiled: String,
    nvcc_version: String,
    archs: Vec<String>,
}

impl BuildInfo {
    fn write(&self, out: &Path) {
        let newest = self
            .archs
            .iter()
            .max_by_key(|a| arch_number(a))
            .cloned()
            .unwrap_or_default();
        let archs: Vec<String> = self.archs.iter().map(|a| format!("\"sm_{a}\"")).collect();
        let s = format!(
            "/// Whether build.rs compiled the kernels into the embedded fatbin.\n\
             pub const KERNELS_COMPILED: bool = {};\n\
             /// Why the kernels were not compiled (empty when they were).\n\
             pub const NOT_COMPILED_REASON: &str = {:?};\n\
             /// The nvcc release that compiled them (empty when none did).\n\
             pub const NVCC_VERSION: &str = {:?};\n\
             /// The architectures with SASS in the fatbin (requested ones when not compiled).\n\
             pub const SASS_ARCHS: &[&str] = &[{}];\n\
             /// The architecture whose PTX is embedded for JIT compilation on newer GPUs.\n\
             pub const PTX_ARCH: &str = \"compute_{newest}\";\n",
            self.compiled,
            self.not_compiled,
            self.nvcc_version,
            archs.join(", "),
        );
        std::fs::write(out.join("cuda_build_info.rs"), s).unwrap();
    }
}

/// Every `.cu`, `.cuh` and `.h` under `kernels/` (recursively, sorted).
fn kernel_sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|x| x.to_str()),
                Some("cu" | "cuh" | "h")
            ) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `"80, sm_86;compute_90a"` → `["80", "86", "90a"]`, sorted by number, deduplicated.
fn parse_archs(spec: Option<&str>) -> Vec<String> {
    let Some(spec) = spec else {
        return DEFAULT_ARCHS.iter().map(|s| s.to_string()).collect();
    };
    let mut set = BTreeSet::new();
    for tok in spec
        .split([',', ';', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let t = tok.trim_start_matches("sm_").trim_start_matches("compute_");
        let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
        let suffix = &t[digits.len()..];
        assert!(
            digits.len() >= 2 && matches!(suffix, "" | "a" | "f"),
            "DORAFUSE_CUDA_ARCHS: cannot read {tok:?} (expected e.g. 80, sm_86 or 90a)"
        );
        set.insert((digits.parse::<u32>().unwrap(), t.to_string()));
    }
    assert!(
        !set.is_empty(),
        "DORAFUSE_CUDA_ARCHS is set but names no architecture"
    );
    set.into_iter().map(|(_, a)| a).collect()
}

fn arch_number(a: &str) -> u32 {
    a.chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

fn is_file(p: &Path) -> bool {
    p.is_file()
}

/// Finds nvcc (order in the module docs). Reads only the variables it needs, so that a build
/// with `NVCC` set does not rerun when `PATH` changes.
fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env("NVCC") {
        let p = PathBuf::from(p);
        assert!(is_file(&p), "NVCC={} does not exist", p.display());
        return Some(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if is_file(&p) {
                return Some(p);
            }
            println!("cargo:warning=dorafuse: {var}={home} has no bin/nvcc; looking elsewhere");
        }
    }
    let pinned = root.join(".toolchain/cuda/nvidia/cu13/bin/nvcc");
    if is_file(&pinned) {
        return Some(pinned);
    }
    if let Some(path) = env("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    let default = Path::new("/usr/local/cuda/bin/nvcc");
    if is_file(default) {
        return Some(default.to_path_buf());
    }
    // NVIDIA's wheels in the current Python environment.
    env("VIRTUAL_ENV");
    env("PYTHONPATH");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys; print('\\n'.join(p for p in sys.path if p))",
        ])
        .output()
        .ok()?;
    for dir in String::from_utf8_lossy(&out.stdout).lines() {
        for rel in ["nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"] {
            let p = Path::new(dir).join(rel);
            if is_file(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// `"13.0"` from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88").
fn nvcc_version(nvcc: &Path) -> String {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", nvcc.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("release ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{} --version printed no release:\n{text}", nvcc.display()))
}

/// Resources of one function on one architecture, from `ptxas -v`.
#[derive(Debug, Clone, Default)]
struct PtxasReport {
    function: String,
    arch: String,
    /// A kernel entry point (`__global__`), not a non-inlined device function.
    entry: bool,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    lmem: u32,
    smem: u32,
    barriers: u32,
}

/// The number just before `unit` in `s` ("... 24 bytes spill stores" → 24).
fn number_before(s: &str, unit: &str) -> Option<u32> {
    let i = s.find(unit)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

fn quoted(s: &str, nth: usize) -> Option<String> {
    s.split('\'').nth(2 * nth + 1).map(str::to_string)
}

/// Parses nvcc's `-Xptxas -v` output. The lines per function are
/// `Compiling entry function 'f' for 'sm_90'` (entries only), `Function properties for f`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`, and
/// `Used N registers, used N barriers, N bytes smem, ...`. A `Function properties` line with no
/// preceding `Compiling entry` of the same name is a non-inlined device function.
fn parse_ptxas(log: &str) -> Vec<PtxasReport> {
    let mut out: Vec<PtxasReport> = Vec::new();
    let mut arch = String::from("?");
    let mut entry: Option<String> = None;
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            if let (Some(f), Some(a)) = (quoted(line, 0), quoted(line, 1)) {
                arch = a;
                entry = Some(f);
                current = None;
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let f = rest.trim().to_string();
            let is_entry = entry.as_deref() == Some(f.as_str());
            out.push(PtxasReport {
                function: f,
                arch: arch.clone(),
                entry: is_entry,
                ..Default::default()
            });
            current = Some(out.len() - 1);
        } else if line.contains("bytes stack frame") {
            if let Some(i) = current {
                let r = &mut out[i];
                r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ") && line.contains("registers") {
            if let Some(i) = current {
                let r = &mut out[i];
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.barriers = number_before(line, "barriers").unwrap_or(0);
                r.smem = number_before(line, "bytes smem").unwrap_or(0);
                r.lmem = number_before(line, "bytes lmem").unwrap_or(0);
            }
        }
    }
    out
}

fn report_table(reports: &[PtxasReport]) -> String {
    let mut rows: Vec<&PtxasReport> = reports.iter().collect();
    let key = |r: &PtxasReport| {
        (
            r.function.clone(),
            arch_number(r.arch.trim_start_matches("sm_")),
        )
    };
    rows.sort_by_key(|r| key(r));
    let w = rows
        .iter()
        .map(|r| r.function.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut s = format!(
        "{:w$}  {:6}  {:>4}  {:>5}  {:>6}  {:>6}  {:>6}  {:>3}\n",
        "function", "arch", "regs", "stack", "spillS", "spillL", "smem", "bar"
    );
    for r in rows {
        writeln!(
            s,
            "{:w$}  {:6}  {:>4}  {:>5}  {:>6}  {:>6}  {:>6}  {:>3}{}",
            r.function,
            r.arch,
            r.registers,
            r.stack,
            r.spill_stores,
            r.spill_loads,
            r.smem,
            r.barriers,
            if r.entry { "" } else { "  (device function)" }
        )
        .unwrap();
    }
    s
}
