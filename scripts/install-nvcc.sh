#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 compiler (nvcc, ptxas, cicc, fatbinary and the CUDA headers) from
# NVIDIA's pip wheels into a local folder, so that build.rs compiles kernels/*.cu into the
# embedded fatbin on any x86-64 Linux machine with python3 + pip and a host g++, no root and no
# CUDA install needed. No GPU is needed either: this is the compiler only.
#
# usage: scripts/install-nvcc.sh [DEST]
#   DEST defaults to $DORAFUSE_TOOLCHAIN, else <repo>/.toolchain/cuda (git-ignored). build.rs
#   finds nvcc there by itself; for another DEST, export NVCC=DEST/bin/nvcc (or CUDA_HOME=DEST).
#
# Idempotent: when DEST already holds exactly these versions and its nvcc works, it only prints
# the nvcc path (well under a second). A fresh install downloads ~105 MB of wheels, unpacks
# ~270 MB, and checks the result by compiling a bf16 kernel to a fatbin for sm_80 and sm_90.
# The last line of stdout is always the absolute path of nvcc (scripts may take it with
# `tail -n1`).
#
# Layout of the wheels (all under DEST/nvidia/cu13/): bin/ (nvcc, ptxas, fatbinary, nvlink,
# cudafe++, and bin/nvcc.profile, which points nvcc at ../nvvm/bin for cicc, ../nvvm/libdevice,
# ../include and ../include/cccl relative to nvcc's own location), include/ (runtime and crt
# headers, cuda_bf16.h, cccl), nvvm/ (cicc, libdevice), lib/ (cudart). Because every wheel
# unpacks into that one tree, nvcc works as is: no symlinks, -I flags, CICC_PATH or
# NVVMIR_LIBRARY_DIR are needed. DEST/bin is a symlink to nvidia/cu13/bin so that DEST can
# serve as CUDA_HOME.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-${DORAFUSE_TOOLCHAIN:-$root/.toolchain/cuda}}
mkdir -p "$(dirname "$dest")"
dest=$(cd "$(dirname "$dest")" && pwd)/$(basename "$dest")

# The pins (docs/design.md §6). The runtime wheel carries cuda_runtime.h and the crt wheel the
# crt/*.h that every .cu includes; nvvm carries cicc (the device front end), cccl the C++ headers.
pkgs=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
)
want=$(printf '%s\n' "${pkgs[@]}")
stamp=.dorafuse-toolchain
nvcc_rel=nvidia/cu13/bin/nvcc

say() { echo "install-nvcc: $*" >&2; }

# Compiles a small bf16 kernel (the header every dorafuse kernel needs) into a fatbin with SASS
# for sm_80 and sm_90 and PTX for compute_90: proves that cicc, ptxas, fatbinary, the headers and
# the host compiler all work together.
verify() {
  local nvcc=$1 dir
  dir=$(mktemp -d)
  cat >"$dir/check.cu" <<'EOF'
#include <cuda_bf16.h>
extern "C" __global__ void check_scale_bf16(const __nv_bfloat16* __restrict__ x,  // [n]
                                            __nv_bfloat16* __restrict__ y,        // [n]
                                            float s, long long n) {
  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16(__bfloat162float(x[i]) * s);
}
EOF
  if ! "$nvcc" -fatbin -std=c++17 -lineinfo \
      -gencode arch=compute_80,code=sm_80 -gencode 'arch=compute_90,code=[sm_90,compute_90]' \
      -o "$dir/check.fatbin" "$dir/check.cu" >"$dir/log" 2>&1; then
    say "nvcc at $nvcc failed to compile a bf16 test kernel:"
    cat "$dir/log" >&2
    rm -rf "$dir"
    return 1
  fi
  if [ ! -s "$dir/check.fatbin" ]; then
    say "nvcc produced no fatbin"
    rm -rf "$dir"
    return 1
  fi
  rm -rf "$dir"
}

if [ -x "$dest/$nvcc_rel" ] && [ -f "$dest/$stamp" ] && [ "$(cat "$dest/$stamp")" = "$want" ]; then
  say "CUDA 13.0 compiler already installed in $dest"
  echo "$dest/$nvcc_rel"
  exit 0
fi

command -v python3 >/dev/null || { say "python3 is required (with pip)"; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { say "python3 -m pip is required"; exit 1; }
command -v g++ >/dev/null || say "warning: no g++ on PATH; nvcc needs a host C++ compiler (apt-get install g++)"
[ "$(uname -m)" = x86_64 ] || say "warning: these wheels are pinned for x86-64; pip may find none for $(uname -m)"

start=$(date +%s)
tmp="$dest.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
say "installing ${pkgs[*]} into $dest"
# --target keeps the toolchain out of every Python environment; --no-deps because these five
# wheels are self-contained for compiling (the pins are exact, nothing to resolve).
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --no-compile \
  --only-binary=:all: --target "$tmp" "${pkgs[@]}" >&2
ln -s nvidia/cu13/bin "$tmp/bin"
verify "$tmp/$nvcc_rel"
printf '%s\n' "$want" >"$tmp/$stamp"
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
# build.rs watches this script when it found no nvcc (see build/nvcc.rs): touching it makes the
# next cargo build look for nvcc again and compile the kernels, without a `cargo clean`.
touch "${BASH_SOURCE[0]}"
say "done in $(($(date +%s) - start)) s, $(du -sh "$dest" | cut -f1) in $dest"
"$dest/$nvcc_rel" --version | tail -n2 >&2
echo "$dest/$nvcc_rel"
