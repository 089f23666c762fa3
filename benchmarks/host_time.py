"""Where the host time of a small-B step goes: each piece of a loss call timed alone.

Run on the GPU: `python benchmarks/host_time.py [--b 256] [--d 64]`. At such sizes the GPU work
is a few microseconds, so a step's wall time (many steps, one synchronize at the end) is the
host's. Prints microseconds per call of: whole steps (forward + backward) of each loss and of
the naive baselines, the forward alone, the losses' bodies without the front door's checks, the
checks alone, and the primitives a call is made of (a custom op with autograd, a Triton launch,
small torch ops). `--profile` adds the Python functions by own time (cProfile) of one loss.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable

import harness
import torch
import triton
import triton.language as tl

import infcl
from infcl import _spec, ops


@triton.jit
def _nop_kernel(x_ptr, a, b, c, d, e, f, g, h, i, j, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    """A launch with a dozen arguments that does (almost) nothing."""
    if FLAG:
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], dtype=tl.float32))


@torch.library.custom_op("infcl_bench::nop", mutates_args=())
def _nop_op(x: torch.Tensor, y: torch.Tensor, n: int, flag: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(y)


@_nop_op.register_fake
def _nop_fake(x, y, n, flag):
    return torch.empty_like(x), torch.empty_like(y)


_nop_op.register_autograd(lambda ctx, a, b: (a, b, None, None),
                          setup_context=lambda ctx, inputs, output: None)


class _NopFunction(torch.autograd.Function):
    """A plain autograd.Function, for the cost of one against a custom op's autograd."""

    @staticmethod
    def forward(ctx, x, y):
        return torch.empty_like(x), torch.empty_like(y)

    @staticmethod
    def backward(ctx, a, b):
        return a, b


def phases_us(fn: Callable[[], torch.Tensor], device: torch.device, n: int = 300) -> tuple[float, float]:
    """Host microseconds of the forward and of the backward of a step, each timed on its own
    (no synchronisation between them: at small B the GPU keeps up, the host is the cost)."""
    fwd = bwd = 0.0
    for i in range(n + 20):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        if i >= 20:
            fwd, bwd = fwd + t1 - t0, bwd + t2 - t1
    harness.sync(device)
    return fwd / n * 1e6, bwd / n * 1e6


def pieces(q, k, s, dev) -> list[tuple[str, float]]:
    """The inside of the Triton path's calls, one layer at a time (CUDA only)."""
    from infcl.kernels import lse_bwd, lse_fwd, sigmoid_bwd
    b = torch.tensor(-10.0, device=dev)
    y = torch.arange(q.shape[0], device=dev)
    qd, kd, sd = q.detach(), k.detach(), s.detach()
    m = q.shape[0]
    g = torch.full((1,), 1.0 / m, device=dev).expand(m)
    row, col, pos = lse_fwd.lse_fwd(qd, kd, sd, y, 0, True, "default")
    rows = []
    rows.append(("  lse_fwd (launcher, 2 kernels)", per_call_us(
        lambda: lse_fwd.lse_fwd(qd, kd, sd, y, 0, True, "default"), dev)))
    rows.append(("  infcl::inf_fwd op, no grad", per_call_us(
        lambda: torch.ops.infcl.inf_fwd(qd, kd, sd, y, 0, True, 0, "default"), dev)))
    rows.append(("  ds_bwd (launcher: dS kernel, 2 GEMMs)", per_call_us(
        lambda: lse_bwd.ds_bwd(qd, kd, sd, y, 0, row, col, g, g, g, "default"), dev)))
    rows.append(("  infcl::inf_bwd op", per_call_us(
        lambda: torch.ops.infcl.inf_bwd(qd, kd, sd, y, 0, row, col, g, g, g, 0, "default"), dev)))
    r2, c2, p2 = (t.clone().requires_grad_() for t in (row, col, pos))
    for name, sym in (("symmetric", True), ("one direction", False)):
        f, bw = phases_us(lambda sym=sym: ops.assemble(r2, c2, p2, None, sym, "mean"), dev)
        rows.append((f"  assemble {name}: forward", f))
        rows.append((f"  assemble {name}: backward", bw))
    f, bw = phases_us(lambda: ops.loss(q, k, s, None, True, "mean", -100, block="inf"), dev)
    rows.append(("  ops.loss symmetric: forward", f))
    rows.append(("  ops.loss symmetric: backward", bw))
    rows.append(("  sigmoid_ds_bwd with loss (launcher)", per_call_us(
        lambda: sigmoid_bwd.sigmoid_ds_bwd(qd, kd, sd, b, y, 0, g, "default", with_loss=True), dev)))
    rows.append(("  infcl::inf_sigmoid_fused op", per_call_us(
        lambda: torch.ops.infcl.inf_sigmoid_fused(qd, kd, sd, b, y, True, "default"), dev)))
    rows.append(("  infcl::scaled op", per_call_us(lambda: torch.ops.infcl.scaled(qd, sd), dev)))
    f, bw = phases_us(lambda: ops.sigmoid_loss(q, k, s, -10.0, None, "mean", block="inf"), dev)
    rows.append(("  ops.sigmoid_loss: forward", f))
    rows.append(("  ops.sigmoid_loss: backward", bw))
    return rows


def per_call_us(fn: Callable[[], object], device: torch.device, n: int = 300) -> float:
    """Median over 5 rounds of the wall time per call of `fn`, synchronising once per round."""
    for _ in range(20):
        fn()
    harness.sync(device)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        harness.sync(device)
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(rounds)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--profile", choices=["clip", "siglip", "none"], default="clip")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    q = harness.unit_rows(args.b, args.d, dt, 1, dev).requires_grad_()
    k = harness.unit_rows(args.b, args.d, dt, 2, dev).requires_grad_()
    s = torch.tensor(20.0, device=dev, requires_grad=True)
    inf = infcl.inf_loss if dev.type == "cuda" else infcl.chunked_loss
    inf_sig = infcl.inf_sigmoid_loss if dev.type == "cuda" else infcl.chunked_sigmoid_loss
    block = "inf" if dev.type == "cuda" else "chunked"
    compiled = torch.compile(infcl.naive_loss)

    def step(loss):
        def run():
            q.grad = k.grad = s.grad = None
            loss().backward()
        return run

    def fwd(loss):
        def run():
            with torch.no_grad():
                loss()
        return run

    losses = {
        "inf_loss symmetric": lambda: inf(q, k, s, symmetric=True),
        "inf_loss one direction": lambda: inf(q, k, s),
        "inf_sigmoid_loss": lambda: inf_sig(q, k, s, -10.0),
        "naive_loss symmetric": lambda: infcl.naive_loss(q, k, s, symmetric=True),
        "compiled naive_loss symmetric": lambda: compiled(q, k, s, symmetric=True),
        "plain torch symmetric (no checks)": lambda: _plain(q, k, s),
        "body of inf_loss symmetric (ops.loss)": lambda: ops.loss(
            q, k, s, None, True, "mean", -100, block=block),
        "body of inf_sigmoid_loss (ops.sigmoid_loss)": lambda: ops.sigmoid_loss(
            q, k, s, -10.0, None, "mean", block=block),
    }
    rows = []
    for name, loss in losses.items():
        rows.append((f"step: {name}", per_call_us(step(loss), dev)))
    for name in ("inf_loss symmetric", "inf_sigmoid_loss", "naive_loss symmetric"):
        rows.append((f"forward, no grad: {name}", per_call_us(fwd(losses[name]), dev)))
    rows.append(("checks alone (find_problem)", per_call_us(
        lambda: _spec.find_problem(q, k, s, symmetric=True), dev)))
    x = torch.zeros(1024, device=dev)
    a = torch.zeros(args.b, device=dev, requires_grad=True)
    if dev.type == "cuda":
        rows.append(("triton launch, 12 args", per_call_us(
            lambda: _nop_kernel[(1,)](x, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, BLOCK=128, FLAG=False), dev)))
    rows.append(("custom op, no grad", per_call_us(lambda: _nop_op(x, x, 3, True), dev)))
    rows.append(("custom op with autograd, fwd+bwd", per_call_us(
        lambda: sum(_nop_op(a, a, 3, True)).sum().backward(), dev)))
    rows.append(("autograd.Function, fwd+bwd", per_call_us(
        lambda: sum(_NopFunction.apply(a, a)).sum().backward(), dev)))
    if dev.type == "cuda":
        rows += pieces(q, k, s, dev)
    rows.append(("torch.empty", per_call_us(lambda: torch.empty(64, device=dev), dev)))
    rows.append(("torch.full", per_call_us(lambda: torch.full((), 2.0, device=dev), dev)))
    rows.append(("x + 1", per_call_us(lambda: x + 1, dev)))
    rows.append(("autocast(enabled=False) enter/exit", per_call_us(
        lambda: torch.autocast(dev.type, enabled=False).__enter__(), dev)))
    rows.append(("tiny autograd step (a * 2).sum().backward()", per_call_us(
        lambda: (a * 2).sum().backward(), dev)))
    print(f"# host time per call, B={args.b} D={args.d} {dt} on {harness.card(dev)}, "
          f"torch {torch.__version__}, triton {triton.__version__}, commit {harness.commit()}")
    for name, us in rows:
        print(f"{us:9.1f} us  {name}")
    if args.profile != "none":
        run = step(losses["inf_sigmoid_loss" if args.profile == "siglip" else "inf_loss symmetric"])
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            run()
        harness.sync(dev)
        prof.disable()
        print(f"\n# cProfile of 200 steps ({args.profile}), by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def _plain(q, k, s):
    """The symmetric loss in a few plain torch ops, as a user would write it (no checks)."""
    logits = s * (q.float() @ k.float().T)
    y = torch.arange(q.shape[0], device=q.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, y) + ce(logits.T, y))


if __name__ == "__main__":
    main()
