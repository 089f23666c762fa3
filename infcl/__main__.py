"""`python -m infcl`: this machine's versions, the path each loss takes, and a quick check.

The check computes the CLIP loss and its gradients with `inf_loss` and `inf_sigmoid_loss` on
random unit features (B = 1000, D = 100; bf16 on a GPU, fp32 on a CPU) and compares them with
`naive_loss` in float64, beside naive's own error in the same dtype. It takes seconds.
"""

from __future__ import annotations

import platform
import sys

import torch
import torch.nn.functional as F

import infcl
from infcl import inf, ops


def _grads(fn, q, k, *params, **kw):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    loss = fn(q, k, *params, **kw)
    loss.backward()
    return [loss.detach().double(), q.grad.double(), k.grad.double()]


def _err(x, ref):
    return float((x - ref).norm() / max(float(ref.norm()), 1.0))


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"infcl {infcl.__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {triton_version}")
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        print(f"device: {torch.cuda.get_device_name()} (compute capability {major}.{minor}), "
              f"CUDA {torch.version.cuda}")
    else:
        print("device: CPU (no CUDA device visible to torch)")
    probe = torch.empty(1, dtype=dtype, device=device)
    path = {"inf": "Triton kernels", "chunked": "torch tiles"}[inf._block(probe)]
    if path == "Triton kernels" and ops.INTERPRET:
        path += " (interpreted: TRITON_INTERPRET=1)"
    print(f"{dtype} inputs: inf_loss and inf_sigmoid_loss run {path}; chunked_loss and ring_loss "
          f"torch tiles; naive_loss materialised logits")
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(1000, 100, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(1000, 100, generator=gen, dtype=torch.float64), dim=1)
    ok = True
    checks = [("inf_loss", infcl.inf_loss, infcl.naive_loss, {"symmetric": True}),
              ("inf_sigmoid_loss", infcl.inf_sigmoid_loss, infcl.naive_sigmoid_loss, {})]
    for name, fn, naive, kw in checks:
        args = (14.3,) if naive is infcl.naive_loss else (10.0, -10.0)
        truth = _grads(naive, q, k, *args, **kw)
        low = [x.to(dtype).to(device) for x in (q, k)]
        same = [x.cpu() for x in _grads(naive, *low, *args, **kw)]
        got = [x.cpu() for x in _grads(fn, *low, *args, **kw)]
        errs = [(_err(g, t), _err(s, t)) for g, s, t in zip(got, same, truth, strict=True)]
        floor = 2e-2 if dtype == torch.bfloat16 else 1e-5
        passed = all(e <= 2 * e_ref + floor for e, e_ref in errs)
        ok &= passed
        shown = ", ".join(f"{n} {e:.1e} (naive {e_ref:.1e})"
                          for n, (e, e_ref) in zip(("loss", "dq", "dk"), errs, strict=True))
        verdict = 'agrees with' if passed else 'DIFFERS FROM'
        print(f"{name}: {verdict} {naive.__name__} in float64: {shown}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
