"""Where the time goes at small B: GPU kernel time per step against the time of a step.

Run on the GPU: `python benchmarks/profile_small.py [--b 8192]`. Prints the step's p50 from
`harness.bench` (as bench_loss.py times it), the profiler's kernel time and launches per step,
and the kernels by total CUDA time. The loss is first checked (`harness.gate`, B=1000, D=300).
"""

from __future__ import annotations

import argparse

import harness
import torch
from torch.profiler import ProfilerActivity, profile

import infcl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--loss", choices=["clip", "siglip"], default="clip",
                    help="the symmetric softmax loss, or the sigmoid loss (mean, bias -10)")
    ap.add_argument("--steps", type=int, default=20, help="steps under the profiler")
    ap.add_argument("--host", action="store_true",
                    help="also the Python functions by own time over 100 steps (cProfile)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    q = harness.unit_rows(args.b, args.d, torch.bfloat16, 1, dev).requires_grad_()
    k = harness.unit_rows(args.b, args.d, torch.bfloat16, 2, dev).requires_grad_()
    s = torch.tensor(20.0, device=dev, requires_grad=True)

    def loss(q, k, s):
        if args.loss == "siglip":
            return infcl.inf_sigmoid_loss(q, k, s, -10.0)
        return infcl.inf_loss(q, k, s, symmetric=True)

    spec = dict(ref_fn=infcl.naive_sigmoid_loss, bias=-10.0) if args.loss == "siglip" else dict(
        symmetric=True)
    verdict = harness.gate(loss, harness.unit_rows(1000, 300, torch.bfloat16, 3, dev),
                           harness.unit_rows(1000, 300, torch.bfloat16, 4, dev),
                           torch.tensor(30.0, device=dev), **spec)
    if not verdict.ok:
        raise SystemExit("inf_loss is off the spec, not profiled:\n" + "\n".join(verdict.lines))

    def step():
        q.grad = k.grad = s.grad = None
        loss(q, k, s).backward()

    _, step_ms, _ = harness.bench(step, dev)
    n = args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    # kernels only: an op's row repeats the time of the kernels it launched
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / n / 1e3
    launches = sum(e.count for e in kernels) / n
    print(f"B={args.b} D={args.d} bf16 {args.loss}: step {step_ms:.2f} ms (p50), GPU busy "
          f"{gpu:.2f} ms/step, about {launches:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    if args.host:
        import cProfile
        import pstats

        host = cProfile.Profile()
        host.enable()
        for _ in range(100):
            step()
        torch.cuda.synchronize()
        host.disable()
        pstats.Stats(host).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
