"""A 1 x 1 x 1 fp32 symmetric problem at every precision: the statistics and gradients the
kernels give, in float64, beside torch's (the exact gradient is 0). Run on the GPU."""
import sys

import torch

sys.path.insert(0, "tests")
from strategies import Problem  # noqa: E402

import infcl  # noqa: E402

for prec in ("tf32x3", "ieee", "tf32"):
    for seed in range(4):
        q, k = (x.cuda() for x in Problem(m=1, n=1, d=1, symmetric=True, scale=44.0, unit=False,
                                          seed=seed).inputs())
        s = torch.tensor(44.0, device="cuda")
        y = torch.arange(1, device="cuda")
        row, col, pos = torch.ops.infcl.inf_fwd(q, k, s, y, 0, True, 0, prec)
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        infcl.inf_loss(qq, kk, 44.0, symmetric=True, precision=prec).backward()
        print(prec, seed, "q", q.item(), "k", k.item(), "S64", (44.0 * q.double() * k.double()).item(),
              "row", row.item(), "col", col.item(), "pos", pos.item(), "dq", qq.grad.item(),
              "dk", kk.grad.item())
