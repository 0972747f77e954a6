//! Registers per thread of each kernel, as ptxas allocates them for sm_90 (H100/H200): what
//! limits resident blocks besides threads and shared memory ([`super::gpu`]).
//!
//! When the build compiled the kernels with nvcc, build.rs reads the counts from the ptxas
//! report of that very build (`$OUT_DIR/ptxas-report.txt`, build/nvcc.rs). Without nvcc the
//! counts come from `src/profile/registers.txt`, generated from such a report and committed;
//! a test compares it with the build's report whenever nvcc ran (CI has nvcc), so a kernel
//! change that moves a count fails until the file is regenerated:
//!
//! ```text
//! NVCC=/path/to/nvcc DORAFUSE_WRITE_REGISTERS=1 cargo test --lib profile::registers
//! ```

include!(concat!(env!("OUT_DIR"), "/ptxas_registers.rs"));

/// The committed table: `<entry point> <registers>` per line, sm_90.
pub const COMMITTED: &str = include_str!("registers.txt");

/// Parses `<entry point> <registers>` lines (`#` comments, blank lines ignored).
pub fn parse(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Registers per thread of `kernel` on sm_90: from this build's ptxas report when nvcc ran,
/// else from the committed table; `None` for a kernel in neither.
pub fn registers(kernel: &str) -> Option<u32> {
    match BUILT {
        Some(t) => t.iter().find(|(k, _)| *k == kernel).map(|(_, r)| *r),
        None => parse(COMMITTED)
            .into_iter()
            .find(|(k, _)| k == kernel)
            .map(|(_, r)| r),
    }
}

/// Where [`registers`] takes its counts from, for reports.
pub fn source() -> &'static str {
    if BUILT.is_some() {
        "ptxas report of this build (sm_90)"
    } else {
        "src/profile/registers.txt (ptxas, sm_90; this build ran no nvcc)"
    }
}

/// The committed table's text for the build's report (`None` without nvcc).
pub fn table_of_build() -> Option<String> {
    BUILT.map(|t| {
        let mut s = String::from(
            "# Registers per thread, ptxas for sm_90: generated from the ptxas report of a build\n\
             # with nvcc (src/profile/registers.rs says how); checked against it in CI.\n",
        );
        for (k, r) in t {
            s.push_str(&format!("{k} {r}\n"));
        }
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_table_matches_the_build_and_lists_every_kernel() {
        if let Some(built) = table_of_build() {
            if std::env::var("DORAFUSE_WRITE_REGISTERS").is_ok_and(|v| v == "1") {
                let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/profile/registers.txt");
                std::fs::write(path, &built).unwrap();
            }
            assert_eq!(
                parse(COMMITTED),
                parse(&built),
                "src/profile/registers.txt is stale: regenerate it (src/profile/registers.rs)"
            );
        }
        let table = parse(COMMITTED);
        for (_, name) in crate::kernels::KERNELS {
            assert!(
                table.iter().any(|(k, r)| k == name && *r > 0),
                "{name} is missing from src/profile/registers.txt"
            );
        }
    }
}
