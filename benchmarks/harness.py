"""The harness every benchmark script shares: inputs, timing, peak memory, the correctness gate
and one long-format CSV (after Liger-Kernel's `benchmark/scripts/utils.py`).

- Timing: `bench` is `triton.testing.do_bench` (warm-up, L2 flushed between runs) returning
  the p20/p50/p80 of the step in ms. `bench_collective` times a fixed number of steps, each
  after a barrier, with CUDA events: do_bench sizes its repeat count from each process's own
  estimate, and ranks that run different counts of a collective step deadlock. Without CUDA
  both fall back to `time.perf_counter` (a dry run of a script, not a measurement).
- Memory: `peak_above` is the peak allocated inside a block beyond what was allocated on entry
  (the inputs; their gradients count once they are made inside).
- Correctness: `gate` compares a loss, dq, dk and dscale with `infcl.naive_loss` in float64
  under the one tolerance rule of `tests/helpers.py` (`err(impl) <= c * err(naive_loss in the
  same dtype) + FLOOR[dtype]`, `helpers.judge`); a script reports no timing for a variant whose
  verdict fails. There is no other tolerance table in `benchmarks/`.
- Output: `Csv` writes rows of `FIELDS` (impl, metric, B, D, dtype, world, value, p20, p50,
  p80, card, torch, triton, commit, date); `value` is the p50. The file is rewritten after every
  row, so a run cut short keeps what it measured. `table` prints a summary of such rows.

Imports: this module puts the repository root and its `tests/` folder on `sys.path`, so a script
run from a checkout (`python benchmarks/bench_loss.py`) imports that checkout's `infcl` and
`tests/helpers.py` as `helpers`. Scripts import `harness` first.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# E402: these two resolve through the sys.path entries just made (tests/helpers.py, and this
# checkout's infcl rather than an installed copy), so they cannot sit at the top.
import helpers  # noqa: E402

import infcl  # noqa: E402

try:
    import triton
    import triton.testing

    TRITON_VERSION = triton.__version__
except ImportError:  # CPU-only platforms: the scripts' dry runs still work
    triton = None
    TRITON_VERSION = "none"

FIELDS = ["impl", "metric", "B", "D", "dtype", "world", "value", "p20", "p50", "p80", "card",
          "torch", "triton", "commit", "date"]
QUANTILES = (0.2, 0.5, 0.8)
GIB = 2**30


def commit() -> str:
    """Short hash of the checkout (INFCL_COMMIT overrides it, for a copy without .git)."""
    env = os.environ.get("INFCL_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL, cwd=ROOT).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dname(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the CSV's dtype column."""
    return str(dtype).split(".")[-1]


def card(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unit_rows(n: int, d: int, dtype: torch.dtype, seed: int, device: torch.device) -> Tensor:
    """n random unit rows of width d (drawn in fp32 from `seed`, then rounded to `dtype`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1).to(dtype)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` after a collection (a huge number for the CPU)."""
    gc.collect()
    if device.type != "cuda":
        return 1 << 62
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 of a list of step times, interpolated as do_bench does (torch.quantile)."""
    if not times_ms:
        return math.nan, math.nan, math.nan
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(
        torch.tensor(QUANTILES, dtype=torch.float64))
    p20, p50, p80 = q.tolist()
    return p20, p50, p80


def bench(step: Callable[[], object], device: torch.device, rep_ms: int = 200,
          warmup_ms: int | None = None) -> tuple[float, float, float]:
    """p20, p50, p80 ms of `step` from `triton.testing.do_bench` (CUDA), else a timed loop."""
    warmup_ms = max(rep_ms // 4, 1) if warmup_ms is None else warmup_ms
    if device.type == "cuda" and triton is not None:
        p20, p50, p80 = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms,
                                                quantiles=list(QUANTILES))
        return p20, p50, p80
    step()
    times, spent = [], 0.0
    while spent < rep_ms or not times:
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
        spent += times[-1]
    return quantiles(times)


def bench_collective(step: Callable[[], object], device: torch.device, n: int,
                     line_up: Callable[[], None]) -> list[float]:
    """ms of each of `n` runs of a collective `step`, every run after `line_up()` (a barrier).

    The count is fixed and the same on every rank (see the module docstring); CUDA events time
    the step on the GPU, `time.perf_counter` on the CPU.
    """
    out = []
    for _ in range(n):
        line_up()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            out.append((time.perf_counter() - t) * 1e3)
    return out


@contextlib.contextmanager
def peak_above(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the peak GiB allocated inside it beyond what was
    allocated on entry (NaN without CUDA). Empties the cache first so that entry is exact."""
    out: list[float] = []
    base = 0
    if device.type == "cuda":
        sync(device)
        free_memory(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield out
    finally:
        if device.type == "cuda":
            sync(device)
            out.append((torch.cuda.max_memory_allocated(device) - base) / GIB)
        else:
            out.append(math.nan)


def matmul_tflops(dtype: torch.dtype, device: torch.device, n: int = 8192) -> float:
    """Measured rate of an n^3 matmul in `dtype` (median of do_bench), the roofline's ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _, ms, _ = bench(lambda: a @ b, device, rep_ms=300, warmup_ms=50)
    return 2 * n**3 / ms / 1e9


def floor(dtype: torch.dtype, tf32: bool) -> float:
    """helpers.FLOOR for `dtype`; float32 whose products run in TF32 has its own entry."""
    return helpers.FLOOR["tf32" if tf32 and dtype == torch.float32 else dtype]


def gate(fn: Callable[..., Tensor], q: Tensor, k: Tensor, scale: Tensor, *, tf32: bool = False,
         ref_fn: Callable[..., Tensor] = infcl.naive_loss, **spec: object) -> helpers.Verdict:
    """The verdict of helpers.judge on `fn(q, k, scale)` against `ref_fn(q, k, scale, **spec)`
    (`infcl.naive_loss`, or the sigmoid one): loss, dq, dk and dscale of `loss.sum()`, the
    reference in float64 as the truth and in q's dtype as the yardstick. `tf32`: fn runs
    float32 products in TF32 (its own floor). Output dtypes are not judged: a baseline's are
    its own business (the tests hold infcl's)."""
    truth = helpers.run(ref_fn, q.double(), k.double(), scale.detach().double(), **spec)
    ref = helpers.run(ref_fn, q, k, scale, **spec)
    got = helpers.run(fn, q, k, scale)
    return helpers.judge(got, ref, truth, dtype=q.dtype, floor=floor(q.dtype, tf32))


class Csv:
    """Long-format rows of FIELDS; `meta` fills card, torch, triton, commit and date."""

    def __init__(self, path: str, device: torch.device, world: int = 1, write: bool = True):
        self.path, self.world, self.write = path, world, write
        self.rows: list[dict] = []
        self.meta = dict(card=card(device), torch=torch.__version__, triton=TRITON_VERSION,
                         commit=commit(), date=datetime.date.today().isoformat())

    def add(self, impl: str, metric: str, b: int, d: int, dtype: torch.dtype, value: float,
            p20: float | str = "", p80: float | str = "") -> None:
        self.rows.append(dict(impl=impl, metric=metric, B=b, D=d, dtype=dname(dtype),
                              world=self.world, value=value, p20=p20, p50=value, p80=p80,
                              **self.meta))
        if self.write:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(self.rows)


STATUS = {"oom": "oom", "oom_predicted": "oom*", "skipped_budget": "skip", "error": "error"}
"""Metrics that mark a point not measured, and how `table` shows them."""


def table(rows: list[dict], sizes: list[int]) -> list[str]:
    """Rows = method and dtype, columns = B, cells 'p50 ms/peak GiB' or the point's status."""
    keys: list[tuple[str, str]] = []
    ms: dict[tuple[str, str, int], float] = {}
    gib: dict[tuple[str, str, int], float] = {}
    cell: dict[tuple[str, str, int], str] = {}
    for r in rows:
        if r["impl"] == "matmul" or r["metric"] not in ("ms", "peak_gib", *STATUS):
            continue
        key = (r["impl"], r["dtype"])
        if key not in keys:
            keys.append(key)
        at = (*key, int(r["B"]))
        if r["metric"] == "ms":
            ms[at] = float(r["value"])
        elif r["metric"] == "peak_gib":
            gib[at] = float(r["value"])
        else:
            cell[at] = STATUS[r["metric"]]
    out = [f"{'impl':22s} {'dtype':9s} " + " ".join(f"{b:>15d}" for b in sizes)]
    for key in keys:
        cells = []
        for b in sizes:
            at = (*key, b)
            if at in ms:
                cells.append(f"{ms[at]:.1f}/{gib.get(at, math.nan):.2f}")
            else:
                cells.append(cell.get(at, "-"))
        out.append(f"{key[0]:22s} {key[1]:9s} " + " ".join(f"{c:>15s}" for c in cells))
    return out
