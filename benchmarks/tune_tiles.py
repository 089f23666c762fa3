"""Sweep tile configurations of the two kernels at one size; prints ms and TFLOP/s per config.

Run on the GPU: `python benchmarks/tune_tiles.py [--b 65536] [--d 512]`. Winners go into
`infcl/kernels/configs.py` by hand (fixed configs; no autotuning at run time).

Every configuration is checked before it is timed: with that tile and partition count the two
kernels alone (`lse_fwd` symmetric forward, `ds_bwd` backward) give the symmetric
mean loss and its dq, dk, dscale at B = --check-b, D = 300, judged by `helpers.judge` against
float64 `naive_loss` (the harness's rule). A configuration off the spec is reported, not timed.
`--loss siglip` sweeps the fused sigmoid kernel instead (`sigmoid_ds_bwd` with the loss, the
"mean" loss's whole step but for the final scaling), checked against `naive_sigmoid_loss`.
"""

from __future__ import annotations

import argparse
import functools

import harness
import torch
from harness import helpers
from torch import Tensor

import infcl
from infcl.kernels import configs
from infcl.kernels.configs import Tile
from infcl.kernels.lse_bwd import ds_bwd
from infcl.kernels.lse_fwd import lse_fwd
from infcl.kernels.sigmoid_bwd import sigmoid_ds_bwd

TILES = {
    torch.bfloat16: [Tile(128, 256, 32, 8, 4), Tile(128, 256, 64, 8, 3), Tile(128, 128, 64, 8, 3),
                     Tile(64, 128, 64, 4, 3), Tile(128, 128, 64, 8, 4), Tile(128, 128, 32, 4, 4),
                     Tile(64, 256, 64, 4, 3), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 8, 3),
                     Tile(64, 64, 64, 4, 3), Tile(64, 128, 32, 8, 3)],
    torch.float32: [Tile(128, 128, 32, 8, 3), Tile(64, 128, 32, 4, 3), Tile(128, 64, 32, 4, 3),
                    Tile(64, 64, 32, 4, 3), Tile(64, 64, 16, 4, 3), Tile(128, 128, 16, 8, 3)],
}
PRECISION = "tf32"  # float32 dots: --precision (TF32 on the tensor cores unless told)
BIAS = -10.0  # the sigmoid sweep's bias (SigLIP's initial value)
SIGMOID_TILES = {  # ptxas -v (sm_90a): 64 x 128 x 64 with 4 warps spills 1.9 KB, with 8 warps 24 B
    torch.bfloat16: [Tile(64, 64, 64, 4, 4), Tile(64, 64, 128, 4, 2), Tile(64, 64, 128, 4, 3),
                     Tile(128, 64, 64, 8, 3), Tile(128, 64, 64, 8, 4), Tile(64, 128, 64, 8, 4),
                     Tile(128, 128, 64, 8, 3), Tile(64, 64, 64, 4, 5), Tile(64, 64, 32, 4, 6)],
    torch.float32: [Tile(128, 128, 32, 8, 3), Tile(64, 128, 32, 8, 3), Tile(64, 64, 32, 4, 3)],
}


def kernels_result(q: Tensor, k: Tensor, s: Tensor, tile: Tile) -> helpers.Result:
    """The symmetric mean loss from the kernels alone, and its dq, dk, dscale.

    Per pair i the loss is `0.5 * row_lse_i + 0.5 * col_lse_i - pos_i`; its gradients are what
    `ds_bwd` computes for g_row = g_col = 0.5 / B and g_pos = -1 / B.
    """
    b = q.shape[0]
    y = torch.arange(b, device=q.device)
    row, col, pos = lse_fwd(q, k, s, y, 0, True, PRECISION, tile)
    loss = (0.5 * row.sum() + 0.5 * col.sum() - pos.double().sum()) / b
    g_half = torch.full((b,), 0.5 / b, device=q.device)
    g_pos = torch.full((b,), -1.0 / b, device=q.device)
    dq, dk, dscale = ds_bwd(q, k, s, y, 0, row, col, g_half, g_half, g_pos, PRECISION, tile)
    return helpers.Result(loss.float(), dq, dk, dscale)


def off_spec(q: Tensor, k: Tensor, s: Tensor, tile: Tile) -> list[str]:
    """[] when the kernels with `tile` (and the current configs.PARTS, BWD_PARTS) meet the rule."""
    truth = helpers.ground_truth(q, k, s, symmetric=True)
    ref = helpers.run(infcl.naive_loss, q, k, s, symmetric=True)
    verdict = helpers.judge(kernels_result(q, k, s, tile), ref, truth, dtype=q.dtype,
                            floor=harness.floor(q.dtype, tf32=True))
    return [] if verdict.ok else verdict.lines


def sigmoid_result(q: Tensor, k: Tensor, s: Tensor, tile: Tile) -> helpers.Result:
    """The mean sigmoid loss and its dq, dk, dscale from the fused kernel alone."""
    b = q.shape[0]
    y = torch.arange(b, device=q.device)
    g_row = torch.full((b,), 1.0 / b, device=q.device)
    bias = torch.tensor(BIAS, device=q.device)
    dq, dk, dscale, _, total = sigmoid_ds_bwd(q, k, s, bias, y, 0, g_row, PRECISION, tile,
                                              with_loss=True)
    return helpers.Result(total / b, dq, dk, dscale)


def sigmoid_off_spec(q: Tensor, k: Tensor, s: Tensor, tile: Tile) -> list[str]:
    """[] when the fused sigmoid kernel with `tile` (and configs.BWD_PARTS) meets the rule."""
    truth = helpers.run(infcl.naive_sigmoid_loss, q.double(), k.double(), s.double(), bias=BIAS)
    ref = helpers.run(infcl.naive_sigmoid_loss, q, k, s, bias=BIAS)
    verdict = helpers.judge(sigmoid_result(q, k, s, tile), ref, truth, dtype=q.dtype,
                            floor=harness.floor(q.dtype, tf32=PRECISION == "tf32"))
    return [] if verdict.ok else verdict.lines


def sweep_sigmoid(args: argparse.Namespace) -> None:
    """ms of the fused sigmoid kernel and its GEMMs per tile and backward partition count."""
    b, d, dev = args.b, args.d, torch.device("cuda")
    bwd_parts = configs.BWD_PARTS
    for dt, tiles in SIGMOID_TILES.items():
        if harness.dname(dt) not in args.dtypes:
            continue
        q, k = harness.unit_rows(b, d, dt, 1, dev), harness.unit_rows(b, d, dt, 2, dev)
        qc = harness.unit_rows(args.check_b, args.check_d, dt, 3, dev)
        kc = harness.unit_rows(args.check_b, args.check_d, dt, 4, dev)
        s = torch.tensor(20.0, device=dev)
        for t in tiles:
            # 1 was slower for every tile (results/raw/tune_sigmoid_*)
            for bp in args.bwd_parts or (2, 4):
                configs.BWD_PARTS = bp
                label = f"sigmoid fused {harness.dname(dt):8s} {t} bwd_parts={bp}"
                try:
                    problems = sigmoid_off_spec(qc, kc, s, t)
                except Exception as e:  # a tile that does not compile is reported, not fatal
                    print(f"{label}: NOT TIMED, {type(e).__name__}: {str(e)[:300]}")
                    continue
                if problems:
                    print(f"{label}: NOT TIMED, off the spec:\n  " + "\n  ".join(problems))
                    continue
                _, ms, _ = harness.bench(functools.partial(sigmoid_result, q, k, s, t), dev)
                print(f"{label}: {ms:7.2f} ms ({6 * b * b * d / ms / 1e9:5.0f} TF/s)", flush=True)
        configs.BWD_PARTS = bwd_parts


def main() -> None:
    global PRECISION
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--b", type=int, default=65536)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--check-b", type=int, default=4100,
                    help="batch of the check (not a multiple of the tiles; several partitions)")
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    ap.add_argument("--stage", choices=["fwd", "bwd", "both"], default="both")
    ap.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    ap.add_argument("--precision", choices=configs.PRECISIONS, default=PRECISION,
                    help="of float32 dots")
    ap.add_argument("--tma", action="store_true",
                    help="TMA descriptor loads at every size (bf16, fp16; the check takes D=304)")
    ap.add_argument("--tiles", nargs="*", default=None,
                    help="BMxBNxBDxWARPSxSTAGES items in place of the built-in lists")
    ap.add_argument("--parts", nargs="*", type=int, default=[16, 32], help="forward PARTS")
    ap.add_argument("--bwd-parts", nargs="*", type=int, default=None, help="BWD_PARTS")
    args = ap.parse_args()
    PRECISION = args.precision
    args.check_d = 304 if args.tma else 300
    if args.tma:
        configs.TMA_MIN_LOGITS = 0
    if args.tiles:
        chosen = [Tile(*map(int, t.split("x"))) for t in args.tiles]
        for table in (TILES, SIGMOID_TILES):
            table[torch.bfloat16] = chosen
    if args.loss == "siglip":
        sweep_sigmoid(args)
        return
    b, d, dev = args.b, args.d, torch.device("cuda")
    flop = 2 * b * b * d
    parts, bwd_parts = configs.PARTS, configs.BWD_PARTS
    for dt, tiles in TILES.items():
        if harness.dname(dt) not in args.dtypes:
            continue
        q = harness.unit_rows(b, d, dt, 1, dev)
        k = harness.unit_rows(b, d, dt, 2, dev)
        qc = harness.unit_rows(args.check_b, args.check_d, dt, 3, dev)
        kc = harness.unit_rows(args.check_b, args.check_d, dt, 4, dev)
        s = torch.tensor(20.0, device=dev)
        y = torch.arange(b, device=dev)
        row, col, _ = lse_fwd(q, k, s, y, 0, True, PRECISION)
        g_half = torch.full((b,), 0.5 / b, device=dev)
        g_pos = torch.full((b,), -1.0 / b, device=dev)
        name = harness.dname(dt)
        for t in tiles:
            for p in args.parts if args.stage != "bwd" else ():
                configs.PARTS = p
                label = f"fwd {name:8s} {t} parts={configs.PARTS}"
                problems = off_spec(qc, kc, s, t)
                if problems:
                    print(f"{label}: NOT TIMED, off the spec:\n  " + "\n  ".join(problems))
                    continue
                _, ms, _ = harness.bench(
                    functools.partial(lse_fwd, q, k, s, y, 0, True, PRECISION, t), dev)
                print(f"{label}: both directions {ms:7.2f} ms ({flop / ms / 1e9:5.0f} TF/s)",
                      flush=True)
            configs.PARTS = parts
            for bp in (args.bwd_parts or (1, 2, 4)) if args.stage != "fwd" else ():
                configs.BWD_PARTS = bp
                label = f"bwd {name:8s} {t} bwd_parts={configs.BWD_PARTS}"
                problems = off_spec(qc, kc, s, t)
                if problems:
                    print(f"{label}: NOT TIMED, off the spec:\n  " + "\n  ".join(problems))
                    continue
                _, ms, _ = harness.bench(functools.partial(
                    ds_bwd, q, k, s, y, 0, row, col, g_half, g_half, g_pos, PRECISION, t), dev)
                print(f"{label}: {ms:7.2f} ms ({3 * flop / ms / 1e9:5.0f} TF/s)", flush=True)
            configs.BWD_PARTS = bwd_parts


if __name__ == "__main__":
    main()
