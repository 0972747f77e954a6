//! The commit this binary is built from, for the bench reports: `git rev-parse HEAD` at build
//! time (12 hex digits) into `DORAFUSE_BUILD_COMMIT`, or `unknown` outside a git checkout.
//! The build script reruns when HEAD moves (the HEAD file, and the branch it names).

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// Sets `DORAFUSE_BUILD_COMMIT` for the crate and watches what moves HEAD.
pub fn stamp(root: &Path) {
    let commit = git(root, &["rev-parse", "--short=12", "HEAD"]);
    // HEAD names a branch (`ref: refs/heads/x`) whose own file moves on every commit, or
    // packed-refs when the branch is packed; `--git-path` resolves them (in a worktree too).
    // Only existing files are watched: cargo reruns on every build for a missing one.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(root, &["symbolic-ref", "-q", "HEAD"]));
    for p in watch {
        let path = git(root, &["rev-parse", "--git-path", &p]).map(|p| root.join(p));
        if let Some(path) = path.filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!(
        "cargo:rustc-env=DORAFUSE_BUILD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
