"""Single-GPU benchmark: `infcl.inf_loss` against `infcl.naive_loss`, open_clip's `ClipLoss` and
inf_cl 1.2.1's `cal_inf_loss`.

Every method computes the CLIP loss of B unit-norm random pairs (D = --d, scale 20 as a tensor
that requires grad), symmetric unless it says otherwise; a step is forward + backward:

* `infcl_inf`       `infcl.inf_loss(q, k, s, symmetric=True)` (Triton tiles; bf16, fp16, fp32 in TF32)
* `infcl_inf_1dir`  `infcl.inf_loss(q, k, s)`: one direction
* `infcl_inf_ieee`  `infcl.inf_loss(q, k, s, symmetric=True, precision="ieee")`: fp32 products
* `infcl_chunked`   `infcl.chunked_loss(q, k, s, symmetric=True)` (torch tiles)
* `naive_loss`      `infcl.naive_loss(q, k, s, symmetric=True)`: the spec, B x B fp32 logits
* `naive_compiled`  `torch.compile(infcl.naive_loss)` of the same call (compiled once per size)
* `infcl_inf_graphed`, `naive_graphed`  the same two under `torch.compile(mode="reduce-overhead")`
  (CUDA graphs: no per-call host work)
* `open_clip`       `open_clip.loss.ClipLoss()(q, k, s)`: what a user writes without infcl, the
  B x B logits in the input dtype (runs before this harness called this `naive`)
* `infcl_sigmoid`   `infcl.inf_sigmoid_loss(q, k, s, BIAS)` (SigLIP; checked against the naive
  sigmoid loss), `sigmoid_compiled` `torch.compile(infcl.naive_sigmoid_loss)`, `open_clip_siglip`
  open_clip's `SigLipLoss()(q, k, s, BIAS)` on one GPU (the B x B logits in the input dtype)
* `inf_cl_1.2.1`    `(cal_inf_loss(q, k, y, scale=s) + cal_inf_loss(k, q, y, scale=s)) / 2`,
  y = arange(B); fp32 only (it upcasts anyway)

Correctness first: every method and dtype passes `harness.gate` at B=1000, D=300 (inf_cl at
B=1024, D=512, where it is defined) or is not timed. Timing: `harness.bench` (do_bench, p20 /
p50 / p80 in ms); memory: peak allocated above the inputs during one step (`peak_gib`).
FLOP rates: `tflops_floor` on the `8 B^2 D` floor of a fused symmetric loss, `tflops_exec` on
what infcl executes. Matmul rates (`matmul`/`tflops`, 8192^3) put them in context.

Writes `bench_loss.csv` in --out (the long format of `harness.FIELDS`), prints a table last.
Run: `python benchmarks/bench_loss.py --out DIR [--quick]`; a CPU dry run of the harness:
`python benchmarks/bench_loss.py --device cpu --sizes 256 --out /tmp/b`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import harness
import torch
from torch import Tensor

import infcl

try:
    from open_clip.loss import ClipLoss
except ImportError:  # the baseline is optional
    ClipLoss = None
try:
    from open_clip.loss import SigLipLoss
except ImportError:
    try:  # the device machines carry open_clip's loss file alone (benchmarks/README: wheels)
        from open_clip_loss import SigLipLoss
    except ImportError:
        SigLipLoss = None
try:
    from inf_cl import cal_inf_loss
except ImportError:  # the baseline is optional
    cal_inf_loss = None

BIAS = -10.0  # the sigmoid losses' bias (SigLIP's initial value)
SCALE = 20.0  # timing
CHECK_SCALE = 30.0  # correctness check
ALL = 1 << 62  # no batch limit


def infcl_inf(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.inf_loss(q, k, s, symmetric=True)


def infcl_inf_1dir(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.inf_loss(q, k, s)


def infcl_inf_ieee(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.inf_loss(q, k, s, symmetric=True, precision="ieee")


def infcl_chunked(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.chunked_loss(q, k, s, symmetric=True)


def naive(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.naive_loss(q, k, s, symmetric=True)


_compiled_naive = torch.compile(naive, dynamic=False)


def naive_compiled(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return _compiled_naive(q, k, s)


_graphed_inf = torch.compile(infcl_inf, mode="reduce-overhead", dynamic=False)
_graphed_naive = torch.compile(naive, mode="reduce-overhead", dynamic=False)


def infcl_inf_graphed(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return _graphed_inf(q, k, s)


def naive_graphed(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return _graphed_naive(q, k, s)


def infcl_sigmoid(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return infcl.inf_sigmoid_loss(q, k, s, BIAS)


def infcl_sigmoid_2pass(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    """The forward pass, then the backward's: what a per-row loss ("none") takes."""
    return infcl.inf_sigmoid_loss(q, k, s, BIAS, reduction="none").mean()


def naive_sigmoid(q: Tensor, k: Tensor, s: Tensor, **kw: object) -> Tensor:
    return infcl.naive_sigmoid_loss(q, k, s, BIAS)


_compiled_sigmoid = torch.compile(naive_sigmoid, dynamic=False)


def sigmoid_compiled(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return _compiled_sigmoid(q, k, s)


def open_clip_siglip(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return SigLipLoss()(q, k, s, torch.full((), BIAS, device=q.device))


def open_clip_loss(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    return ClipLoss()(q, k, s)


def inf_cl_loss(q: Tensor, k: Tensor, s: Tensor) -> Tensor:
    y = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (cal_inf_loss(q, k, y, scale=s) + cal_inf_loss(k, q, y, scale=s))


@dataclass(frozen=True)
class Method:
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    dtypes: dict[torch.dtype, int]  # dtype -> largest B timed
    symmetric: bool = True
    tf32: bool = False  # float32 products run in TF32: judged with helpers.FLOOR["tf32"]
    exec_flop: int | None = None  # FLOP executed per B^2 D (infcl, one sweep), for tflops_exec
    check: tuple[int, int] = (1000, 300)  # B, D of the correctness check
    sigmoid: bool = False  # a sigmoid loss: checked against the naive sigmoid loss


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
METHODS = {
    "infcl_inf": Method(infcl_inf, {BF16: ALL, FP16: 65536, FP32: ALL}, tf32=True, exec_flop=8),
    "infcl_inf_1dir": Method(infcl_inf_1dir, {BF16: 262144}, symmetric=False, exec_flop=8),
    "infcl_inf_ieee": Method(infcl_inf_ieee, {FP32: 65536}, exec_flop=8),
    "infcl_chunked": Method(infcl_chunked, {BF16: 65536}, exec_flop=8),
    "naive_loss": Method(naive, {BF16: 65536, FP32: 65536}),
    "infcl_sigmoid": Method(infcl_sigmoid, {BF16: ALL}, exec_flop=6, sigmoid=True),
    "infcl_sigmoid_2pass": Method(infcl_sigmoid_2pass, {BF16: 65536}, exec_flop=8, sigmoid=True),
    "sigmoid_compiled": Method(sigmoid_compiled, {BF16: 32768}, sigmoid=True),
    "open_clip_siglip": Method(open_clip_siglip, {BF16: 65536}, sigmoid=True),
    "naive_compiled": Method(naive_compiled, {BF16: 65536}),
    "infcl_inf_graphed": Method(infcl_inf_graphed, {BF16: 65536}, exec_flop=8),
    "naive_graphed": Method(naive_graphed, {BF16: 16384}),
    "open_clip": Method(open_clip_loss, {BF16: 65536, FP32: 65536}),
    # inf_cl needs D % 256 == 0 and misreads its LSE buffers when B % 64 != 0 (ANCHORS.md
    # defects 4 and 5): it is checked where it is defined. Its fp32 dots run in TF32.
    "inf_cl_1.2.1": Method(inf_cl_loss, {FP32: 65536}, tf32=True, check=(1024, 512)),
}


def single_process_group() -> None:
    """inf_cl 1.2.1 needs an initialised process group even on one GPU (ANCHORS.md defect 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)


def swept_twice(name: str, b: int, d: int) -> bool:
    """Whether an infcl Triton loss at B = b recomputes dS in a second backward sweep (its fp32
    key accumulator would pass `configs.ACC_BYTES_MAX`): 2 B^2 D more executed work."""
    from infcl.kernels import configs

    return name.startswith("infcl_") and name != "infcl_chunked" and (
        b > configs.BWD_BLOCK and b * d * 4 > configs.ACC_BYTES_MAX)


def time_point(fn, b: int, d: int, dtype: torch.dtype, device: torch.device, rep_ms: int):
    """((p20, p50, p80) ms, peak GiB above the inputs) of forward + backward at batch b."""
    q = harness.unit_rows(b, d, dtype, 2 * b, device).requires_grad_()
    k = harness.unit_rows(b, d, dtype, 2 * b + 1, device).requires_grad_()
    s = torch.tensor(SCALE, device=device, requires_grad=True)

    def step() -> None:
        q.grad = k.grad = s.grad = None
        fn(q, k, s).backward()

    step()  # warm-up and compile
    q.grad = k.grad = s.grad = None
    with harness.peak_above(device) as peak:
        step()
    if b >= 1 << 20:  # seconds a step: one timed step after the two above (do_bench runs ~9)
        harness.sync(device)
        t = time.perf_counter()
        step()
        harness.sync(device)
        ms = (time.perf_counter() - t) * 1e3
        return (ms, ms, ms), peak[0]
    return harness.bench(step, device, rep_ms), peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--quick", action="store_true", help="B = 8192 and 65536 only")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--methods", nargs="*", help="only these methods (default: all)")
    ap.add_argument("--sizes", nargs="*", type=int, help="batch sizes (default: 8192 .. 262144)")
    ap.add_argument("--no-big", action="store_true", help="skip the B = 2**20 point")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the harness")
    ap.add_argument("--dtypes", nargs="*", help="only these dtypes, e.g. bf16 fp32 (default: all)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    out = harness.Csv(os.path.join(args.out, "bench_loss.csv"), dev)

    def rec(impl, metric, b, dtype, value, p20="", p80="", d=args.d):
        out.add(impl, metric, b, d, dtype, value, p20, p80)
        print(f"{impl:16s} {metric:12s} B={b:<8} {harness.dname(dtype):9s} {value:.4g}", flush=True)

    torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 matmul rate is the TF32 one
    for dt in (BF16, FP32) if cuda else ():
        rec("matmul", "tflops", 8192, dt, harness.matmul_tflops(dt, dev))
    torch.backends.cuda.matmul.allow_tf32 = False  # torch fp32 baselines are plain fp32
    torch._dynamo.config.recompile_limit = 64  # one compile per size and dtype, never eager fallback

    methods = dict(METHODS)
    missing = {"open_clip": "" if ClipLoss is not None else "open_clip is not installed",
               "open_clip_siglip": "" if SigLipLoss is not None else "open_clip is not installed",
               "inf_cl_1.2.1": "inf_cl is not installed" if cal_inf_loss is None else
               "" if cuda else "inf_cl needs CUDA"}
    for name, why in missing.items():
        if why:
            print(f"{name} unavailable: {why}")
            rec(name, "unavailable", 0, next(iter(methods[name].dtypes)), float("nan"))
            methods.pop(name)
    if args.methods:
        methods = {n: m for n, m in methods.items() if n in args.methods}
    if args.dtypes:
        methods = {n: Method(**{**m.__dict__, "dtypes": {
            dt: most for dt, most in m.dtypes.items() if harness.dname(dt) in args.dtypes}})
            for n, m in methods.items()}
    if "inf_cl_1.2.1" in methods:
        single_process_group()

    passed = set()
    for name, m in methods.items():
        for dt in m.dtypes:
            cb, cd = m.check
            q = harness.unit_rows(cb, cd, dt, 1, dev)
            k = harness.unit_rows(cb, cd, dt, 2, dev)
            s = torch.tensor(CHECK_SCALE, device=dev)
            try:
                spec = dict(ref_fn=naive_sigmoid) if m.sigmoid else dict(symmetric=m.symmetric)
                verdict = harness.gate(m.fn, q, k, s, tf32=m.tf32, **spec)
            except Exception as e:  # a baseline that cannot run is reported, not fatal
                print(f"check {name} {dt} raised {type(e).__name__}: {e}")
                rec(name, "check_failed", cb, dt, float("nan"), d=cd)
                continue
            for metric, (e_impl, e_ref) in verdict.errors.items():
                rec(name, f"err_{metric}", cb, dt, e_impl, d=cd)
                rec(f"naive_same_dtype/{name}", f"err_{metric}", cb, dt, e_ref, d=cd)
            if verdict.ok:
                passed.add((name, dt))
            else:
                rec(name, "check_failed", cb, dt, 1.0, d=cd)
                print(f"NOT TIMED: {name} {dt} is off the spec in {verdict.failed}:\n  "
                      + "\n  ".join(verdict.lines))

    sizes = args.sizes or ([8192, 65536] if args.quick else [8192, 32768, 65536, 131072, 262144])
    points = [(b, name, dt) for b in sizes for name, m in methods.items()
              for dt, most in m.dtypes.items() if b <= most]
    for big in ("infcl_inf", "infcl_sigmoid"):
        if cuda and not (args.quick or args.no_big) and big in methods:
            points.append((1 << 20, big, BF16))
    for b, name, dt in points:
        if (name, dt) not in passed:
            continue
        m = methods[name]
        try:
            (p20, p50, p80), peak = time_point(m.fn, b, args.d, dt, dev, 200 if b <= 65536 else 1)
        except torch.OutOfMemoryError:
            rec(name, "oom", b, dt, float("nan"))
            harness.free_memory(dev)
            continue
        harness.free_memory(dev)
        rec(name, "ms", b, dt, p50, p20, p80)
        rec(name, "peak_gib", b, dt, peak)
        rec(name, "tflops_floor", b, dt, 8 * b * b * args.d / p50 / 1e9)
        if m.exec_flop:
            flop = m.exec_flop + (2 if swept_twice(name, b, args.d) else 0)
            rec(name, "tflops_exec", b, dt, flop * b * b * args.d / p50 / 1e9)

    print(f"\nwrote {out.path}  ({out.meta['card']}, torch {torch.__version__}, "
          f"triton {harness.TRITON_VERSION}); cells: p50 ms / peak GiB above the inputs")
    for line in harness.table(out.rows, sorted({b for b, _, _ in points})):
        print(line)


if __name__ == "__main__":
    main()
