"""Kernel experiments on one GPU: what bounds the tile loop of the forward and dS kernels.

Each variant is a stripped copy of the library's tile loop (bf16, shapes that the tiles divide,
D a multiple of BLOCK_D) with one thing changed: how q and k reach the tensor cores (pointer
loads or TMA descriptors), whether the column loop is flattened with the D loop (so the loads
of the next tile overlap this tile's epilogue), whether q stays resident across the column loop
(BLOCK_D = D), and how much epilogue follows the product (MODE: 0 a plain row sum, 1 the row
LSE, 2 row and column LSEs as `lse_fwd` does, 3 the dS epilogue with a bf16 store as `_ds_kernel`
does). Prints one line per variant: ms, TFLOP/s of the products, and the error of its row
statistics against torch on a small shape.

    python benchmarks/kernel_lab.py --b 32768 --d 512 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import traceback

import torch
import triton
import triton.language as tl

from infcl.kernels.configs import split
from infcl.kernels.logits import TensorDescriptor

LOG2E = tl.constexpr(1.4426950408889634)
UP = tl.constexpr(__import__("os").environ.get("TRITON_INTERPRET") == "1")
"""The interpreter gets bf16 dots wrong: it runs them in fp32 (CPU smoke tests only)."""


@triton.jit
def _dot(a, b, acc):
    if UP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile(q_ptr, k_ptr, q_desc, k_desc, start_m, start_n, b_qr,
          D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
          TMA: tl.constexpr, RESIDENT: tl.constexpr):
    if RESIDENT:
        if TMA:
            b_k = k_desc.load([start_n, 0])
        else:
            o_n = start_n + tl.arange(0, BN)
            b_k = tl.load(k_ptr + o_n[:, None] * D + tl.arange(0, BD)[None, :])
        return _dot(b_qr, b_k.T, tl.zeros([BM, BN], dtype=tl.float32))
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d in range(0, D, BD):
        if TMA:
            b_q = q_desc.load([start_m, d])
            b_k = k_desc.load([start_n, d])
            acc = _dot(b_q, b_k.T, acc)
        else:
            o_m = start_m + tl.arange(0, BM)
            o_n = start_n + tl.arange(0, BN)
            o_d = d + tl.arange(0, BD)
            b_q = tl.load(q_ptr + o_m[:, None] * D + o_d[None, :])
            b_k = tl.load(k_ptr + o_d[:, None] + o_n[None, :] * D)
            acc = _dot(b_q, b_k, acc)
    return acc


@triton.jit
def _fwd_lab(q_ptr, k_ptr, q_desc, k_desc, row_ptr, col_ptr, lse_ptr, ds_ptr, M, N,
             rows_per_part, cols_per_part, s,
             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
             MODE: tl.constexpr, TMA: tl.constexpr, FLAT: tl.constexpr, RESIDENT: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    n_p = tl.num_programs(0)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    for start_m in range(row_lo, row_hi, BM):
        o_m = start_m + tl.arange(0, BM)
        b_qr = tl.zeros([BM, BD], dtype=tl.bfloat16)
        if RESIDENT:
            if TMA:
                b_qr = q_desc.load([start_m, 0])
            else:
                b_qr = tl.load(q_ptr + o_m[:, None] * D + tl.arange(0, BD)[None, :])
        b_max = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_sum = tl.zeros([BM], dtype=tl.float32)
        if MODE == 3:
            b_lse = tl.load(lse_ptr + o_m)
        for start_n in tl.range(col_lo, col_hi, BN, flatten=FLAT):
            acc = _tile(q_ptr, k_ptr, q_desc, k_desc, start_m, start_n, b_qr,
                        D, BM, BN, BD, TMA, RESIDENT)
            b_s = acc * s
            o_n = start_n + tl.arange(0, BN)
            if MODE == 0:
                b_sum += tl.sum(b_s, axis=1)
            elif MODE == 3:
                c_lse = tl.load(lse_ptr + o_n)
                b_ds = 0.5 * tl.exp2((b_s - b_lse[:, None]) * LOG2E) + 0.5 * tl.exp2(
                    (b_s - c_lse[None, :]) * LOG2E)
                b_sum += tl.sum(b_ds * acc, axis=1)
                tl.store(ds_ptr + o_m[:, None].to(tl.int64) * N + o_n[None, :],
                         b_ds.to(tl.bfloat16))
            else:
                b_new = tl.maximum(b_max, tl.max(b_s, axis=1))
                b_sum = b_sum * tl.exp2((b_max - b_new) * LOG2E) + tl.sum(
                    tl.exp2((b_s - b_new[:, None]) * LOG2E), axis=1)
                b_max = b_new
                if MODE == 2:
                    p_c = col_ptr + pid_p * N + o_n
                    old = (o_n >= 0) & (start_m > row_lo)  # nothing stored before the first
                    c_max = tl.load(p_c, mask=old, other=float("-inf"))
                    c_sum = tl.load(p_c + n_p * N, mask=old, other=0.0)
                    c_new = tl.maximum(c_max, tl.max(b_s, axis=0))
                    c_sum = c_sum * tl.exp2((c_max - c_new) * LOG2E) + tl.sum(
                        tl.exp2((b_s - c_new[None, :]) * LOG2E), axis=0)
                    tl.store(p_c, c_new)
                    tl.store(p_c + n_p * N, c_sum)
        tl.store(row_ptr + pid_q * M + o_m, b_max)
        tl.store(row_ptr + (tl.num_programs(1) + pid_q) * M + o_m, b_sum)
        if MODE == 2:
            tl.debug_barrier()


SHIFT = tl.constexpr(64.0)


@triton.jit
def _fwd_colmajor(q_ptr, k_ptr, q_desc, k_desc, row_ptr, col_ptr, M, N,
                  rows_per_part, cols_per_part, s,
                  D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  TMA: tl.constexpr, SLOT: tl.constexpr):
    """MODE 4: the symmetric forward with the loops swapped: a column block outer, the row
    blocks inner. The row statistics go through the `[2, Q, M]` partials at every tile (a
    reduction along the row, inside a warp); the separable column sums `p * exp(r_i - R)`
    accumulate elementwise in a [BM, BN] register tile across the row blocks, reduced down the
    rows once per column block. SLOT: a reference per row slot (a multiply per logit per tile);
    else one reference per tile (a max across the tile's rows per tile)."""
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    n_p = tl.num_programs(0)
    n_q = tl.num_programs(1)
    row_lo = pid_p * rows_per_part
    row_hi = tl.minimum(row_lo + rows_per_part, M)
    col_lo = pid_q * cols_per_part
    col_hi = tl.minimum(col_lo + cols_per_part, N)
    for start_n in range(col_lo, col_hi, BN):
        o_n = start_n + tl.arange(0, BN)
        c_acc = tl.zeros([BM, BN], dtype=tl.float32)
        c_ref = tl.full([BM], float("-inf"), dtype=tl.float32)
        t_ref = tl.max(c_ref, axis=0)
        for start_m in range(row_lo, row_hi, BM):
            o_m = start_m + tl.arange(0, BM)
            p_r = row_ptr + pid_q * M + o_m
            old = (o_m >= 0) & (start_n > col_lo)
            r_max = tl.load(p_r, mask=old, other=float("-inf"))
            r_sum = tl.load(p_r + n_q * M, mask=old, other=0.0)
            acc = _tile(q_ptr, k_ptr, q_desc, k_desc, start_m, start_n, q_ptr,
                        D, BM, BN, BD, TMA, False)
            b_s = acc * s
            b_new = tl.maximum(r_max, tl.max(b_s, axis=1))
            b_p = tl.exp2((b_s - b_new[:, None]) * LOG2E)
            r_sum = r_sum * tl.exp2((r_max - b_new) * LOG2E) + tl.sum(b_p, axis=1)
            tl.store(p_r, b_new)
            tl.store(p_r + n_q * M, r_sum)
            if SLOT:
                c_new = tl.maximum(c_ref, b_new)
                c_acc = c_acc * tl.exp2((c_ref - c_new) * LOG2E)[:, None] + b_p * tl.exp2(
                    (b_new - c_new) * LOG2E + SHIFT)[:, None]
                c_ref = c_new
            else:
                m_ref = tl.max(b_new, axis=0)
                if m_ref > t_ref:
                    c_acc = c_acc * tl.exp2((t_ref - m_ref) * LOG2E)
                    t_ref = m_ref
                c_acc += b_p * tl.exp2((b_new - t_ref) * LOG2E + SHIFT)[:, None]
        if SLOT:
            t_ref = tl.max(c_ref, axis=0)
            c_sum = tl.sum(c_acc * tl.exp2((c_ref - t_ref) * LOG2E)[:, None], axis=0)
        else:
            c_sum = tl.sum(c_acc, axis=0)
        p_c = col_ptr + pid_p * N + o_n
        tl.store(p_c, tl.zeros([BN], dtype=tl.float32) + t_ref)
        tl.store(p_c + n_p * N, c_sum)


def run_variant(q, k, v, scale=10.0, lse=None, ds=None):
    """Launch one variant; returns (row stats [2, Q, M], col stats [2, P, N])."""
    m, d = q.shape
    n = k.shape[0]
    bm, bn, bd = v["bm"], v["bn"], v["bd"]
    if v.get("resident"):
        bd = d
    if v["mode"] == 3:  # dS: one program per row block and column part, as _ds_kernel
        n_p, rows_per = m // bm, bm
        n_q, cols_per = split(n, bn, 2)
    else:
        n_p, rows_per = split(m, bm, 16)
        n_q, cols_per = split(n, bn, 16)
    row = torch.empty(2, n_q, m, device=q.device, dtype=torch.float32)
    col = torch.empty(2, n_p, n, device=q.device, dtype=torch.float32)
    if v["tma"]:
        qd = TensorDescriptor.from_tensor(q, [bm, bd])
        kd = TensorDescriptor.from_tensor(k, [bn, bd])
    else:
        qd = kd = q  # unused
    if v["mode"] == 4:
        _fwd_colmajor[(n_p, n_q)](
            q, k, qd, kd, row, col, m, n, rows_per, cols_per, scale,
            D=d, BM=bm, BN=bn, BD=bd, TMA=v["tma"], SLOT=bool(v.get("slot")),
            num_warps=v["w"], num_stages=v["s"])
        return row, col
    _fwd_lab[(n_p, n_q)](
        q, k, qd, kd, row, col, lse if lse is not None else row, ds if ds is not None else row,
        m, n, rows_per, cols_per, scale,
        D=d, BM=bm, BN=bn, BD=bd, MODE=v["mode"], TMA=v["tma"], FLAT=v.get("flat", False),
        RESIDENT=bool(v.get("resident")), num_warps=v["w"], num_stages=v["s"],
    )
    return row, col


def check(v, device):
    """Row LSE error against torch on M = N = 2048 (modes 1 and 2; 2 also the column LSE)."""
    g = torch.Generator(device=device).manual_seed(0)
    m, d = 2048, 512
    q = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=g), dim=1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(m, d, device=device, generator=g), dim=1).bfloat16()
    s = 10.0 * (q.float() @ k.float().T)
    if v["mode"] == 0:
        row, _ = run_variant(q, k, v)
        return (row[1].sum(0) - s.sum(1)).abs().max().item()
    if v["mode"] == 3:
        lse = torch.zeros(m, device=device)
        ds = torch.empty(m, m, device=device, dtype=torch.bfloat16)
        run_variant(q, k, v, lse=lse, ds=ds)
        ref = 0.5 * s.exp() + 0.5 * s.exp()
        return ((ds.float() - ref).abs() / ref.abs().clamp_min(1)).max().item()
    row, col = run_variant(q, k, v)
    r = torch.logsumexp(row[0] + row[1].log(), dim=0)
    err = (r - torch.logsumexp(s, 1)).abs().max().item()
    if v["mode"] in (2, 4):
        shift = 64.0 * math.log(2.0) if v["mode"] == 4 else 0.0
        c = torch.logsumexp(col[0] + col[1].log(), dim=0) - shift
        err = max(err, (c - torch.logsumexp(s, 0)).abs().max().item())
    return err


def variants():
    base = dict(bm=64, bn=128, bd=64, w=4, s=3, tma=False)
    out = []
    for mode in (0, 1, 2):
        out.append(dict(base, mode=mode))
        out.append(dict(base, mode=mode, tma=True))
        out.append(dict(base, mode=mode, tma=True, flat=True))
    for mode in (0, 2):
        out += [
            dict(bm=128, bn=128, bd=64, w=8, s=3, tma=True, mode=mode),
            dict(bm=128, bn=128, bd=64, w=8, s=4, tma=True, mode=mode, flat=True),
            dict(bm=128, bn=128, bd=64, w=8, s=3, tma=False, mode=mode),
            dict(bm=128, bn=256, bd=64, w=8, s=3, tma=True, mode=mode),
            dict(bm=64, bn=256, bd=64, w=4, s=3, tma=True, mode=mode),
            dict(bm=64, bn=64, bd=512, w=4, s=2, tma=True, mode=mode, resident=True),
            dict(bm=128, bn=64, bd=64, w=8, s=4, tma=True, mode=mode, flat=True),
        ]
    out += [
        dict(base, mode=2, tma=True, s=4),
        dict(base, mode=2, tma=True, bd=128, s=2),
        dict(base, mode=2, tma=True, flat=True, s=4),
        dict(bm=128, bn=128, bd=64, w=8, s=3, tma=True, mode=2, flat=True),
        dict(bm=128, bn=128, bd=128, w=8, s=2, tma=True, mode=2),
    ]
    for tma, flat in ((False, False), (True, False), (True, True)):
        out.append(dict(base, mode=3, tma=tma, flat=flat))
        out.append(dict(bm=128, bn=128, bd=64, w=8, s=3, mode=3, tma=tma, flat=flat))
    out.append(dict(bm=64, bn=64, bd=128, w=4, s=3, mode=3, tma=True, flat=True))
    out.append(dict(bm=128, bn=64, bd=64, w=8, s=4, mode=3, tma=True, flat=True))
    for slot in (False, True):  # the loops swapped (see _fwd_colmajor)
        out += [
            dict(bm=64, bn=128, bd=64, w=4, s=3, tma=True, mode=4, slot=slot),
            dict(bm=128, bn=128, bd=64, w=8, s=3, tma=True, mode=4, slot=slot),
            dict(bm=128, bn=64, bd=64, w=4, s=3, tma=True, mode=4, slot=slot),
            dict(bm=64, bn=256, bd=64, w=8, s=3, tma=True, mode=4, slot=slot),
            dict(bm=128, bn=256, bd=64, w=8, s=3, tma=True, mode=4, slot=slot),
            dict(bm=128, bn=128, bd=64, w=8, s=4, tma=True, mode=4, slot=slot),
        ]
    return out


def name(v):
    extra = "".join(x for x, on in (("+tma", v["tma"]), ("+flat", v.get("flat")),
                                     ("+resident", v.get("resident")),
                                     ("+slot", v.get("slot"))) if on)
    return f"mode{v['mode']} {v['bm']}x{v['bn']}x{v['bd']} w{v['w']} s{v['s']}{extra}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b", type=int, default=32768)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--ds-b", type=int, default=16384, help="rows and columns of the dS runs")
    ap.add_argument("--out", default="/tmp/lab")
    ap.add_argument("--modes", default="0,1,2,3,4", help="which MODEs to run")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda"
    from triton.testing import do_bench

    q = torch.nn.functional.normalize(torch.randn(args.b, args.d, device=dev), dim=1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(args.b, args.d, device=dev), dim=1).bfloat16()
    nb = args.ds_b
    lse = torch.full((nb,), 12.0, device=dev)
    ds = torch.empty(nb, nb, device=dev, dtype=torch.bfloat16)
    rows = []
    # the library's own forward, for reference
    import infcl.kernels.lse_fwd as lf

    sc = torch.tensor(10.0, device=dev)
    y = torch.arange(args.b, device=dev)
    ms = do_bench(lambda: lf.lse_fwd(q, k, sc, y, 0, True, "ieee"), warmup=5, rep=60)
    flops = 2 * args.b * args.b * args.d
    print(f"{'library lse_fwd symmetric':48s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s")
    rows.append(dict(variant="library lse_fwd symmetric", ms=ms))
    modes = {int(x) for x in args.modes.split(",")}
    for v in [v for v in variants() if v["mode"] in modes]:
        try:
            err = check(v, dev)
            if v["mode"] == 3:
                f = lambda v=v: run_variant(q[:nb], k[:nb], v, lse=lse, ds=ds)  # noqa: E731
                fl = 2 * nb * nb * args.d
            else:
                f = lambda v=v: run_variant(q, k, v)  # noqa: E731
                fl = flops
            ms = do_bench(f, warmup=5, rep=60)
            line = f"{name(v):48s} {ms:8.3f} ms {fl / ms / 1e9:7.1f} TFLOP/s err {err:.2e}"
            rows.append(dict(variant=name(v), ms=ms, tflops=fl / ms / 1e9, err=err))
        except Exception as e:  # noqa: BLE001 - an experiment that does not compile is a result
            line = f"{name(v):48s} failed: {type(e).__name__}: {str(e)[:160]}"
            rows.append(dict(variant=name(v), error=traceback.format_exc()[-2000:]))
        print(line, flush=True)
    mm = do_bench(lambda: q @ k.T, warmup=5, rep=60)
    print(f"{'cuBLAS q @ k.T (bf16 out)':48s} {mm:8.3f} ms {flops / mm / 1e9:7.1f} TFLOP/s")
    rows.append(dict(variant="cublas", ms=mm))
    (out / "kernel_lab.json").write_text(json.dumps(dict(b=args.b, d=args.d, ds_b=nb, rows=rows),
                                                    indent=1))


if __name__ == "__main__":
    main()
