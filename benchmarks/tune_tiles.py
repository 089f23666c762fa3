"""Sweep the streaming-kernel tiles and the logit block size at one problem size.

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
from infcl.kernels.lse_bwd import dlogits_bwd  # noqa: E402
from infcl.kernels.lse_fwd import lse_fwd  # noqa: E402

STATS = [(32, 256, 4), (16, 256, 4), (64, 128, 4), (32, 512, 8), (64, 256, 8), (16, 512, 4),
         (8, 512, 4), (32, 128, 4)]
BLOCKS = [(8192, 4096), (8192, 8192), (4096, 4096), (16384, 4096)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=65536)
    ap.add_argument("--d", type=int, default=512)
    args = ap.parse_args()
    b, d = args.b, args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    flop = 2 * b * b * d
    for dt in (torch.bfloat16, torch.float32):
        q = torch.randn(b, d, device="cuda", generator=g)
        k = torch.randn(b, d, device="cuda", generator=g)
        q = torch.nn.functional.normalize(q, dim=-1).to(dt)
        k = torch.nn.functional.normalize(k, dim=-1).to(dt)
        s = torch.tensor(20.0, device="cuda")
        y = torch.arange(b, device="cuda")
        row, col, _ = lse_fwd(q, k, s, y, 0, True, "tf32")
        gr = torch.full((b,), 0.5 / b, device="cuda")
        gp = torch.full((b,), -1.0 / b, device="cuda")
        for bm, bn, w in STATS if dt == torch.bfloat16 else STATS[:3]:
            configs.STATS_BLOCK_M, configs.STATS_BLOCK_N, configs.STATS_WARPS = bm, bn, w
            for br, bc in BLOCKS if (bm, bn, w) == STATS[0] else BLOCKS[:1]:
                configs.BLOCK_ROWS, configs.BLOCK_COLS = br, bc
                try:
                    f_s = triton.testing.do_bench(
                        lambda: lse_fwd(q, k, s, y, 0, True, "tf32"), rep=200)
                    f_1 = triton.testing.do_bench(
                        lambda: lse_fwd(q, k, s, y, 0, False, "tf32"), rep=200)
                    bw = triton.testing.do_bench(lambda: dlogits_bwd(
                        q, k, s, y, 0, row, col, gr, gr, gp, "tf32"), rep=200)
                except Exception as e:
                    print(f"{dt} stats={bm, bn, w} block={br, bc}: {type(e).__name__} {e}"[:300])
                    continue
                print(f"{str(dt)[6:]:8s} stats={bm, bn, w} block={br, bc}: fwd sym {f_s:6.2f} ms "
                      f"fwd 1dir {f_1:6.2f} ms bwd sym {bw:6.2f} ms total sym {f_s + bw:6.2f} ms "
                      f"({5 * flop / (f_s + bw) / 1e9:4.0f} TF/s on 10 B^2 D)", flush=True)
        configs.STATS_BLOCK_M, configs.STATS_BLOCK_N, configs.STATS_WARPS = STATS[0]
        configs.BLOCK_ROWS, configs.BLOCK_COLS = BLOCKS[0]


if __name__ == "__main__":
    main()
