"""fp32 precision: error and time of `inf_loss` at each `precision=` beside naive fp32 (IEEE,
PyTorch's default) and naive with cuBLAS TF32, in one run.

    python benchmarks/bench_precision.py --out $OUT

Errors are `helpers.rel_err` (`||x - x64|| / max(||x64||, 1)`) of the loss, dq, dk and dscale of
the symmetric loss against float64 naive on the same fp32 inputs (unit rows); the ratio column
divides by naive IEEE's error (the issue's rule: `precision="ieee"` at most 2x, every quantity).
Time: forward + backward at B=16384, D=512, `do_bench` median, plus fp32 features under
`torch.autocast("cuda", torch.bfloat16)` (what open_clip's amp trainer hands the loss).
"""

from __future__ import annotations

import argparse
import os

import bench_loss
import harness  # before helpers: it puts the checkout and tests/ on sys.path
import helpers
import torch

import infcl
from infcl.kernels.logits import matmul_precision

SHAPES = [(4099, 384, 14.3), (130, 1030, 100.0), (8192, 512, 30.0), (1000, 1000, 50.0),
          (130, 1030, 10.0), (130, 1030, 1.0), (130, 512, 100.0), (1000, 1030, 100.0)]
"""(B, D, scale): D not a multiple of the tiles, B past and below them, scale up to 100; the
last four locate the ieee dq miss at B=130, D=1030, scale 100 (by scale, D and B)."""
METRICS = ("loss", "dq", "dk", "dscale")


def inf_at(precision: str):
    def fn(q, k, s):
        return infcl.inf_loss(q, k, s, symmetric=True, precision=precision)
    return fn


def inf_autocast(q, k, s):
    with torch.autocast("cuda", torch.bfloat16):
        return infcl.inf_loss(q, k, s, symmetric=True)


VARIANTS = {
    "naive_ieee": bench_loss.naive,
    "naive_cublas_tf32": bench_loss.naive,
    "inf_ieee": inf_at("ieee"),
    "inf_tf32x3": inf_at("tf32x3"),
    "inf_tf32": inf_at("tf32"),
}
CUBLAS = {"naive_cublas_tf32": "tf32"}
"""cuBLAS's fp32 setting around a variant's whole forward and backward (else IEEE; infcl's
ops set their own from `precision=`)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--time-b", type=int, default=16384)
    args = ap.parse_args()
    dev = torch.device("cuda")
    out = harness.Csv(os.path.join(args.out, "precision.csv"), dev)
    summary = []
    for b, d, scale in SHAPES:
        q = harness.unit_rows(b, d, torch.float32, 3 * b + d, dev)
        k = harness.unit_rows(b, d, torch.float32, 3 * b + d + 1, dev)
        s = torch.tensor(scale, device=dev)
        truth = helpers.run(infcl.naive_loss, q.double(), k.double(), s.double(), symmetric=True)
        errs = {}
        for name, fn in VARIANTS.items():
            with matmul_precision(CUBLAS.get(name, "ieee")):
                got = helpers.run(fn, q, k, s)
            errs[name] = {m: helpers.rel_err(x, x64) for m, x, x64 in zip(METRICS, got, truth, strict=True)}
            for m, e in errs[name].items():
                out.add(f"{name} (scale {scale:g})", f"err_{m}", b, d, torch.float32, e)
        for name, e in errs.items():
            base = errs["naive_cublas_tf32" if name == "inf_tf32" else "naive_ieee"]
            ratios = " ".join(f"{m} {e[m]:.2e} ({e[m] / max(base[m], 1e-30):.2f}x)" for m in METRICS)
            summary.append(f"B={b} D={d} scale={scale:g} {name:18s} {ratios}")
            print(summary[-1], flush=True)

    b, d = args.time_b, 512
    timed = {**VARIANTS, "inf_autocast_bf16": inf_autocast}
    for name, fn in timed.items():
        with matmul_precision(CUBLAS.get(name, "ieee")):
            (p20, p50, p80), _ = bench_loss.time_point(fn, b, d, torch.float32, dev, 300)
        out.add(name, "ms", b, d, torch.float32, p50, p20, p80)
        summary.append(f"B={b} D={d} {name:18s} {p50:.2f} ms")
        print(summary[-1], flush=True)
    print(f"\nwrote {out.path} ({out.meta['card']}, torch {torch.__version__})")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
