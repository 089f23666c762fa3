"""naive_loss against chunked_loss on this machine, as the batch grows.

For each batch size B: the symmetric CLIP loss on unit-norm random float32 vectors (D=256,
scale=20), forward and backward, once with the materialised logits (`naive_loss`) and once in
strips (`chunked_loss`). Printed: how far the two disagree (loss and the gradients of q, k and the
scale), the time of one step, and the peak memory of that step.

Each measurement runs in a fresh process, so one loss's freed memory cannot hide the next one's
peak. Peak memory is that process's peak resident set size (`ru_maxrss`) after the step minus
its peak just before it, when it held the interpreter, torch and the inputs; the difference is
what the step added: the loss's working memory plus the input gradients (2·B·D floats).
CPU allocations are invisible to tracemalloc, which is why this is measured from the OS side.

naive is skipped where its logits alone would exceed `--naive-max-gib` (or a sixth of the
memory available); the line then says how much its measured peak at smaller B predicts. Larger
sizes show the same trend, slowly on a CPU: try `--sizes 16384 32768 --naive-max-gib 2`.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context

GiB = 1 << 30


def _maxrss_bytes() -> int:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _measure(impl: str, b: int, d: int, scale: float, seed: int, want_grads: bool) -> dict:
    """One fresh process: build inputs, warm up on a tiny batch, then time one step at B."""
    import torch

    import infcl

    loss_fn = getattr(infcl, f"{impl}_loss")

    def inputs(n: int):
        g = torch.Generator().manual_seed(seed)
        q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        k = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
        s = torch.tensor(scale)
        return q.requires_grad_(), k.requires_grad_(), s.requires_grad_()

    def step(q, k, s):
        loss = loss_fn(q, k, s, symmetric=True)
        loss.backward()
        return loss

    step(*inputs(64))
    q, k, s = inputs(b)
    before = _maxrss_bytes()
    times = []
    while True:
        q.grad = k.grad = s.grad = None
        t0 = time.perf_counter()
        loss = step(q, k, s)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 or sum(times) > 0.5:
            break
    peak = _maxrss_bytes() - before
    out = {
        "loss": loss.item(),
        "dscale": s.grad.item(),
        "time": statistics.median(times),
        "peak": peak,
        "threads": torch.get_num_threads(),
    }
    if want_grads:
        out["dq"], out["dk"] = q.grad.numpy(), k.grad.numpy()
    return out


def _run(*args) -> dict | None:
    """Run `_measure` in a new spawned process; None if that process died (e.g. out of memory)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        try:
            return pool.submit(_measure, *args).result()
        except BrokenProcessPool:
            return None


def _available_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _gib(x: float) -> str:
    return f"{x / GiB:.3f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--naive-max-gib", type=float, default=0.5,
                   help="skip naive where its float32 logits alone would exceed this many GiB "
                        "(default 0.5 keeps the demo within a few minutes on 2 CPU cores; "
                        "it is lowered further to a sixth of the memory available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import numpy as np
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, float32, D={args.dim}, "
          f"scale={args.scale}, symmetric; time: median of up to 3 steps")
    naive_max = min(args.naive_max_gib * GiB, _available_bytes() / 6)
    print(f"naive runs while its logits take at most {_gib(naive_max)} "
          f"(its peak is about 5x that); chunked runs at every B")
    rows = []
    naive_per_b2 = None  # measured naive peak bytes per logit, to predict the skipped sizes
    for b in args.sizes:
        logits = 4 * b * b
        run_naive = logits <= naive_max
        naive = _run("naive", b, args.dim, args.scale, args.seed, True) if run_naive else None
        chunked = _run("chunked", b, args.dim, args.scale, args.seed, run_naive)
        row = {"B": b, "naive": naive, "chunked": chunked, "note": ""}
        if not run_naive:
            need = f" (~{_gib(naive_per_b2 * b * b)} at its peak measured above)" \
                if naive_per_b2 else ""
            row["note"] = f"naive skipped: its logits alone would need {_gib(logits)}{need}"
        elif naive is None:
            row["note"] = "naive: process died (out of memory?)"
        else:
            naive_per_b2 = naive["peak"] / (b * b)
        if chunked is None:
            row["note"] += "; chunked: process died"
        if naive and chunked:
            row["dloss"] = abs(naive["loss"] - chunked["loss"])
            row["ddq"] = float(np.abs(naive["dq"] - chunked["dq"]).max())
            row["ddk"] = float(np.abs(naive["dk"] - chunked["dk"]).max())
            row["dds"] = abs(naive["dscale"] - chunked["dscale"])
        rows.append(row)
        _print_row(row, progress=True)

    print()
    header = (f"{'B':>6} | {'loss (chunked)':>14} | {'|dloss|':>8} {'max|ddq|':>8} "
              f"{'max|ddk|':>8} {'|ddscale|':>9} | {'naive s':>8} {'chunked s':>9} | "
              f"{'naive peak':>12} {'chunked peak':>12}")
    print(header)
    print("-" * len(header))
    for row in rows:
        _print_row(row)
    for row in rows:
        if row["note"]:
            print(f"B={row['B']}: {row['note']}")


def _print_row(row: dict, progress: bool = False) -> None:
    n, c = row["naive"], row["chunked"]

    def num(x, fmt):
        return format(x, fmt) if x is not None else "-"

    if progress:
        parts = [f"B={row['B']}:"]
        if n:
            parts.append(f"naive {n['time']:.3f} s, peak {_gib(n['peak'])};")
        if c:
            parts.append(f"chunked {c['time']:.3f} s, peak {_gib(c['peak'])};")
        if "dloss" in row:
            parts.append(f"|dloss| {row['dloss']:.1e}")
        print(" ".join(parts), flush=True)
        return
    print(f"{row['B']:>6} | {num(c and c['loss'], '14.6f'):>14} | "
          f"{num(row.get('dloss'), '8.1e'):>8} {num(row.get('ddq'), '8.1e'):>8} "
          f"{num(row.get('ddk'), '8.1e'):>8} {num(row.get('dds'), '9.1e'):>9} | "
          f"{num(n and n['time'], '8.3f'):>8} {num(c and c['time'], '9.3f'):>9} | "
          f"{(_gib(n['peak']) if n else '-'):>12} {(_gib(c['peak']) if c else '-'):>12}")


if __name__ == "__main__":
    main()
