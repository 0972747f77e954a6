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
    // HEAD names a branch (`ref: refs/heads/x`) whose own file moves on every commit; in a
    // worktree both live in the worktree's git directory, which `--git-path` resolves.
    let mut watch = vec!["HEAD".to_string()];
    watch.extend(git(root, &["symbolic-ref", "-q", "HEAD"]));
    for p in watch {
        if let Some(path) = git(root, &["rev-parse", "--git-path", &p]) {
            println!("cargo:rerun-if-changed={}", root.join(path).display());
        }
    }
    println!(
        "cargo:rustc-env=DORAFUSE_BUILD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
