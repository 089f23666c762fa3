"""Plot benchmark CSVs: time and peak memory against the batch, log-log, one figure per CSV and world.

Reads the long-format CSVs of `bench_loss.py` (no `world` column: one GPU) and `bench_ring.py`
from `benchmarks/results/` (or the files given) and writes `docs/img/<csv name>[_w<W>].png`: left
panel the median ms per forward+backward step against B, right panel the peak GiB above the inputs
against B, one line per method and dtype (single-GPU references of the ring run dashed), named
in the legend under the panels by what a user calls (`LABELS`). Methods that ran out of memory
say from which B in the legend; where the CSV has `inputs_gib` for
`infcl_inf`, the right panel also shows 1.5x those bytes (issue 4's memory goal) dotted.

Run: `python benchmarks/plot.py [--results DIR] [--out docs/img] [CSV ...]`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
from collections import defaultdict

import matplotlib
import matplotlib.pyplot as plt

PLOTTED = ("ms", "peak_gib")
OOM = ("oom", "oom_predicted")
LABELS = {
    "infcl_inf": "infcl inf_loss (symmetric)",
    "infcl_inf_1dir": "infcl inf_loss (one direction)",
    "infcl_inf_ieee": "infcl inf_loss, precision='ieee' (symmetric)",
    "infcl_chunked": "infcl chunked_loss (symmetric)",
    "infcl_ring": "infcl ring_loss, torch tiles (symmetric)",
    "naive_loss": "infcl naive_loss, fp32 logits (symmetric)",
    "naive": "materialised logits, F.cross_entropy (symmetric)",
    "naive_compiled": "torch.compile(naive_loss) (symmetric)",
    "infcl_inf_graphed": "infcl inf_loss under torch.compile(mode='reduce-overhead') (symmetric)",
    "naive_graphed": "naive_loss under torch.compile(mode='reduce-overhead') (symmetric)",
    "infcl_sigmoid": "infcl inf_sigmoid_loss (SigLIP)",
    "infcl_sigmoid_2pass": "infcl inf_sigmoid_loss, two passes: reduction='none' (SigLIP)",
    "sigmoid_compiled": "torch.compile(naive_sigmoid_loss) (SigLIP)",
    "open_clip_siglip": "open_clip SigLipLoss, one GPU (SigLIP)",
    "open_clip": "open_clip ClipLoss (symmetric)",
    "inf_cl_1.2.1": "inf_cl 1.2.1 cal_inf_loss (symmetric)",
    "allgather_bf16": "all-gather with gradient, open_clip ClipLoss, autocast (symmetric)",
    "allgather_fp32": "all-gather with gradient, open_clip ClipLoss (symmetric)",
    "ref1gpu_local_1dir": "single-GPU reference, local rows x global batch, one direction",
    "ref1gpu_global_sym": "single-GPU reference, global batch, symmetric",
}
"""Legend names of the impl ids the benchmark scripts write (an unknown id shows as itself)."""
RING_LABELS = {
    "infcl_inf": "infcl inf_loss, ring over {w} GPUs (symmetric)",
    "infcl_ring": "infcl ring_loss, ring over {w} GPUs, torch tiles (symmetric)",
    "inf_cl_1.2.1": "inf_cl 1.2.1 cal_inf_loss, ring over {w} GPUs (symmetric)",
}
"""Names that change across GPUs (where the same id runs the ring)."""
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


def label(impl: str, dtype: str, world: int) -> str:
    """'infcl inf_loss (one direction), bf16' for ('infcl_inf_1dir', 'bfloat16', 1)."""
    name = RING_LABELS[impl].format(w=world) if world > 1 and impl in RING_LABELS else (
        LABELS.get(impl, impl))
    return f"{name}, {DTYPES.get(dtype, dtype)}"


def load(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(x: str) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def series(rows: list[dict]) -> dict:
    """{(impl, dtype, D): {"ms": {B: v}, "peak_gib": {B: v}, "oom": min B}} for one world."""
    out: dict = defaultdict(lambda: {"ms": {}, "peak_gib": {}, "oom": None})
    for r in rows:
        impl, metric = r.get("impl", ""), r.get("metric", "")
        if impl == "matmul" or "/" in impl:
            continue
        key = (impl, r.get("dtype", ""), r.get("D", ""))
        b = int(num(r.get("B", "nan"))) if math.isfinite(num(r.get("B", "nan"))) else None
        if b is None:
            continue
        if metric in PLOTTED:
            v = num(r.get("value", ""))
            if math.isfinite(v) and v > 0:
                out[key][metric][b] = v
        elif metric in OOM:
            prev = out[key]["oom"]
            out[key]["oom"] = b if prev is None else min(prev, b)
    return {k: v for k, v in out.items() if v["ms"] or v["peak_gib"] or v["oom"] is not None}


def goal_line(rows: list[dict]) -> dict[int, float]:
    """1.5x the inputs' GiB per rank of infcl_inf, by B (issue 4's memory goal)."""
    out = {}
    for r in rows:
        if r.get("impl") == "infcl_inf" and r.get("metric") == "inputs_gib":
            v = num(r.get("value", ""))
            if math.isfinite(v):
                out[int(num(r["B"]))] = 1.5 * v
    return out


def title(rows: list[dict], name: str, world: int) -> str:
    first = rows[0] if rows else {}
    where = f"{first.get('card', '?')} x{world}" if world > 1 else first.get("card", "?")
    ds = sorted({r.get("D", "") for r in rows if r.get("metric") == "ms"})
    # several runs in one CSV: every commit, in order (a later run's points replace earlier ones)
    commits = list(dict.fromkeys(r.get("commit", "?") for r in rows)) or ["?"]
    return (f"{name}: {where}, D={'/'.join(ds)}, torch {first.get('torch', '?')}, "
            f"triton {first.get('triton', '?')}, {', then '.join(commits)}, "
            f"{first.get('date', '?')}")


def plot_one(rows: list[dict], name: str, world: int, path: str) -> None:
    data = series(rows)
    if not data:
        return
    several_d = len({k[2] for k in data}) > 1
    # the legend goes under both panels (inside either it hides lines): one row per two methods
    legend_in = 0.18 * math.ceil(len(data) / 2) + 0.15
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2 + legend_in))
    markers = "osD^v<>pPX*h"
    for i, (key, s) in enumerate(sorted(data.items())):
        impl, dtype, d = key
        text = label(impl, dtype, world) + (f", D={d}" if several_d else "")
        if s["oom"] is not None:
            text += f" (OOM from B={s['oom']})"
        style = dict(marker=markers[i % len(markers)], linestyle="--" if impl.startswith("ref")
                     else "-", label=text, color=f"C{i % 10}")
        for ax, metric in zip(axes, PLOTTED, strict=True):
            pts = sorted(s[metric].items())
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            elif metric == "ms":
                ax.plot([], [], **style)  # keep the legend entry of a method that never ran
    goal = goal_line(rows)
    if goal:
        pts = sorted(goal.items())
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], ":", color="grey",
                     label="goal of issue 4: 1.5 x the inputs of infcl inf_loss")
    for ax, ylabel in zip(axes, ("ms per forward+backward (median)",
                                  "peak GiB above inputs" + (" per rank" if world > 1 else "")),
                          strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("global batch B" if world > 1 else "batch B")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=axes[0].get_lines(), loc="lower center", ncol=2, fontsize=8,
               frameon=False)
    if goal:
        axes[1].legend(fontsize=8, loc="lower right", handles=axes[1].get_lines()[-1:])
    fig.suptitle(title(rows, name, world), fontsize=9)
    fig.tight_layout(rect=(0, legend_in / (5.2 + legend_in), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csvs", nargs="*", help="CSV files (default: every CSV under --results)")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    matplotlib.use("Agg")  # files only; pyplot settles its backend at the first figure
    paths = args.csvs or sorted(glob.glob(os.path.join(args.results, "**", "*.csv"),
                                          recursive=True))
    if not paths:
        raise SystemExit(f"no CSV files under {args.results}")
    os.makedirs(args.out, exist_ok=True)
    for path in paths:
        rows = load(path)
        by_world: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            w = num(r.get("world", "") or "1")
            by_world[int(w) if math.isfinite(w) else 1].append(r)
        base = os.path.splitext(os.path.relpath(path, args.results))[0]
        if base.startswith(".."):
            base = os.path.splitext(os.path.basename(path))[0]
        base = base.replace(os.sep, "_")
        for world, part in sorted(by_world.items()):
            name = base if len(by_world) == 1 else f"{base}_w{world}"
            plot_one(part, base, world, os.path.join(args.out, f"{name}.png"))


if __name__ == "__main__":
    main()
