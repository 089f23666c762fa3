"""Multi-GPU benchmark: the ring (`infcl.inf_loss`, `infcl.ring_loss`) against inf_cl 1.2.1's ring
and an open_clip-style all-gather loss, plus single-GPU references for the scaling efficiency.

Launch (one process per GPU, NCCL; `NCCL_NVLS_ENABLE=0` is set unless already given):

    torchrun --nproc-per-node W benchmarks/bench_ring.py --out DIR [--sizes ...] [--d 512]

Without CUDA it runs on gloo/CPU (a dry run of the harness: use small `--sizes`).

Every method computes the symmetric CLIP loss on the GLOBAL batch of B pairs, split evenly over the
W ranks (b = B // W rows of q and of k per rank, bf16 unless the method says otherwise, unit-norm
random rows, scale 20 as a tensor that requires grad), forward + backward per step:

* `infcl_inf`   `infcl.inf_loss(q, k, s, symmetric=True, group=None)`: Triton tiles per ring step.
* `infcl_ring`  `infcl.ring_loss(q, k, s, symmetric=True)`: torch tiles per ring step (one size).
* `inf_cl_1.2.1` `(cal_inf_loss(q, k, y, s) + cal_inf_loss(k, q, y, s)) / 2`, y = local arange
  (its labels index the local key shard); fp32 inputs only (it upcasts anyway), B <= --inf-cl-max.
* `allgather_bf16` / `allgather_fp32`: what open_clip's `ClipLoss(local_loss=True,
  gather_with_grad=True)` does: features all-gathered WITH gradient
  (`torch.distributed.nn.functional.all_gather`), logits of the local rows against all gathered
  columns and of the local columns against all gathered rows, `F.cross_entropy` with labels
  offset by rank * b. bf16: inputs bf16 under `torch.autocast(bf16)` (bf16 logits, cross-entropy
  in fp32, as a user gets); fp32: plain fp32 (no TF32). O(b * B) memory: 'oom' when it fails.

Single-GPU references for the scaling efficiency (issue 4: single-GPU time for the same per-GPU
work / ring time). Each runs on every rank at once, each rank alone (a process group of one, so
`inf_loss` takes its single-device path), and like everything else reports the max over ranks:

* `ref1gpu_local_1dir`  `inf_loss(q_local[b], k_all[B], s, labels=arange(b) + rank * b)`: the
  q->k direction of this rank's rows against all B columns, NOT symmetric (the symmetric ring
  also builds the column statistics, so it does somewhat more work than this reference).
  Efficiency row: `eff_vs_ref1gpu_local_1dir` = ref ms / ring ms.
* `ref1gpu_global_sym`  `inf_loss(q[B], k[B], s, symmetric=True)`: the whole symmetric loss on one
  GPU; its `ms` is the raw single-GPU time. Efficiency row: `eff_vs_ref1gpu_global_sym_div_W` =
  (ref ms / W) / ring ms.

Correctness comes first: at B = --check-b (D = --check-d; inf_cl at D = 512 where it is defined)
every method's loss and gradients on every rank are compared with float64 `naive_loss` on the
gathered batch, under the DDP convention of `infcl.ring_loss`: each rank returns its local mean,
and dq, dk, dscale are its share of the gradient of the SUM over ranks of the returned losses
(`err_dscale` compares the sum over ranks of the dscale shares with the total). inf_cl all-reduces
the scale's gradient (ANCHORS.md defect 2), so every rank holds the total: its `err_dscale` is
about W - 1 and it is gated on `err_dscale_allreduced` (each rank's dscale against the total)
instead. A method whose check fails (relative error above 2e-2 in bf16, 5e-3 in fp32) is not
timed.

Timing: one warm-up step, then N timed steps (20 up to B = 65536, 10 up to 131072, 5 up to
262144, 3 above; 3 for the slow infcl_ring and inf_cl), each after a barrier, timed with CUDA
events; `p20/p50/p80` are per-rank quantiles, maxed over ranks. Memory: after the warm-up the
grads are dropped and the cache emptied; `peak_gib` is the max over ranks of
(max_memory_allocated during the timed steps - memory_allocated before them), i.e. above the
inputs (the input gradients count). `inputs_gib` is the bytes of this method's q and k on one rank,
`peak_over_inputs` their ratio. A run whose predicted time would pass --budget-s (from the same
method at a smaller B, scaled by B^2) is skipped (`skipped_budget`, value = predicted seconds).
The all-gather baselines are first checked against free memory (16 bytes per logit of the b x B
blocks: `oom_predicted`, value = predicted GiB); a caught torch.OutOfMemoryError gives `oom`.

Output: long-format `bench_ring.csv` in --out (rewritten after every record, so a run cut short
keeps what it measured): impl, metric, B, D, dtype, world, value, p20, p50, p80, card, torch,
triton, commit, date. Metrics: ms, peak_gib, inputs_gib, peak_over_inputs, tflops_floor_per_gpu
(8 B^2 D / W FLOP per GPU per step), eff_vs_*, err_* (check), check_failed, oom, oom_predicted,
skipped_budget, error, unavailable; matmul/tflops (bf16 8192^3, min over ranks). A table
(rows = method and dtype, columns = B, cells ms/GiB) is printed last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import infcl  # noqa: E402

try:
    import triton

    TRITON_VERSION = triton.__version__
except Exception:
    TRITON_VERSION = "none"

try:
    from inf_cl import cal_inf_loss

    INF_CL_ERROR = ""
except Exception as e:  # the baseline is optional
    cal_inf_loss = None
    INF_CL_ERROR = f"{type(e).__name__}: {e}"

T0 = time.time()
# open_clip still calls torch.distributed.nn.functional.all_gather; so does the baseline here
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
FIELDS = ["impl", "metric", "B", "D", "dtype", "world", "value", "p20", "p50", "p80", "card",
          "torch", "triton", "commit", "date"]
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 5e-3}
SCALE = 20.0  # timing
CHECK_SCALE = 30.0  # correctness check (as bench_loss.py)
REF_LOCAL, REF_GLOBAL = "ref1gpu_local_1dir", "ref1gpu_global_sym"


# ----------------------------------------------------------------------------- pure helpers


def commit() -> str:
    env = os.environ.get("INFCL_COMMIT")
    if env:
        return env
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).strip()
    except Exception:
        return "unknown"


def dname(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def quantile(xs: list[float], p: float) -> float:
    """Linear-interpolation quantile of a short list (as numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = p * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def timed_steps(b: int, slow: bool = False) -> int:
    if slow:
        return 3
    if b <= 65536:
        return 20
    if b <= 131072:
        return 10
    if b <= 262144:
        return 5
    return 3


def allgather_peak_bytes(b_local: int, b_global: int, d: int, elem: int) -> int:
    """Predicted peak of the all-gather loss: 16 bytes per logit of the two b x B blocks at the
    worst moment of the backward (fp32 log-softmax outputs of both directions, the nll gradient
    and the log-softmax gradient; bf16 under autocast costs the same since cross_entropy runs
    in fp32), plus the gathered features and their gradients."""
    return 16 * b_local * b_global + 4 * b_global * d * elem


def predicted_seconds(prior: list[tuple[int, float]], b: int, steps: int) -> float | None:
    """Seconds for `steps` steps at batch b, from the largest smaller batch measured (ms), ~B^2."""
    below = [(b0, ms) for b0, ms in prior if b0 < b and math.isfinite(ms)]
    if not below:
        return None
    b0, ms = max(below)
    return ms * (b / b0) ** 2 * steps / 1000.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def table(rows: list[dict], sizes: list[int]) -> list[str]:
    """Rows = method and dtype, columns = B, cells 'ms/GiB' (or oom / skip / -)."""
    keys: list[tuple[str, str]] = []
    cell: dict[tuple[str, str, int], str] = {}
    ms: dict[tuple[str, str, int], float] = {}
    gib: dict[tuple[str, str, int], float] = {}
    for r in rows:
        if r["impl"] == "matmul" or r["metric"] not in (
                "ms", "peak_gib", "oom", "oom_predicted", "skipped_budget", "error"):
            continue
        key = (r["impl"], r["dtype"])
        if key not in keys:
            keys.append(key)
        k3 = (*key, int(r["B"]))
        if r["metric"] == "ms":
            ms[k3] = float(r["value"])
        elif r["metric"] == "peak_gib":
            gib[k3] = float(r["value"])
        else:
            cell[k3] = {"oom_predicted": "oom*", "skipped_budget": "skip"}.get(r["metric"],
                                                                                r["metric"])
    out = [f"{'impl':22s} {'dtype':9s} " + " ".join(f"{b:>15d}" for b in sizes)]
    for key in keys:
        cells = []
        for b in sizes:
            k3 = (*key, b)
            if k3 in ms:
                g = gib.get(k3, float("nan"))
                cells.append(f"{ms[k3]:.1f}/{g:.2f}")
            else:
                cells.append(cell.get(k3, "-"))
        out.append(f"{key[0]:22s} {key[1]:9s} " + " ".join(f"{c:>15s}" for c in cells))
    effs = sorted({r["metric"] for r in rows if r["metric"].startswith("eff_vs_")})
    for metric in effs:
        vals = {int(r["B"]): float(r["value"]) for r in rows
                if r["metric"] == metric and r["impl"] == "infcl_inf"}
        label = metric.replace("eff_vs_ref1gpu_", "eff vs 1 GPU ").replace("_div_W", " / W")
        out.append(f"{label:32s} "
                   + " ".join(f"{vals[b]:>15.3f}" if b in vals else f"{'-':>15s}"
                              for b in sizes))
    return out


# ----------------------------------------------------------------------------- the methods


@dataclass
class Ctx:
    rank: int
    world: int
    dev: torch.device
    cuda: bool
    solo: dist.ProcessGroup  # this rank alone: inf_loss then takes its single-device path


def allgather_loss(q, k, s, ctx: Ctx):
    """open_clip ClipLoss(local_loss=True, gather_with_grad=True), written out."""
    b = q.shape[0]
    all_q = torch.cat(dist_nn.all_gather(q))
    all_k = torch.cat(dist_nn.all_gather(k))
    y = torch.arange(b, device=q.device) + ctx.rank * b
    logits_q = s * q @ all_k.T  # local rows x all columns
    logits_k = s * k @ all_q.T  # local columns x all rows
    return 0.5 * (F.cross_entropy(logits_q, y) + F.cross_entropy(logits_k, y))


def m_infcl_inf(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, symmetric=True, group=None)


def m_infcl_ring(q, k, s, y, ctx):
    return infcl.ring_loss(q, k, s, symmetric=True)


def m_inf_cl(q, k, s, y, ctx):
    lab = torch.arange(q.shape[0], device=q.device)  # local indices: inf_cl's convention
    return 0.5 * (cal_inf_loss(q, k, lab, scale=s) + cal_inf_loss(k, q, lab, scale=s))


def m_allgather_bf16(q, k, s, y, ctx):
    with torch.autocast(ctx.dev.type, dtype=torch.bfloat16):
        return allgather_loss(q, k, s, ctx)


def m_allgather_fp32(q, k, s, y, ctx):
    return allgather_loss(q, k, s, ctx)


def m_ref_local(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, labels=y, group=ctx.solo)


def m_ref_global(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, symmetric=True, group=ctx.solo)


@dataclass
class Method:
    name: str
    dtype: torch.dtype
    kind: str  # "ring": shards + DDP convention; "local"/"global": single-GPU references
    fn: Callable
    slow: bool = False
    check_d: int | None = None  # D of the correctness check (None: --check-d)


METHODS = {
    "infcl_inf": Method("infcl_inf", torch.bfloat16, "ring", m_infcl_inf),
    "infcl_ring": Method("infcl_ring", torch.bfloat16, "ring", m_infcl_ring, slow=True),
    "inf_cl_1.2.1": Method("inf_cl_1.2.1", torch.float32, "ring", m_inf_cl, slow=True,
                           check_d=512),
    "allgather_bf16": Method("allgather_bf16", torch.bfloat16, "ring", m_allgather_bf16),
    "allgather_fp32": Method("allgather_fp32", torch.float32, "ring", m_allgather_fp32),
    REF_LOCAL: Method(REF_LOCAL, torch.bfloat16, "local", m_ref_local),
    REF_GLOBAL: Method(REF_GLOBAL, torch.bfloat16, "global", m_ref_global),
}


# ----------------------------------------------------------------------------- collectives


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.dev)


def line_up(ctx: Ctx) -> None:
    sync(ctx)
    dist.barrier()
    sync(ctx)


def agree(ctx: Ctx, ok: bool) -> bool:
    """True on every rank iff true on every rank."""
    t = torch.tensor([1 if ok else 0], device=ctx.dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(ctx: Ctx, values: list[float]) -> list[float]:
    """Max over ranks; NaN stays NaN only where every rank has NaN."""
    t = torch.tensor([v if math.isfinite(v) else -math.inf for v in values],
                     dtype=torch.float64, device=ctx.dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v if math.isfinite(v) else float("nan") for v in t.tolist()]


def gather_rows(ctx: Ctx, x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def unit(rows: int, d: int, dtype: torch.dtype, seed: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(rows, d, generator=g, device=dev)
    return F.normalize(x, dim=-1).to(dtype)


def free_memory(ctx: Ctx) -> int:
    gc.collect()
    if not ctx.cuda:
        return 1 << 62
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(ctx.dev)[0]


def method_inputs(m: Method, ctx: Ctx, b_global: int, d: int, seed: int, dtype=None):
    """(q, k, labels) of one rank for method m at global batch b_global."""
    dtype = dtype or m.dtype
    w, r, dev = ctx.world, ctx.rank, ctx.dev
    b = b_global // w
    if m.kind == "ring":
        return (unit(b, d, dtype, seed + 2 * r, dev), unit(b, d, dtype, seed + 2 * r + 1, dev),
                None)
    if m.kind == "local":
        y = torch.arange(b, device=dev) + r * b
        return unit(b, d, dtype, seed + 2 * r, dev), unit(b_global, d, dtype, seed - 1, dev), y
    return unit(b_global, d, dtype, seed - 2, dev), unit(b_global, d, dtype, seed - 1, dev), None


# ----------------------------------------------------------------------------- check


def check(m: Method, ctx: Ctx, b_global: int, d: int) -> dict[str, float]:
    """Max over ranks of the relative errors against float64 naive on the gathered batch."""
    w, r, dev = ctx.world, ctx.rank, ctx.dev
    b = b_global // w
    q_loc = unit(b, d, m.dtype, 1000 + 2 * r, dev)
    k_loc = unit(b, d, m.dtype, 1001 + 2 * r, dev)
    q_all, k_all = gather_rows(ctx, q_loc), gather_rows(ctx, k_loc)
    if m.kind == "ring":
        q, k, y = q_loc, k_loc, None
    elif m.kind == "local":
        q, k, y = q_loc, k_all, torch.arange(b, device=dev) + r * b
    else:
        q, k, y = q_all, k_all, None

    s64 = torch.tensor(CHECK_SCALE, dtype=torch.float64, device=dev, requires_grad=True)
    if m.kind == "ring":
        qd = q_all.double().requires_grad_()
        kd = k_all.double().requires_grad_()
        per = infcl.naive_loss(qd, kd, s64, symmetric=True, reduction="none")
        (per.sum() / b).backward()  # the sum over ranks of the local means
        rows = slice(r * b, (r + 1) * b)
        t_loss, t_dq, t_dk = per[rows].mean(), qd.grad[rows], kd.grad[rows]
    else:
        qd = q.double().requires_grad_()
        kd = k.double().requires_grad_()
        t_loss = infcl.naive_loss(qd, kd, s64, labels=y, symmetric=y is None)
        t_loss.backward()
        t_dq, t_dk = qd.grad, kd.grad
    t_ds = s64.grad

    qm = q.detach().clone().requires_grad_()
    km = k.detach().clone().requires_grad_()
    sm = torch.tensor(CHECK_SCALE, dtype=torch.float32, device=dev, requires_grad=True)
    loss = m.fn(qm, km, sm, y, ctx)
    loss.backward()
    ds = sm.grad.detach().double().clone()
    e_ds_own = rel(ds, t_ds)
    if m.kind == "ring":
        dist.all_reduce(ds)  # the shares add up to the total
    errs = [rel(loss, t_loss), rel(qm.grad, t_dq), rel(km.grad, t_dk), rel(ds, t_ds), e_ds_own]
    errs = [e if math.isfinite(e) else 1e30 for e in errs]
    names = ["err_loss", "err_dq", "err_dk", "err_dscale", "err_dscale_allreduced"]
    out = dict(zip(names, max_over_ranks(ctx, errs), strict=True))
    if not m.name.startswith("inf_cl"):  # only inf_cl keeps the total on every rank
        del out["err_dscale_allreduced"]
    return out


def check_passes(m: Method, errs: dict[str, float]) -> bool:
    gate = ["err_loss", "err_dq", "err_dk"]
    # inf_cl all-reduces the scale's gradient (defect 2): judge it by its own convention
    gate.append("err_dscale_allreduced" if m.name.startswith("inf_cl") else "err_dscale")
    return all(errs[g] <= TOL[m.dtype] for g in gate)


# ----------------------------------------------------------------------------- timing


def measure(m: Method, ctx: Ctx, b_global: int, d: int, n_timed: int) -> dict:
    """status ('ok', 'oom', 'error'), ms quantiles and peak GiB (max over ranks), inputs GiB."""
    inp: dict = {}  # the step's tensors; cleared to free them

    def release() -> None:
        inp.clear()
        free_memory(ctx)

    ok = True
    try:
        q, k, y = method_inputs(m, ctx, b_global, d, seed=b_global * 7919)
        inp.update(q=q.requires_grad_(), k=k.requires_grad_(), y=y,
                   s=torch.tensor(SCALE, dtype=torch.float32, device=ctx.dev,
                                  requires_grad=True))
        del q, k, y
    except torch.OutOfMemoryError:
        ok = False
    if not agree(ctx, ok):
        release()
        return dict(status="oom")
    res: dict = dict(status="ok", inputs_gib=sum(
        inp[n].numel() * inp[n].element_size() for n in ("q", "k")) / 2**30)

    def drop_grads() -> None:
        for n in ("q", "k", "s"):
            inp[n].grad = None

    def step() -> None:
        drop_grads()
        m.fn(inp["q"], inp["k"], inp["s"], inp["y"], ctx).backward()

    def attempt(n: int) -> list[float]:
        out = []
        for _ in range(n):
            line_up(ctx)
            if ctx.cuda:
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

    times: list[float] = []
    base = 0
    for phase in ("warm", "timed"):
        status = "ok"
        try:
            if phase == "warm":
                attempt(1)
                drop_grads()
                free_memory(ctx)
                if ctx.cuda:
                    base = torch.cuda.memory_allocated(ctx.dev)
                    torch.cuda.reset_peak_memory_stats(ctx.dev)
            else:
                times = attempt(n_timed)
        except torch.OutOfMemoryError:
            status = "oom"
        except Exception as e:  # a baseline that breaks is reported, not fatal
            status = "error"
            print(f"[rank {ctx.rank}] {m.name} B={b_global} raised {type(e).__name__}: {e}",
                  flush=True)
        if not agree(ctx, status == "ok"):
            # every rank reports the worst: an error anywhere beats an oom
            worst = max_over_ranks(ctx, [1.0 if status == "error" else 0.0])[0]
            release()
            return dict(status="error" if worst > 0 else "oom")
    peak = float("nan")
    if ctx.cuda:
        peak = (torch.cuda.max_memory_allocated(ctx.dev) - base) / 2**30
    qs = [quantile(times, p) for p in (0.2, 0.5, 0.8)]
    p20, p50, p80, peak = max_over_ranks(ctx, qs + [peak])
    res.update(p20=p20, p50=p50, p80=p80, peak_gib=peak)
    release()
    return res


def matmul_tflops(ctx: Ctx) -> float:
    n = 8192
    a = torch.randn(n, n, device=ctx.dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=ctx.dev, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync(ctx)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--sizes", type=int, nargs="+",
                    default=[32768, 65536, 131072, 262144, 524288],
                    help="global batches for every method (the issue's goals: 131072..524288)")
    ap.add_argument("--extra-sizes", type=int, nargs="*", default=[1048576],
                    help="larger global batches for infcl_inf (and its references) only")
    ap.add_argument("--d", "--dim", dest="d", type=int, default=512,
                    help="feature size (spell it --dim under torchrun: recent torchrun reads --d "
                    "as an ambiguous abbreviation of its own options)")
    ap.add_argument("--torch-ring-b", type=int, nargs="*", default=[131072],
                    help="global batches at which infcl_ring (torch tiles, slow) runs")
    ap.add_argument("--inf-cl-max", type=int, default=131072,
                    help="largest global batch for inf_cl 1.2.1 (about 30x slower)")
    ap.add_argument("--check-b", type=int, default=4096)
    ap.add_argument("--check-d", type=int, default=300)
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="skip a measurement predicted to end after this many seconds")
    ap.add_argument("--pg-timeout-s", type=float, default=300.0,
                    help="collective timeout: a hung rank ends the run instead of the budget")
    ap.add_argument("--only", nargs="*", default=None, help="run only these methods")
    args = ap.parse_args()

    # NVLink SHARP multicast stays off on these hosts; NCCL reads it when the group starts
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev,
                                timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout_s))
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines are plain fp32
    solo, _ = dist.new_subgroups(group_size=1)
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), dev, cuda, solo)
    w, lead = ctx.world, ctx.rank == 0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_ring.csv")
    card = torch.cuda.get_device_name(dev) if cuda else "cpu"
    meta = dict(card=card, torch=torch.__version__, triton=TRITON_VERSION, commit=commit(),
                date=datetime.date.today().isoformat())
    rows: list[dict] = []

    def say(msg: str) -> None:
        if lead:
            print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)

    def rec(impl, metric, b, dtype, value, p20="", p80="", d=None):
        rows.append(dict(impl=impl, metric=metric, B=b, D=args.d if d is None else d,
                         dtype=dname(dtype), world=w, value=value, p20=p20,
                         p50=value, p80=p80, **meta))
        if lead:
            with open(path, "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=FIELDS)
                wr.writeheader()
                wr.writerows(rows)

    say(f"world {w}, {card}, torch {torch.__version__}, triton {TRITON_VERSION}, "
        f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}, commit {meta['commit']}")
    if cuda:
        tf = max_over_ranks(ctx, [-matmul_tflops(ctx)])[0]  # min over ranks
        rec("matmul", "tflops", 8192, torch.bfloat16, -tf)
        say(f"bf16 matmul 8192^3: {-tf:.0f} TFLOP/s (slowest rank)")

    methods = dict(METHODS)
    if not cuda or cal_inf_loss is None:
        why = INF_CL_ERROR or "needs CUDA"
        say(f"inf_cl 1.2.1 unavailable: {why}")
        rec("inf_cl_1.2.1", "unavailable", 0, torch.float32, float("nan"))
        methods.pop("inf_cl_1.2.1")
    if args.only is not None:
        methods = {n: m for n, m in methods.items() if n in args.only}

    # ---- correctness first
    passed: set[str] = set()
    for name, m in methods.items():
        d = m.check_d or args.check_d
        try:
            errs = check(m, ctx, args.check_b, d)
        except Exception as e:
            print(f"[rank {ctx.rank}] check {name} raised {type(e).__name__}: {e}", flush=True)
            rec(name, "check_failed", args.check_b, m.dtype, float("nan"), d=d)
            continue
        for metric, v in errs.items():
            rec(name, metric, args.check_b, m.dtype, v, d=d)
        ok = check_passes(m, errs)
        say(f"check {name:18s} {dname(m.dtype):8s} B={args.check_b} D={d}: "
            + " ".join(f"{k[4:]}={v:.1e}" for k, v in errs.items())
            + ("  ok" if ok else f"  FAILED (tol {TOL[m.dtype]:.0e}): NOT TIMED"))
        if ok:
            passed.add(name)
        else:
            rec(name, "check_failed", args.check_b, m.dtype, 1.0, d=d)
    free_memory(ctx)

    # ---- the plan, most important first
    plan: list[tuple[str, int]] = []
    for b in args.sizes:
        plan.append(("infcl_inf", b))
        plan += [(REF_LOCAL, b), (REF_GLOBAL, b)]
        if b in args.torch_ring_b:
            plan.append(("infcl_ring", b))
        if b <= args.inf_cl_max:
            plan.append(("inf_cl_1.2.1", b))
        plan += [("allgather_bf16", b), ("allgather_fp32", b)]
    plan += [("infcl_inf", b) for b in args.extra_sizes]
    plan += [(ref, b) for b in args.extra_sizes for ref in (REF_LOCAL, REF_GLOBAL)]

    done: dict[str, list[tuple[int, float]]] = {}
    too_big: dict[str, int] = {}  # method -> smallest B that ran out of memory
    for name, b in plan:
        if name not in passed:
            continue
        m = methods[name]
        if b % w:
            say(f"skip {name} B={b}: not divisible by world {w}")
            continue
        bl = b // w
        if name in too_big and b > too_big[name]:
            est = float("nan")
            if name.startswith("allgather"):
                est = allgather_peak_bytes(bl, b, args.d, m.dtype.itemsize) / 2**30
            rec(name, "oom_predicted", b, m.dtype, est)
            say(f"{name} B={b}: oom (out of memory at B={too_big[name]} already)")
            continue
        if name.startswith("allgather"):
            need = allgather_peak_bytes(bl, b, args.d, m.dtype.itemsize)
            free = free_memory(ctx)
            if not agree(ctx, need <= free):
                rec(name, "oom_predicted", b, m.dtype, need / 2**30)
                too_big[name] = b
                say(f"{name} B={b}: predicted {need / 2**30:.1f} GiB > free "
                    f"{free / 2**30:.1f} GiB: oom_predicted, not run")
                continue
        n = timed_steps(b, m.slow)
        est = predicted_seconds(done.get(name, []), b, n + 1)
        elapsed = time.time() - T0
        late = elapsed > args.budget_s or (est is not None and elapsed + est > args.budget_s)
        if not agree(ctx, not late):
            rec(name, "skipped_budget", b, m.dtype, est if est is not None else float("nan"))
            say(f"skip {name} B={b}: predicted {est or float('nan'):.0f} s would pass the "
                f"budget of {args.budget_s:.0f} s")
            continue
        say(f"run {name} {dname(m.dtype)} B={b} (b={bl}/rank), 1 warm-up + {n} timed")
        res = measure(m, ctx, b, args.d, n)
        if res["status"] != "ok":
            rec(name, res["status"], b, m.dtype, float("nan"))
            say(f"{name} B={b}: {res['status']}")
            if res["status"] == "oom":
                too_big[name] = b
            continue
        done.setdefault(name, []).append((b, res["p50"]))
        rec(name, "ms", b, m.dtype, res["p50"], res["p20"], res["p80"])
        rec(name, "peak_gib", b, m.dtype, res["peak_gib"])
        rec(name, "inputs_gib", b, m.dtype, res["inputs_gib"])
        rec(name, "peak_over_inputs", b, m.dtype, res["peak_gib"] / res["inputs_gib"])
        if m.kind == "ring":
            rec(name, "tflops_floor_per_gpu", b, m.dtype,
                8 * b * b * args.d / w / (res["p50"] / 1e3) / 1e12)
        say(f"{name} B={b}: {res['p50']:.1f} ms (p20 {res['p20']:.1f}, p80 {res['p80']:.1f}), "
            f"peak {res['peak_gib']:.2f} GiB above inputs of {res['inputs_gib']:.2f} GiB")
        # scaling efficiency once the ring time and a reference exist at this B
        ring = dict(done.get("infcl_inf", []))
        if b in ring and name in (REF_LOCAL, REF_GLOBAL):
            if name == REF_LOCAL:
                metric, eff = "eff_vs_" + REF_LOCAL, res["p50"] / ring[b]
            else:
                metric, eff = "eff_vs_" + REF_GLOBAL + "_div_W", res["p50"] / w / ring[b]
            rec("infcl_inf", metric, b, torch.bfloat16, eff)
            say(f"infcl_inf B={b}: {metric} = {eff:.3f}")

    if lead:
        print(f"\nwrote {path}  ({card} x{w}, torch {torch.__version__}, triton "
              f"{TRITON_VERSION}, {time.time() - T0:.0f} s)")
        print("cells: p50 ms / peak GiB above inputs per rank (max over ranks); oom* = predicted")
        for line in table(rows, sorted(set(args.sizes) | set(args.extra_sizes))):
            print(line)
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
