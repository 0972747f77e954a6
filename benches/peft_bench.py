#!/usr/bin/env python3
"""Time HuggingFace PEFT's own DoRA layer (and LoRA, and the bare base layer) on the shapes
`dorafuse bench` uses, and write the same JSON schema (docs/bench-json.md), so that one GPU
run puts PEFT beside dorafuse:

    dorafuse bench --json dorafuse.json
    python3 benches/peft_bench.py --json peft.json
    dorafuse bench --from dorafuse.json --from peft.json --plot both.svg --markdown BENCHMARKS.md

Rows (impl / kind / op):
  peft_eager   base  forward, forward_backward      torch.nn.Linear alone, frozen (dx only)
  peft_eager   lora  forward, forward_backward      PEFT LoRA layer (use_dora=False)
  peft_eager   dora  forward, forward_backward      PEFT DoRA layer, train mode (norm every call)
  peft_eager   dora  inference                      eval mode, no_grad, peft.helpers.DoraCaching
  peft_compile dora  forward, forward_backward      the same under torch.compile, where it works
                                                    (first shape and rank; --compile-all for all)

Timing: CUDA events around each run, the L2 cache flushed before every timed run (a memset of
twice its size, outside the timed region), warm-up first, median and spread of many runs.
Ceilings (device-to-device copy, a large bf16 matmul) are measured in the same run. Bytes and
FLOPs are left to dorafuse's formulas (src/formula.rs), which fill them when the file is
read: one formula per operation, in one place.

Without CUDA the script says so and exits 2, unless --cpu is given: a tiny CPU smoke run (host
clock) that checks the script and the schema, and means nothing about speed.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SCHEMA = "dorafuse-bench"
VERSION = 2  # docs/bench-json.md

# The same defaults as `dorafuse bench` on a GPU (src/bench/runner.rs, Config::default_gpu).
GPU_SHAPES = "4096x4096,4096x11008,11008x4096"
GPU_TOKENS = "1,16,128,512,4096"
GPU_RANKS = "16,64"
CPU_SHAPES = "64x96"
CPU_TOKENS = "1,5"
CPU_RANKS = "4"


def parse_shapes(s):
    out = []
    for item in s.split(","):
        a, b = item.lower().split("x")
        out.append((int(a), int(b)))
    return out


def parse_list(s):
    return [int(v) for v in s.split(",")]


def quantile(sorted_v, q):
    pos = q * (len(sorted_v) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(sorted_v) - 1)
    return sorted_v[lo] + (sorted_v[hi] - sorted_v[lo]) * (pos - lo)


def summarise(samples):
    """The same summary as src/bench/stats.rs: median, p10/p90 (linear), MAD, min."""
    s = sorted(samples)
    med = quantile(s, 0.5)
    dev = sorted(abs(v - med) for v in s)
    return {
        "median_s": med,
        "p10_s": quantile(s, 0.1),
        "p90_s": quantile(s, 0.9),
        "mad_s": quantile(dev, 0.5),
        "min_s": s[0],
        "runs": len(s),
    }


def git_commit():
    env = os.environ.get("DORAFUSE_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
        return out.stdout.strip() or None
    except Exception:
        return None


class Timer:
    """CUDA events with an L2 flush before every timed run, or the host clock on the CPU."""

    def __init__(self, torch, cuda):
        self.torch = torch
        self.cuda = cuda
        self.flush = None
        if cuda:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
            self.flush = torch.empty(2 * l2, dtype=torch.uint8, device="cuda")
            self.l2 = l2

    def describe(self):
        if self.cuda:
            return "CUDA events (torch.cuda.Event); L2 flushed before every timed run (%d MiB memset)" % (
                2 * self.l2 >> 20)
        return "host wall clock (time.perf_counter) around synchronous calls"

    def run(self, fn, setup, warmup, min_reps, max_reps, budget_s):
        torch = self.torch
        for _ in range(warmup):
            setup()
            fn()
        samples, total = [], 0.0
        while len(samples) < max_reps and (len(samples) < min_reps or total < budget_s):
            setup()
            if self.cuda:
                if self.flush is not None:  # None while ceilings() measures with a warm L2
                    self.flush.fill_(len(samples) & 0xFF)
                start = torch.cuda.Event(enable_timing=True)
                stop = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                s = start.elapsed_time(stop) * 1e-3
            else:
                t0 = time.perf_counter()
                fn()
                s = time.perf_counter() - t0
            samples.append(s)
            total += s
        return summarise(samples)


def ceilings(torch, cuda, dtype, timer, small):
    """Copy bandwidth (read + write bytes) and a large matmul rate, measured now."""
    dev = "cuda" if cuda else "cpu"
    nbytes = (64 << 20) if small else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    old, timer.flush = timer.flush, None
    try:
        st = timer.run(lambda: dst.copy_(src), lambda: None, 3, 20 if cuda else 5, 20 if cuda else 5, 0)
        bw = 2 * nbytes / st["median_s"]
        n = 512 if small else 8192
        a = torch.rand(n, n, device=dev).to(dtype) - 0.5
        b = torch.rand(n, n, device=dev).to(dtype) - 0.5
        st = timer.run(lambda: torch.matmul(a, b.t()), lambda: None, 3, 10 if cuda else 3, 10 if cuda else 3, 0)
        rate = 2 * n ** 3 / st["median_s"]
    finally:
        timer.flush = old
    name = str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "f32").replace("float16", "f16")
    return {
        "copy_gbps": bw / 1e9,
        "copy_method": "torch copy_ of %d MiB, read + write bytes, median" % (nbytes >> 20),
        "gemm_tflops": rate / 1e12,
        "gemm_dtype": name,
        "gemm_method": "torch.matmul %dx%dx%d %s on random data, median" % (n, n, n, name),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="output file (dorafuse-bench schema v1)")
    ap.add_argument("--shapes", help="D_INxD_OUT,... (default: %s; --cpu: %s)" % (GPU_SHAPES, CPU_SHAPES))
    ap.add_argument("--tokens", help="T,... (default: %s; --cpu: %s)" % (GPU_TOKENS, CPU_TOKENS))
    ap.add_argument("--ranks", help="r,... (default: %s; --cpu: %s)" % (GPU_RANKS, CPU_RANKS))
    ap.add_argument("--dtype", default=None, help="bf16 (GPU default), f16 or f32 (--cpu default)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--min-reps", type=int, default=20)
    ap.add_argument("--max-reps", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.1, help="seconds of timed runs per row")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile-all", action="store_true",
                    help="torch.compile rows at every shape and rank (default: the first shape and "
                         "rank only, because each new shape recompiles, which takes tens of seconds)")
    ap.add_argument("--cpu", action="store_true",
                    help="no GPU: a tiny CPU smoke run that checks the script and schema (not a benchmark)")
    ap.add_argument("--cpu-full", action="store_true",
                    help="with --cpu: time the given shapes with the given repetitions, a CPU benchmark "
                         "to merge beside `dorafuse bench --device cpu` (instead of the smoke run)")
    args = ap.parse_args()

    try:
        import torch
        import peft
        from peft import LoraConfig, get_peft_model
        from peft.helpers import DoraCaching
    except ImportError as e:
        print("peft_bench.py needs torch and peft: %s" % e, file=sys.stderr)
        return 2

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu:
        print("no CUDA device: peft_bench.py times PEFT on a GPU; use --cpu for a tiny smoke run "
              "of the script (CPU timings, not a benchmark)", file=sys.stderr)
        return 2
    if args.cpu:
        cuda = False
        print("--cpu: tiny CPU smoke run; these timings say nothing about GPU speed")
    small = not cuda
    shapes = parse_shapes(args.shapes or (CPU_SHAPES if small else GPU_SHAPES))
    tokens = parse_list(args.tokens or (CPU_TOKENS if small else GPU_TOKENS))
    ranks = parse_list(args.ranks or (CPU_RANKS if small else GPU_RANKS))
    dname = args.dtype or ("f32" if small else "bf16")
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dname]
    dev = "cuda" if cuda else "cpu"
    if small and not args.cpu_full:
        args.warmup, args.min_reps, args.max_reps, args.budget = 1, 3, 5, 0.05
    timer = Timer(torch, cuda)
    torch.manual_seed(0)

    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = {"kind": "cuda", "name": "%s (sm_%d%d, %d SMs)" % (props.name, props.major, props.minor,
                                                                   props.multi_processor_count),
                  "units": props.multi_processor_count, "memory_bytes": props.total_memory}
    else:
        model = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        device = {"kind": "cpu", "name": model, "units": os.cpu_count(), "memory_bytes": None}

    notes = []
    if small and args.cpu_full:
        notes.append("PEFT on the CPU: torch %s with %d threads, host wall clock" % (torch.__version__,
                                                                                 torch.get_num_threads()))
    elif small:
        notes.append("peft_bench.py --cpu smoke run: checks the script and schema; says nothing about speed")
    ceil = ceilings(torch, cuda, dtype, timer, small)
    rows = []

    def add(impl, kind, op, shape, st, extra=None, note=None):
        t, d_in, d_out, r = shape
        row = {"impl": impl, "kind": kind, "op": op, "dtype": dname, "t": t, "d_in": d_in,
               "d_out": d_out, "r": r, "time": st}
        if extra is not None:
            row["extra_mem_bytes"] = int(extra)
            row["extra_mem_source"] = "torch.cuda.max_memory_allocated above the inputs and outputs"
        if note:
            row["note"] = note
        rows.append(row)
        print("%-13s %-5s %-16s %6dx%-6d r=%-3d T=%-5d %10.1f us" % (
            impl, kind, op, d_in, d_out, r, t, st["median_s"] * 1e6), flush=True)

    def timed(fn, setup=lambda: None):
        """Time fn; on CUDA also the peak memory it allocates beyond what exists before."""
        extra = None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        st = timer.run(fn, setup, args.warmup, args.min_reps, args.max_reps, args.budget)
        if cuda:
            torch.cuda.synchronize()
            extra = max(0, torch.cuda.max_memory_allocated() - base)
        return st, extra

    class Wrap(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    compile_ok = not args.no_compile
    for d_in, d_out in shapes:
        for r in ranks:
            t_max = max(tokens)
            x_full = (torch.rand(t_max, d_in, device=dev) * 2 - 1).to(dtype)
            dy_full = (torch.rand(t_max, d_out, device=dev) * 2 - 1).to(dtype)
            base = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype)
            base.weight.requires_grad_(False)
            models = {}
            for kind, use_dora in (("lora", False), ("dora", True)):
                lin = torch.nn.Linear(d_in, d_out, bias=False, device=dev, dtype=dtype)
                lin.weight.data.copy_(base.weight.data)
                cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0,
                                 use_dora=use_dora)
                m = get_peft_model(Wrap(lin), cfg).to(dev)
                # A trained adapter, not PEFT's zero-initialised B.
                for name, p in m.named_parameters():
                    if "lora_B" in name:
                        p.data.copy_((torch.rand_like(p, dtype=torch.float32) - 0.5) / r ** 0.5)
                models[kind] = m
            compiled = None
            first = (d_in, d_out) == shapes[0] and r == ranks[0]
            if compile_ok and (first or args.compile_all):
                try:
                    compiled = torch.compile(models["dora"])
                except Exception as e:  # noqa: BLE001 - any failure means "not available here"
                    notes.append("torch.compile unavailable: %s" % str(e).splitlines()[0])
                    compile_ok = False
            for t in tokens:
                shape = (t, d_in, d_out, r)
                x = x_full[:t].contiguous()
                dy = dy_full[:t].contiguous()
                xg = x.clone().requires_grad_(True)

                def zero(m=None):
                    xg.grad = None
                    if m is not None:
                        for p in m.parameters():
                            p.grad = None

                # Base layer alone.
                with torch.no_grad():
                    add("peft_eager", "base", "forward", shape, *timed(lambda: base(x)))
                add("peft_eager", "base", "forward_backward", shape,
                    *timed(lambda: base(xg).backward(dy), zero))
                for kind in ("lora", "dora"):
                    m = models[kind]
                    m.train()
                    add("peft_eager", kind, "forward", shape, *timed(lambda: m(xg)))
                    add("peft_eager", kind, "forward_backward", shape,
                        *timed(lambda: m(xg).backward(dy), lambda: zero(m)))
                m = models["dora"]
                m.eval()
                with torch.no_grad(), DoraCaching():
                    add("peft_eager", "dora", "inference", shape, *timed(lambda: m(x)),
                        note="eval mode, no_grad, peft.helpers.DoraCaching (B·A and the norm cached)")
                m.train()
                if compiled is not None and compile_ok:
                    try:
                        # Compilation (and recompilation for a new T) happens here, untimed.
                        for _ in range(3):
                            compiled(xg).backward(dy)
                            zero(m)
                        add("peft_compile", "dora", "forward", shape, *timed(lambda: compiled(xg)))
                        add("peft_compile", "dora", "forward_backward", shape,
                            *timed(lambda: compiled(xg).backward(dy), lambda: zero(m)))
                    except Exception as e:  # noqa: BLE001
                        notes.append("torch.compile failed at %dx%d r=%d T=%d: %s" % (
                            d_in, d_out, r, t, str(e).splitlines()[0][:200]))
                        compile_ok = False
            del models, compiled, base
            if cuda:
                torch.cuda.empty_cache()

    doc = {
        "schema": SCHEMA,
        "version": VERSION,
        "producer": "peft_bench.py (peft %s, torch %s)" % (peft.__version__, torch.__version__),
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "settings": {
            "clock": timer.describe(),
            "warmup": args.warmup,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "budget_s": args.budget,
            "cache_policy": "L2 flushed before every timed run" if cuda else "none (CPU smoke run)",
        },
        "ceilings": ceil,
        "rows": rows,
        "notes": notes,
    }
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.json)
    print("wrote %s (%d rows)" % (args.json, len(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
