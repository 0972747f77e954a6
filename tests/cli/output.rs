//! The CLI as a shell user meets it: a command whose output pipe is closed
//! (`dorafuse inspect … | head`) ends quietly, and a merge interrupted by a signal leaves no
//! partial output behind.

#![cfg(unix)]

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dorafuse() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dorafuse"))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The write end of a pipe whose read end is already closed: every write to it fails with
/// EPIPE (and raises SIGPIPE), as `| head` does once head has exited.
fn closed_pipe() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is an array of two c_ints, which pipe(2) fills with two new descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] was just created by pipe(2) and nothing else owns or uses it.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] was just created by pipe(2); the OwnedFd becomes its only owner.
    unsafe { OwnedFd::from_raw_fd(fds[1]) }
}

/// Runs `cmd` with stdout on a closed pipe: no message on stderr, and an exit that is
/// success or SIGPIPE's default action (never a panic's 101).
fn quiet_on_closed_stdout(mut cmd: Command, what: &str) {
    let o = cmd
        .stdout(Stdio::from(closed_pipe()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.is_empty(),
        "{what}: stderr should be empty, got {err:?}"
    );
    assert!(
        o.status.success() || o.status.signal() == Some(libc::SIGPIPE),
        "{what}: {:?}",
        o.status
    );
}

#[test]
fn inspect_ends_quietly_when_its_output_is_closed() {
    let c = fixtures().join("peft_cases/kinds/embedding");
    for extra in [&[][..], &["--json"][..]] {
        let mut cmd = dorafuse();
        cmd.arg("inspect")
            .arg(c.join("adapter"))
            .arg("--base")
            .arg(c.join("base"))
            .args(["--fan-in-fan-out", ""])
            .args(extra);
        quiet_on_closed_stdout(cmd, &format!("inspect {extra:?}"));
    }
    let mut cmd = dorafuse();
    cmd.args(["inspect", "--help"]);
    quiet_on_closed_stdout(cmd, "inspect --help");
    let mut cmd = dorafuse();
    cmd.arg("replay")
        .arg(fixtures().join("cases/dora_f32_odd.safetensors"));
    quiet_on_closed_stdout(cmd, "replay");
}

type Entry = (String, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn f32s(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32;
            (x / 16_777_216.0 - 0.5).to_le_bytes()
        })
        .collect()
}

/// A base with one large copied tensor (so that writing takes a while) and two adapted
/// modules; returns (base dir, adapter dir).
fn build(root: &Path, big_rows: usize) -> (PathBuf, PathBuf) {
    let (base, ad) = (root.join("base"), root.join("adapter"));
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&ad).unwrap();
    let mut t: Vec<Entry> = vec![(
        "embed.weight".into(),
        vec![big_rows, 1024],
        f32s(big_rows * 1024, 1),
    )];
    let mut a: Vec<Entry> = Vec::new();
    for (i, m) in ["layer.0.q", "layer.1.q"].iter().enumerate() {
        t.push((
            format!("{m}.weight"),
            vec![48, 64],
            f32s(48 * 64, 2 + i as u32),
        ));
        a.push((
            format!("base_model.model.{m}.lora_A.weight"),
            vec![4, 64],
            f32s(256, 9),
        ));
        a.push((
            format!("base_model.model.{m}.lora_B.weight"),
            vec![48, 4],
            f32s(192, 7),
        ));
        a.push((
            format!("base_model.model.{m}.lora_magnitude_vector"),
            vec![48],
            f32s(48, 5),
        ));
    }
    write_st(&base.join("model.safetensors"), &t);
    write_st(&ad.join("adapter_model.safetensors"), &a);
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": true, "target_modules": ["q"]}"#,
    )
    .unwrap();
    (base, ad)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn an_interrupted_merge_leaves_nothing_behind() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut interrupted = false;
        // The signal must land while the merge writes; a larger base if it finished first.
        for big_rows in [8192, 32768] {
            let tmp = tempfile::tempdir().unwrap();
            let (base, ad) = build(tmp.path(), big_rows);
            let parent = tmp.path().join("out");
            std::fs::create_dir(&parent).unwrap();
            let out = parent.join("merged");
            let mut child = dorafuse()
                .args(["merge", "--quiet", "--device", "cpu", "--base"])
                .arg(&base)
                .arg("--adapter")
                .arg(&ad)
                .arg("--out")
                .arg(&out)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let start = Instant::now();
            // Wait for the temporary output to appear, then interrupt.
            let seen = loop {
                if !names(&parent).is_empty() {
                    break true;
                }
                if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60)
                {
                    break false;
                }
                std::thread::sleep(Duration::from_micros(200));
            };
            if seen {
                // SAFETY: kill(2) on the child's pid, which has not been reaped yet.
                unsafe { libc::kill(child.id() as i32, sig) };
            }
            let o = child.wait_with_output().unwrap();
            if o.status.success() {
                // Finished before the signal: the output is complete; try a larger base.
                assert_eq!(names(&parent), vec!["merged".to_string()]);
                continue;
            }
            assert_eq!(
                o.status.code(),
                Some(128 + sig),
                "{:?} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                names(&parent).is_empty(),
                "left behind: {:?}",
                names(&parent)
            );
            interrupted = true;
            break;
        }
        assert!(interrupted, "signal {sig} never landed during the merge");
    }
}
