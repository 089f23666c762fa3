"""Where the time goes at small B: GPU kernel time per step against wall time per step.

Run on the GPU: `python benchmarks/profile_small.py [--b 8192]`. Prints the kernels by total
CUDA time and the number of launches per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infcl  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=8192)
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(args.b, args.d, device="cuda", generator=g), dim=-1).bfloat16()
    k = F.normalize(torch.randn(args.b, args.d, device="cuda", generator=g), dim=-1).bfloat16()
    q.requires_grad_()
    k.requires_grad_()
    s = torch.tensor(20.0, device="cuda", requires_grad=True)

    def step():
        q.grad = k.grad = s.grad = None
        infcl.inf_loss(q, k, s, symmetric=True).backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n = 20
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    # kernels only: an op's row repeats the time of the kernels it launched
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in kernels) / n / 1e3
    launches = sum(e.count for e in kernels) / n
    print(f"B={args.b} D={args.d} bf16 symmetric: wall {wall:.2f} ms/step, GPU busy "
          f"{gpu:.2f} ms/step, about {launches:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
