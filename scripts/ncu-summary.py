#!/usr/bin/env python3
"""Per-kernel table (Markdown) from Nsight Compute's CSV, as scripts/gpu-check.sh writes it.

usage: scripts/ncu-summary.py NCU.csv

The CSV comes from `ncu --csv --print-units base --metrics <the list in gpu-check.sh>`
(`--log-file`). Launches of one kernel with one grid and block are one row: the mean of
their duration and DRAM bytes (ncu replays each launch with cold caches, one at a time, with
the clocks as they were: `--clock-control none`). DRAM GB/s counts bytes read plus written;
the write count can stay under the bytes a kernel stores when L2 still holds them at its end.
"""
import collections
import csv
import sys

METRICS = {
    "gpu__time_duration.sum": "time",
    "dram__bytes_read.sum": "read",
    "dram__bytes_write.sum": "write",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio": "barrier",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "scoreboard",
    "launch__registers_per_thread": "regs",
}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    lines = [l for l in open(sys.argv[1], encoding="utf-8") if l.startswith('"')]
    launches = collections.OrderedDict()
    for r in csv.DictReader(lines):
        name = METRICS.get(r["Metric Name"])
        if name is None:
            continue
        key = (r["ID"], r["Kernel Name"], r["Grid Size"], r["Block Size"])
        launches.setdefault(key, {})[name] = float(r["Metric Value"].replace(",", ""))
    if not launches:
        sys.exit(f"{sys.argv[1]}: no ncu metric rows (was it written with --csv --log-file?)")
    groups = collections.OrderedDict()
    for (_, kernel, grid, block), m in launches.items():
        groups.setdefault((kernel, grid, block), []).append(m)
    print("| kernel | grid | block | launches | time | DRAM read | DRAM write | DRAM GB/s "
          "| warps active | SM busy | memory busy | stall: barrier | stall: long scoreboard | registers |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (kernel, grid, block), ms in groups.items():
        def mean(k):
            vals = [m[k] for m in ms if k in m]
            return sum(vals) / len(vals) if vals else float("nan")
        t_ns = mean("time")
        rd, wr = mean("read"), mean("write")
        print(f"| `{kernel}` | {grid} | {block} | {len(ms)} | {t_ns / 1e3:.1f} µs | "
              f"{rd / 1e6:.1f} MB | {wr / 1e6:.1f} MB | {(rd + wr) / t_ns:.0f} | "
              f"{mean('occupancy'):.0f}% | {mean('sm'):.0f}% | {mean('mem'):.0f}% | "
              f"{mean('barrier'):.2f} | {mean('scoreboard'):.2f} | {mean('regs'):.0f} |")


if __name__ == "__main__":
    main()
