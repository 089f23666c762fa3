"""A PROJECTION of 8-GPU ring time and memory from measured 1-, 2- and 4-GPU runs (no 8-GPU
machine was lent). Writes benchmarks/results/projection_w8.csv and prints a table.

Model, stated so it can be checked against a real 8-GPU run:
- single-GPU symmetric time grows as B^2 (fitted on the measured bf16 point at B=262144);
- the ring at W runs (single-GPU time at B) / W / eff(b), with eff taken from the measured
  W=2 and W=4 runs at the same per-rank batch b = B / W (log-linear in b between points;
  the nearest measured value outside them);
- per-rank peak memory above the inputs is linear in b, fitted on the W=4 run (the larger W
  measured; it holds more in flight than W=2);
- D=768 multiplies time and the D-proportional memory by 1.5; fp32 inputs multiply time by the
  measured single-GPU fp32/bf16 ratio at B=65536 and memory by 1.25 (fp32 inputs and grads).
"""

from __future__ import annotations

import csv
import math
import os

HERE = os.path.join(os.path.dirname(__file__), "results")


def rows(name: str) -> list[dict]:
    with open(os.path.join(HERE, name), newline="") as f:
        return list(csv.DictReader(f))


def pick(rs: list[dict], impl: str, metric: str, dtype: str = "bfloat16") -> dict[int, float]:
    return {int(r["B"]): float(r["value"]) for r in rs
            if r["impl"] == impl and r["metric"] == metric and r["dtype"] == dtype}


def main() -> None:
    one = rows("bench_loss_h100.csv")
    t1 = pick(one, "infcl_inf", "ms")
    t1_fp32 = pick(one, "infcl_inf", "ms", "float32")
    a = t1[262144] / 262144**2
    fp32_ratio = t1_fp32[65536] / t1[65536]
    eff: dict[int, float] = {}
    mem4: dict[int, float] = {}
    for name, w in (("bench_ring_w2_h100.csv", 2), ("bench_ring_w4_h100.csv", 4)):
        rs = rows(name)
        # the W=4 value wins where both exist: more ring steps, closer to W=8
        for b, e in pick(rs, "infcl_inf", "eff_vs_ref1gpu_global_sym_div_W").items():
            eff[b // w] = e
        if w == 4:
            mem4 = {b // w: m for b, m in pick(rs, "infcl_inf", "peak_gib").items()}
    per = sorted(eff)
    bs = sorted(mem4)
    slope = (mem4[bs[-1]] - mem4[bs[0]]) / (bs[-1] - bs[0])
    icpt = mem4[bs[0]] - slope * bs[0]

    def eff_at(b: int) -> float:
        if b <= per[0]:
            return eff[per[0]]
        if b >= per[-1]:
            return eff[per[-1]]
        lo = max(p for p in per if p <= b)
        hi = min(p for p in per if p >= b)
        if lo == hi:
            return eff[lo]
        x = (math.log(b) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return eff[lo] + x * (eff[hi] - eff[lo])

    w = 8
    out = []
    budget_gib = 75.0
    for d, dt in ((512, "bfloat16"), (512, "float32"), (768, "bfloat16"), (768, "float32")):
        fd = d / 512
        ft = fp32_ratio if dt == "float32" else 1.0
        fm = 1.25 if dt == "float32" else 1.0
        b_max = int((budget_gib / (fd * fm) - icpt) / slope) // 8192 * 8192 * w
        for b in (32768, 65536, 131072, 262144, 1048576, 4194304, b_max):
            pb = b // w
            ms = a * b * b / w / eff_at(pb) * fd * ft
            gib = (icpt + slope * pb) * fd * fm
            out.append(dict(impl="infcl_inf PROJECTION", B=b, D=d, dtype=dt, world=w,
                            ms=round(ms, 1), peak_gib=round(gib, 2), eff=round(eff_at(pb), 3),
                            note="eff extrapolated below b=16384" if pb < per[0] else ""))
    path = os.path.join(HERE, "projection_w8.csv")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(out[0].keys()))
        wr.writeheader()
        wr.writerows(out)
    print(f"PROJECTION for 8 x H100 (not measured), from {sorted(eff.items())}; "
          f"memory {icpt:.3f} GiB + {slope * 2**20:.3f} GiB per 2^20 rows per rank")
    for r in out:
        print(f"D={r['D']} {r['dtype']:8s} B={r['B']:>9d}: {r['ms']:>10.1f} ms  "
              f"{r['peak_gib']:6.2f} GiB/rank  (eff {r['eff']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
