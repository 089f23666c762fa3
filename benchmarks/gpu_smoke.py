"""Quick GPU checks before timing: opcheck, compile fullgraph (no graph break), ragged shapes."""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import infcl  # noqa: E402
from infcl.kernels import configs  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(fn, q, k, s, **kw):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    s = s.detach().requires_grad_()
    out = fn(q, k, s, **kw)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, s.grad, w


g = torch.Generator(device="cuda").manual_seed(1)
configs_block = configs.BWD_BLOCK
for blk in (configs_block, 300):
    configs.BWD_BLOCK = blk
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, d, sym, lab in ((1000, 1000, 300, True, False), (777, 1231, 77, False, True),
                                  (1, 1, 5, True, False), (513, 513, 1000, False, False)):
            q = torch.randn(m, d, generator=g, device="cuda").to(dt)
            k = torch.randn(n, d, generator=g, device="cuda").to(dt)
            q, k = F.normalize(q.float(), dim=-1).to(dt), F.normalize(k.float(), dim=-1).to(dt)
            s = torch.tensor(100.0, device="cuda")
            kw = dict(symmetric=sym)
            if lab:
                y = torch.randint(0, n, (m,), generator=g, device="cuda")
                y[::7] = -100
                kw["labels"] = y
            for red in ("mean", "none"):
                mine = run(infcl.inf_loss, q, k, s, reduction=red, **kw)
                w = mine[-1]
                def ref(q, k, s, **kw):
                    return infcl.naive_loss(q, k, s, **kw)
                qd, kd, sd = q.double().requires_grad_(), k.double().requires_grad_(), s.double().requires_grad_()
                out = ref(qd, kd, sd, reduction=red, **kw)
                (out * w.double()).sum().backward()
                errs = [rel(a, b) for a, b in zip(mine[:4], (out, qd.grad, kd.grad, sd.grad))]
                tol = 2e-2 if dt != torch.float32 else 5e-3
                status = "ok" if all(e <= tol for e in errs) else "FAIL"
                print(f"blk={blk} {dt} m={m} n={n} d={d} sym={sym} labels={lab} {red}: "
                      + " ".join(f"{e:.1e}" for e in errs), status, flush=True)
configs.BWD_BLOCK = configs_block

# opcheck on CUDA
q = torch.randn(100, 70, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(100, 70, device="cuda", dtype=torch.bfloat16, requires_grad=True)
s = torch.tensor(10.0, device="cuda", requires_grad=True)
y = torch.arange(100, device="cuda")
print("opcheck fwd", torch.library.opcheck(torch.ops.infcl.inf_fwd.default, (q, k, s, y, 0, True, "tf32")))

# compile fullgraph of a training step, no graph break, no recompile for a second batch size
counts = {"graphs": 0}


def counting(gm, example_inputs):
    counts["graphs"] += 1
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs)


model = torch.nn.Linear(64, 48, device="cuda", dtype=torch.bfloat16)
logit_scale = torch.nn.Parameter(torch.tensor(2.0, device="cuda"))


def loss_fn(x, t):
    return infcl.inf_loss(model(x), t, logit_scale.exp(), symmetric=True)


closs = torch.compile(loss_fn, fullgraph=True, backend=counting)


def step(x, t, fn=loss_fn):
    loss = fn(x, t)
    loss.backward()
    return loss.detach()


def cstep(x, t):
    return step(x, t, closs)
for b in (512, 640, 777):
    x = torch.randn(b, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(b, 48, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(t, 0)
    model.zero_grad()
    logit_scale.grad = None
    lc = cstep(x, t)
    gc = model.weight.grad.clone(), logit_scale.grad.clone()
    model.zero_grad()
    logit_scale.grad = None
    le = step(x, t)
    ge = model.weight.grad.clone(), logit_scale.grad.clone()
    print(f"compile B={b}: loss {lc.item():.5f} eager {le.item():.5f} "
          f"dW rel {rel(gc[0], ge[0]):.1e} dscale rel {rel(gc[1], ge[1]):.1e} graphs={counts['graphs']}")
print("compile graphs total:", counts["graphs"], "(1 expected: no recompile)")
