"""Multi-GPU benchmark: the ring (`infcl.inf_loss`, `infcl.ring_loss`) against inf_cl 1.2.1's ring
and open_clip's all-gather `ClipLoss`, plus single-GPU references for the scaling efficiency.

Launch (one process per GPU, NCCL; `NCCL_NVLS_ENABLE=0` is set unless already given):

    torchrun --nproc-per-node W benchmarks/bench_ring.py --out DIR [--sizes ...] [--dim 512]

Without CUDA it runs on gloo/CPU (a dry run of the harness: use small `--sizes`, e.g.
`torchrun --nproc-per-node 2 benchmarks/bench_ring.py --sizes 256 --extra-sizes --check-b 64
--check-d 16 --dim 32 --out /tmp/r`).

Every method computes the symmetric CLIP loss on the GLOBAL batch of B pairs, split evenly over the
W ranks (b = B // W rows of q and of k per rank, bf16 unless the method says otherwise, unit-norm
random rows, scale 20 as a tensor that requires grad), forward + backward per step. infcl's
losses are distributed only when given a group (`group=None` is this device alone), so the ring
methods pass `group=torch.distributed.group.WORLD`:

* `infcl_inf`   `infcl.inf_loss(q, k, s, symmetric=True, group=WORLD)`: Triton tiles per ring step.
* `infcl_ring`  `infcl.ring_loss(q, k, s, symmetric=True, group=WORLD)`: torch tiles per ring step.
* `inf_cl_1.2.1` `(cal_inf_loss(q, k, y, s) + cal_inf_loss(k, q, y, s)) / 2`, y = local arange
  (its labels index the local key shard); fp32 inputs only (it upcasts anyway), B <= --inf-cl-max.
* `allgather_bf16` / `allgather_fp32`: `open_clip.loss.ClipLoss(local_loss=True,
  gather_with_grad=True, rank=r, world_size=W)`: features all-gathered WITH gradient, logits of
  the local rows against all gathered columns and of the local columns against all gathered
  rows. bf16: inputs bf16 under `torch.autocast(bf16)` (bf16 logits, cross-entropy in fp32, as a
  user gets); fp32: plain fp32 (no TF32). O(b * B) memory: 'oom' when it fails.

Single-GPU references for the scaling efficiency (issue 4: single-GPU time for the same per-GPU
work / ring time). Each runs on every rank at once, each rank alone (`group=None`), and like
everything else reports the max over ranks:

* `ref1gpu_local_1dir`  `inf_loss(q_local[b], k_all[B], s, labels=arange(b) + rank * b)`: the
  q->k direction of this rank's rows against all B columns, NOT symmetric (the symmetric ring
  also builds the column statistics, so it does somewhat more work than this reference).
  Efficiency row: `eff_vs_ref1gpu_local_1dir` = ref ms / ring ms.
* `ref1gpu_global_sym`  `inf_loss(q[B], k[B], s, symmetric=True)`: the whole symmetric loss on one
  GPU; its `ms` is the raw single-GPU time. Efficiency row: `eff_vs_ref1gpu_global_sym_div_W` =
  (ref ms / W) / ring ms.

Correctness comes first: at B = --check-b (D = --check-d; inf_cl at D = 512 where it is defined)
every method's loss and gradients on every rank are judged by `helpers.judge` (tests/helpers.py,
through the harness: `err <= 2 * err(naive_loss in the same dtype) + FLOOR`) against float64
`naive_loss` on the gathered batch, under the DDP convention of `infcl.ring_loss`: each rank
returns its local mean, and dq, dk, dscale are its share of the gradient of the SUM over ranks
of the returned losses (`err_dscale` judges the sum over ranks of the dscale shares against the
total). inf_cl all-reduces the scale's gradient (ANCHORS.md defect 2), so every rank holds the
total: its `err_dscale` judges that total, and `err_dscale_shares_summed` (about W - 1) records
what the DDP convention makes of it. The single-GPU references are judged as `bench_loss.py`
judges a loss. `naive_same_dtype/<method>` rows hold naive's own errors. A method whose verdict
fails on any rank is not timed (`check_failed`).

Timing: one warm-up step, then N timed steps (20 up to B = 65536, 10 up to 131072, 5 up to
262144, 3 above; 3 for the slow infcl_ring and inf_cl), each after a barrier, timed with CUDA
events (`harness.bench_collective`: do_bench's per-process repeat count would deadlock the ring);
`p20/p50/p80` are per-rank quantiles, maxed over ranks. Memory: `peak_gib` is the max over ranks
of the peak allocated during the timed steps above what was allocated before them (the inputs;
the input gradients count). `inputs_gib` is the bytes of this method's q and k on one rank,
`peak_over_inputs` their ratio. A run whose predicted time would pass --budget-s (from the same
method at a smaller B, scaled by B^2) is skipped (`skipped_budget`, value = predicted seconds).
The all-gather baselines are first checked against free memory (16 bytes per logit of the b x B
blocks: `oom_predicted`, value = predicted GiB); a caught torch.OutOfMemoryError gives `oom`.

Output: long-format `bench_ring.csv` in --out (`harness.FIELDS`, rewritten after every record,
so a run cut short keeps what it measured). Metrics: ms, peak_gib, inputs_gib, peak_over_inputs,
tflops_floor_per_gpu (8 B^2 D / W FLOP per GPU per step), eff_vs_*, err_* (check),
check_failed, oom, oom_predicted, skipped_budget, error, unavailable; matmul/tflops (bf16
8192^3, min over ranks). A table (rows = method and dtype, columns = B, cells ms/GiB) is
printed last.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import harness
import torch
import torch.distributed as dist
from harness import helpers
from torch import Tensor

import infcl

try:
    from open_clip.loss import ClipLoss
except ImportError:  # the baseline is optional
    ClipLoss = None
try:
    from inf_cl import cal_inf_loss

    INF_CL_ERROR = ""
except ImportError as e:  # the baseline is optional
    cal_inf_loss = None
    INF_CL_ERROR = f"{type(e).__name__}: {e}"

T0 = time.time()
# open_clip still calls torch.distributed.nn.functional.all_gather
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
SCALE = 20.0  # timing
CHECK_SCALE = 30.0  # correctness check (as bench_loss.py)
REF_LOCAL, REF_GLOBAL = "ref1gpu_local_1dir", "ref1gpu_global_sym"
ERRS = ("loss", "dq", "dk", "dscale")


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


# ----------------------------------------------------------------------------- the methods


@dataclass
class Ctx:
    rank: int
    world: int
    dev: torch.device
    cuda: bool
    group: dist.ProcessGroup  # the ring's group: every rank


def m_infcl_inf(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, symmetric=True, group=ctx.group)


def m_infcl_ring(q, k, s, y, ctx):
    return infcl.ring_loss(q, k, s, symmetric=True, group=ctx.group)


def m_inf_cl(q, k, s, y, ctx):
    lab = torch.arange(q.shape[0], device=q.device)  # local indices: inf_cl's convention
    return 0.5 * (cal_inf_loss(q, k, lab, scale=s) + cal_inf_loss(k, q, lab, scale=s))


def open_clip_allgather(ctx: Ctx):
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=ctx.rank, world_size=ctx.world)


def m_allgather_bf16(q, k, s, y, ctx):
    with torch.autocast(ctx.dev.type, dtype=torch.bfloat16):
        return open_clip_allgather(ctx)(q, k, s)


def m_allgather_fp32(q, k, s, y, ctx):
    return open_clip_allgather(ctx)(q, k, s)


def m_ref_local(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, labels=y, group=None)


def m_ref_global(q, k, s, y, ctx):
    return infcl.inf_loss(q, k, s, symmetric=True, group=None)


@dataclass
class Method:
    name: str
    dtype: torch.dtype
    kind: str  # "ring": shards + DDP convention; "local"/"global": single-GPU references
    fn: Callable
    slow: bool = False
    check_d: int | None = None  # D of the correctness check (None: --check-d)
    tf32: bool = False  # float32 products in TF32: judged with helpers.FLOOR["tf32"]
    dscale_allreduced: bool = False  # every rank already holds the total dscale (inf_cl)


METHODS = {
    "infcl_inf": Method("infcl_inf", torch.bfloat16, "ring", m_infcl_inf),
    "infcl_ring": Method("infcl_ring", torch.bfloat16, "ring", m_infcl_ring, slow=True),
    "inf_cl_1.2.1": Method("inf_cl_1.2.1", torch.float32, "ring", m_inf_cl, slow=True,
                           check_d=512, tf32=True, dscale_allreduced=True),
    "allgather_bf16": Method("allgather_bf16", torch.bfloat16, "ring", m_allgather_bf16),
    "allgather_fp32": Method("allgather_fp32", torch.float32, "ring", m_allgather_fp32),
    REF_LOCAL: Method(REF_LOCAL, torch.bfloat16, "local", m_ref_local),
    REF_GLOBAL: Method(REF_GLOBAL, torch.bfloat16, "global", m_ref_global),
}


# ----------------------------------------------------------------------------- collectives


def line_up(ctx: Ctx) -> None:
    harness.sync(ctx.dev)
    dist.barrier()
    harness.sync(ctx.dev)


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


def gather_rows(ctx: Ctx, x: Tensor) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def method_inputs(m: Method, ctx: Ctx, b_global: int, d: int, seed: int):
    """(q, k, labels) of one rank for method m at global batch b_global."""
    w, r, dev, dt = ctx.world, ctx.rank, ctx.dev, m.dtype
    b = b_global // w
    if m.kind == "ring":
        return (harness.unit_rows(b, d, dt, seed + 2 * r, dev),
                harness.unit_rows(b, d, dt, seed + 2 * r + 1, dev), None)
    k_all = harness.unit_rows(b_global, d, dt, seed - 1, dev)
    if m.kind == "local":
        y = torch.arange(b, device=dev) + r * b
        return harness.unit_rows(b, d, dt, seed + 2 * r, dev), k_all, y
    return harness.unit_rows(b_global, d, dt, seed - 2, dev), k_all, None


# ----------------------------------------------------------------------------- check


def ring_reference(q_all: Tensor, k_all: Tensor, scale: Tensor, rank: int, b: int,
                   dtype: torch.dtype) -> helpers.Result:
    """naive_loss in `dtype` on the gathered batch, in the ring's DDP convention: this rank's
    mean, the dq and dk of its rows and columns in the gradient of the sum over ranks of the
    local means, and the whole dscale."""
    q = q_all.detach().to(dtype).requires_grad_()
    k = k_all.detach().to(dtype).requires_grad_()
    s = scale.detach().to(torch.float64 if dtype == torch.float64 else scale.dtype)
    s.requires_grad_()
    per = infcl.naive_loss(q, k, s, symmetric=True, reduction="none")
    (per.sum() / b).backward()
    rows = slice(rank * b, (rank + 1) * b)
    return helpers.Result(per[rows].mean().detach(), q.grad[rows], k.grad[rows], s.grad)


def check(m: Method, ctx: Ctx, b_global: int, d: int) -> tuple[bool, dict[str, float]]:
    """(this rank's verdict, errors by metric name) of method m against float64 naive_loss."""
    w, r, dev = ctx.world, ctx.rank, ctx.dev
    b = b_global // w
    q_loc = harness.unit_rows(b, d, m.dtype, 1000 + 2 * r, dev)
    k_loc = harness.unit_rows(b, d, m.dtype, 1001 + 2 * r, dev)
    q_all, k_all = gather_rows(ctx, q_loc), gather_rows(ctx, k_loc)
    s = torch.tensor(CHECK_SCALE, dtype=torch.float32, device=dev)
    extra: dict[str, float] = {}
    if m.kind == "local":
        y = torch.arange(b, device=dev) + r * b
        verdict = harness.gate(lambda q, k, s: m.fn(q, k, s, y, ctx), q_loc, k_all, s,
                               tf32=m.tf32, labels=y)
    elif m.kind == "global":
        verdict = harness.gate(lambda q, k, s: m.fn(q, k, s, None, ctx), q_all, k_all, s,
                               tf32=m.tf32, symmetric=True)
    else:
        truth = ring_reference(q_all, k_all, s, r, b, torch.float64)
        ref = ring_reference(q_all, k_all, s, r, b, m.dtype)
        got = helpers.run(lambda q, k, s: m.fn(q, k, s, None, ctx), q_loc, k_loc, s)
        ds = got.dscale.detach().double().clone()
        summed = ds.clone()
        dist.all_reduce(summed)  # the DDP convention: the shares add up to the total
        if m.dscale_allreduced:
            extra["err_dscale_shares_summed"] = helpers.rel_err(summed, truth.dscale)
        else:
            ds = summed
        verdict = helpers.judge(got._replace(dscale=ds), ref, truth, dtype=m.dtype,
                                floor=harness.floor(m.dtype, m.tf32))
    errs = {}
    for name in ERRS:
        e_impl, e_ref = verdict.errors.get(name, (math.inf, math.inf))
        errs[f"err_{name}"], errs[f"ref_err_{name}"] = e_impl, e_ref
    if not verdict.ok:
        print(f"[rank {r}] {m.name} off the spec in {verdict.failed}:\n  "
              + "\n  ".join(verdict.lines), flush=True)
    errs |= extra
    values = max_over_ranks(ctx, [e if math.isfinite(e) else 1e30 for e in errs.values()])
    return agree(ctx, verdict.ok), dict(zip(errs, values, strict=True))


# ----------------------------------------------------------------------------- timing


def measure(m: Method, ctx: Ctx, b_global: int, d: int, n_timed: int) -> dict:
    """status ('ok', 'oom', 'error'), ms quantiles and peak GiB (max over ranks), inputs GiB."""
    inp: dict = {}  # the step's tensors; cleared to free them

    def release() -> None:
        inp.clear()
        harness.free_memory(ctx.dev)

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
        inp[n].numel() * inp[n].element_size() for n in ("q", "k")) / harness.GIB)

    def drop_grads() -> None:
        for n in ("q", "k", "s"):
            inp[n].grad = None

    def step() -> None:
        drop_grads()
        m.fn(inp["q"], inp["k"], inp["s"], inp["y"], ctx).backward()

    times: list[float] = []
    peak = [math.nan]
    for phase in ("warm", "timed"):
        status = "ok"
        try:
            if phase == "warm":
                harness.bench_collective(step, ctx.dev, 1, lambda: line_up(ctx))
                drop_grads()
            else:
                with harness.peak_above(ctx.dev) as peak:
                    times = harness.bench_collective(step, ctx.dev, n_timed,
                                                     lambda: line_up(ctx))
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
    p20, p50, p80, peak_gib = max_over_ranks(ctx, [*harness.quantiles(times), peak[0]])
    res.update(p20=p20, p50=p50, p80=p80, peak_gib=peak_gib)
    release()
    return res


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
    timeout = datetime.timedelta(seconds=args.pg_timeout_s)
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev, timeout=timeout)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 baselines are plain fp32
    ctx = Ctx(dist.get_rank(), dist.get_world_size(), dev, cuda, dist.group.WORLD)
    w, lead = ctx.world, ctx.rank == 0
    out = harness.Csv(os.path.join(args.out, "bench_ring.csv"), dev, world=w, write=lead)

    def say(msg: str) -> None:
        if lead:
            print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)

    def rec(impl, metric, b, dtype, value, p20="", p80="", d=None):
        out.add(impl, metric, b, args.d if d is None else d, dtype, value, p20, p80)

    say(f"world {w}, {out.meta['card']}, torch {torch.__version__}, triton "
        f"{harness.TRITON_VERSION}, NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}, "
        f"commit {out.meta['commit']}")
    if cuda:
        tf = -max_over_ranks(ctx, [-harness.matmul_tflops(torch.bfloat16, dev)])[0]
        rec("matmul", "tflops", 8192, torch.bfloat16, tf)
        say(f"bf16 matmul 8192^3: {tf:.0f} TFLOP/s (slowest rank)")

    methods = dict(METHODS)
    if not cuda or cal_inf_loss is None:
        why = INF_CL_ERROR or "needs CUDA"
        say(f"inf_cl 1.2.1 unavailable: {why}")
        rec("inf_cl_1.2.1", "unavailable", 0, torch.float32, float("nan"))
        methods.pop("inf_cl_1.2.1")
    if ClipLoss is None:
        say("open_clip unavailable: not installed (the all-gather baselines need it)")
        for name in ("allgather_bf16", "allgather_fp32"):
            rec(name, "unavailable", 0, methods.pop(name).dtype, float("nan"))
    if args.only is not None:
        methods = {n: m for n, m in methods.items() if n in args.only}

    # ---- correctness first
    passed: set[str] = set()
    for name, m in methods.items():
        d = m.check_d or args.check_d
        try:
            ok, errs = check(m, ctx, args.check_b, d)
        except Exception as e:
            print(f"[rank {ctx.rank}] check {name} raised {type(e).__name__}: {e}", flush=True)
            rec(name, "check_failed", args.check_b, m.dtype, float("nan"), d=d)
            continue
        for metric, v in errs.items():
            if metric.startswith("ref_"):
                rec(f"naive_same_dtype/{name}", metric[4:], args.check_b, m.dtype, v, d=d)
            else:
                rec(name, metric, args.check_b, m.dtype, v, d=d)
        say(f"check {name:18s} {harness.dname(m.dtype):8s} B={args.check_b} D={d}: "
            + " ".join(f"{k[4:]}={v:.1e}" for k, v in errs.items() if k.startswith("err_"))
            + ("  ok" if ok else "  FAILED: NOT TIMED"))
        if ok:
            passed.add(name)
        else:
            rec(name, "check_failed", args.check_b, m.dtype, 1.0, d=d)
    harness.free_memory(dev)

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
                est = allgather_peak_bytes(bl, b, args.d, m.dtype.itemsize) / harness.GIB
            rec(name, "oom_predicted", b, m.dtype, est)
            say(f"{name} B={b}: oom (out of memory at B={too_big[name]} already)")
            continue
        if name.startswith("allgather"):
            need = allgather_peak_bytes(bl, b, args.d, m.dtype.itemsize)
            free = harness.free_memory(dev)
            if not agree(ctx, need <= free):
                rec(name, "oom_predicted", b, m.dtype, need / harness.GIB)
                too_big[name] = b
                say(f"{name} B={b}: predicted {need / harness.GIB:.1f} GiB > free "
                    f"{free / harness.GIB:.1f} GiB: oom_predicted, not run")
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
        say(f"run {name} {harness.dname(m.dtype)} B={b} (b={bl}/rank), 1 warm-up + {n} timed")
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
        sizes = sorted(set(args.sizes) | set(args.extra_sizes))
        print(f"\nwrote {out.path}  ({out.meta['card']} x{w}, torch {torch.__version__}, "
              f"triton {harness.TRITON_VERSION}, {time.time() - T0:.0f} s)")
        print("cells: p50 ms / peak GiB above inputs per rank (max over ranks); oom* = predicted")
        for line in harness.table(out.rows, sizes) + efficiency_lines(out.rows, sizes):
            print(line)
        sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def efficiency_lines(rows: list[dict], sizes: list[int]) -> list[str]:
    """One line per eff_vs_* metric of infcl_inf, by B."""
    out = []
    for metric in sorted({r["metric"] for r in rows if r["metric"].startswith("eff_vs_")}):
        vals = {int(r["B"]): float(r["value"]) for r in rows
                if r["metric"] == metric and r["impl"] == "infcl_inf"}
        label = metric.replace("eff_vs_ref1gpu_", "eff vs 1 GPU ").replace("_div_W", " / W")
        out.append(f"{label:32s} " + " ".join(
            f"{vals[b]:>15.3f}" if b in vals else f"{'-':>15s}" for b in sizes))
    return out


if __name__ == "__main__":
    main()
