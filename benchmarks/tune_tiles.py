"""Sweep tile configurations of the two kernels at one size; prints ms and TFLOP/s per config.

Run on the GPU: `python benchmarks/tune_tiles.py [--b 65536] [--d 512]`. Winners go into
`infcl/kernels/configs.py` by hand (fixed configs; no autotuning at run time).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from infcl.kernels import configs  # noqa: E402
from infcl.kernels.configs import Tile  # noqa: E402
from infcl.kernels.lse_bwd import dlogits_bwd  # noqa: E402
from infcl.kernels.lse_fwd import lse_rows  # noqa: E402

TILES = {
    torch.bfloat16: [Tile(128, 256, 32, 8, 4), Tile(128, 256, 64, 8, 3), Tile(128, 128, 64, 8, 3),
                     Tile(64, 128, 64, 4, 3), Tile(128, 128, 64, 8, 4)],
    torch.float32: [Tile(128, 128, 32, 8, 3), Tile(64, 128, 32, 4, 3), Tile(128, 64, 32, 4, 3)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=65536)
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    b, d = args.b, args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    flop = 2 * b * b * d
    for dt, tiles in TILES.items():
        q = torch.randn(b, d, device="cuda", generator=g)
        k = torch.randn(b, d, device="cuda", generator=g)
        q = torch.nn.functional.normalize(q, dim=-1).to(dt)
        k = torch.nn.functional.normalize(k, dim=-1).to(dt)
        s = torch.tensor(20.0, device="cuda")
        y = torch.arange(b, device="cuda")
        row, _ = lse_rows(q, k, s, y, 0, "tf32")
        col, _ = lse_rows(k, q, s, None, 0, "tf32")
        gr = torch.full((b,), 0.5 / b, device="cuda")
        gp = torch.full((b,), -1.0 / b, device="cuda")
        for t in tiles:
            for parts in (16, 32):
                configs.PARTS = parts
                ms = triton.testing.do_bench(lambda t=t: lse_rows(q, k, s, y, 0, "tf32", t), rep=200)
                print(f"fwd {str(dt)[6:]:8s} {t} parts={parts}: one row pass {ms:7.2f} ms "
                      f"({flop / ms / 1e9:5.0f} TF/s)", flush=True)
            configs.PARTS = 16
            for bp in (1, 2, 4):
                configs.BWD_PARTS = bp
                ms = triton.testing.do_bench(lambda t=t: dlogits_bwd(
                    q, k, s, y, 0, row, col, gr, gr, gp, "tf32", t), rep=200)
                print(f"bwd {str(dt)[6:]:8s} {t} bwd_parts={bp}: {ms:7.2f} ms "
                      f"({3 * flop / ms / 1e9:5.0f} TF/s)", flush=True)
            configs.BWD_PARTS = 2


if __name__ == "__main__":
    main()
