//! `dorafuse bench` end to end on tiny sets: exits 0, says which device it used in its first
//! line, writes JSON that reads back, an SVG plot and a Markdown section; `--from` re-plots
//! without running. No timing is asserted.

use std::path::Path;
use std::process::Command;

fn dorafuse(args: &[&str], dir: &Path) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run dorafuse");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "dorafuse {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

#[test]
fn cpu_run_writes_json_plot_and_markdown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("B.md"), "# Benchmarks\n\nintro kept as is\n").unwrap();
    let (out, _) = dorafuse(
        &[
            "bench",
            "--device",
            "cpu",
            "--shapes",
            "40x24,17x9",
            "--tokens",
            "1,3",
            "--ranks",
            "2",
            "--dtype",
            "bf16",
            "--reps",
            "2",
            "--warmup",
            "0",
            "--json",
            "r.json",
            "--plot",
            "r.svg",
            "--markdown",
            "B.md",
            "--quiet",
        ],
        d,
    );
    assert!(out.contains("Training forward"), "{out}");
    assert!(out.contains("fused/base"), "{out}");
    // The CPU path's target, one line per shape and T (docs/design.md §5).
    assert_eq!(
        out.matches("forward+backward ≤ 1.30×").count(),
        2 * 2,
        "{out}"
    );
    let rep = dorafuse::bench::report::Report::read(&d.join("r.json")).unwrap();
    assert_eq!(rep.device.kind, "cpu");
    // 2 shapes × 1 rank × (2 norm rows + 9 rows × 2 token counts).
    assert_eq!(rep.rows.len(), 2 * (2 + 9 * 2));
    assert!(rep
        .rows
        .iter()
        .all(|r| r.dtype == "bf16" && r.time.runs == 2));
    let svg = std::fs::read_to_string(d.join("r.svg")).unwrap();
    assert!(svg.trim_end().ends_with("</svg>") && svg.contains("DoRA fused"));
    let md = std::fs::read_to_string(d.join("B.md")).unwrap();
    assert!(md.starts_with("# Benchmarks\n\nintro kept as is\n"), "{md}");
    assert!(
        md.contains("dorafuse-bench:cpu:begin") && md.contains("| 40×24 "),
        "{md}"
    );

    // Re-plot and re-tabulate from the JSON: nothing is run.
    let (out, _) = dorafuse(&["bench", "--from", "r.json", "--plot", "again.svg"], d);
    assert!(out.contains("Training forward"));
    assert!(std::fs::read_to_string(d.join("again.svg"))
        .unwrap()
        .contains("</svg>"));
    // Refused before anything is run or written: a document merged with itself (every row
    // twice), run flags beside --from, a plot that is not SVG, a broken generated section.
    std::fs::write(
        d.join("broken.md"),
        "<!-- dorafuse-bench:x:begin (generated; do not edit by hand) -->\n",
    )
    .unwrap();
    for (args, why) in [
        (
            &["--from", "r.json", "--from", "r.json"][..],
            "is in both documents",
        ),
        (
            &["--from", "r.json", "--tokens", "4"][..],
            "cannot be used with",
        ),
        (
            &["--from", "r.json", "--plot", "p.png"][..],
            "give a .svg path",
        ),
        (
            &["--from", "r.json", "--markdown", "broken.md"][..],
            "begin marker without end marker",
        ),
        (
            &["--from", "r.json", "--json", "no/such.json"][..],
            "no directory",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
            .arg("bench")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    }
    assert!(!d.join("p.png").exists());
}

#[test]
fn no_device_first_line_and_emulator_marking() {
    let dir = tempfile::tempdir().unwrap();
    if !dorafuse::cuda::device_available() {
        let (out, _) = dorafuse(
            &[
                "bench", "--shapes", "16x8", "--tokens", "2", "--ranks", "1", "--reps", "1",
                "--warmup", "0", "--ops", "forward", "--quiet",
            ],
            dir.path(),
        );
        assert_eq!(
            out.lines().next(),
            Some("no CUDA device: running the CPU path; these are CPU timings")
        );
    }
    let (out, _) = dorafuse(
        &[
            "bench", "--device", "emu", "--shapes", "40x24", "--tokens", "3", "--ranks", "2",
            "--reps", "1", "--warmup", "0", "--quiet",
        ],
        dir.path(),
    );
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains("emulator times say nothing about GPU speed"),
        "{out}"
    );
    assert!(out.contains("DoRA fused"), "{out}");
}

#[test]
fn help_explains_and_bad_flags_fail() {
    let out = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for flag in [
        "--shapes", "--tokens", "--ranks", "--dtype", "--device", "--json", "--plot", "--from",
    ] {
        assert!(s.contains(flag), "--help lacks {flag}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dorafuse"))
        .args(["bench", "--device", "cpu", "--shapes", "40y24"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("40y24"));
}
