"""Precision the PyTorch way: float32 follows torch's matmul precision, autocast runs the
low-precision path, and TF32 rounds its inputs to nearest as cuBLAS does."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import FLOOR, rel_err

import infcl
from infcl import inf
from infcl.kernels import configs

INTERPRET = configs.INTERPRET
needs_interpret = pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def matmul_precision():
    """Set torch's float32 matmul precision for one test; restored after it."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize(
    ("torch_setting", "want"),
    [("highest", configs.HIGHEST), ("high", "tf32"), ("medium", "tf32")],
)
def test_default_precision_follows_torch(matmul_precision, torch_setting, want):
    matmul_precision(torch_setting)
    assert configs.resolve_precision("default") == want
    for explicit in configs.PRECISIONS:
        assert configs.resolve_precision(explicit) == explicit


def test_pytorch_default_is_not_tf32():
    """A drop-in loss is not less precise than what it replaces unless asked: PyTorch's default
    float32 matmul precision is "highest", and so is infcl's."""
    assert torch.get_float32_matmul_precision() == "highest"
    assert configs.resolve_precision("default") != "tf32"


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen), dim=1)


def _loss_and_grads(fn, q, k, scale, **kw):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    s = torch.tensor(scale, requires_grad=True)
    loss = fn(q, k, s, **kw)
    loss.backward()
    return loss.detach(), q.grad, k.grad, s.grad


AUTOCAST_LOSSES = [infcl.chunked_loss, infcl.inf_loss, infcl.ring_loss]


@pytest.mark.interpret
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("fn", AUTOCAST_LOSSES, ids=lambda f: f.__name__)
def test_autocast_computes_in_the_autocast_dtype(fn, compiled):
    """Under autocast fp32 features take the bf16 path: the same numbers as bf16 inputs, the loss
    in float32, the gradients back in float32 (the features' dtype). Under the interpreter
    inf_loss runs the Triton kernels; on a plain CPU run, the torch tiles."""
    q, k = _features(19, 12, 0), _features(19, 12, 1)
    want = _loss_and_grads(fn, q.bfloat16(), k.bfloat16(), 9.0, symmetric=True)

    def under_autocast(q, k, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(q, k, s, symmetric=True)

    if compiled:
        torch._dynamo.reset()
        under_autocast = torch.compile(under_autocast, backend="aot_eager", fullgraph=True)
    got = _loss_and_grads(under_autocast, q, k, 9.0)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


def test_autocast_leaves_float64_alone():
    q, k = _features(9, 5, 2).double(), _features(9, 5, 3).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = infcl.chunked_loss(q, k, 4.0, symmetric=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, infcl.naive_loss(q, k, 4.0, symmetric=True))


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest (ties away) to TF32's 10 mantissa bits, in torch (the reference)."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.interpret
@needs_interpret
def test_tf32_rounds_inputs_to_nearest_interpreted():
    """precision="tf32" multiplies the inputs rounded to nearest TF32: the loss equals naive on
    those rounded inputs, and not naive on the truncated ones (Triton's own "tf32")."""
    q, k = _features(37, 40, 4), _features(37, 40, 5)
    assert inf._block(q) == "inf"
    got = _loss_and_grads(infcl.inf_loss, q, k, 30.0, symmetric=True, precision="tf32")
    rounded = [x.double() for x in (_round_tf32(q), _round_tf32(k))]
    truncated = [(x.view(torch.int32) & ~0x1FFF).view(torch.float32).double() for x in (q, k)]
    want = infcl.naive_loss(*rounded, 30.0, symmetric=True)
    off = infcl.naive_loss(*truncated, 30.0, symmetric=True)
    assert rel_err(got[0], want) <= FLOOR[torch.float32]
    assert rel_err(off, want) > 10 * rel_err(got[0], want)


@pytest.mark.interpret
@needs_interpret
def test_tf32_rounding_keeps_nan_and_inf_interpreted():
    q, k = _features(9, 8, 6), _features(9, 8, 7)
    q[2, 3] = float("nan")
    assert torch.isnan(infcl.inf_loss(q, k, 2.0, precision="tf32"))
    q[2, 3] = float("inf")
    assert not torch.isfinite(infcl.inf_loss(q, k, 2.0, precision="tf32"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "bound"), [("tf32", 2e-5), ("tf32x3", 1e-6), ("ieee", 1e-6)])
def test_fp32_logits_are_unbiased_cuda(precision, bound):
    """The signed mean relative error of the logits (read through the positive logits of random
    labels, 2048 x 2048 unit vectors, D = 512): TF32 truncation gives about -7e-4, cuBLAS's
    rounded TF32 about -1e-6."""
    gen = torch.Generator().manual_seed(8)
    q, k = _features(2048, 512, 8).cuda(), _features(2048, 512, 9).cuda()
    y = torch.randint(0, 2048, (2048,), generator=gen).cuda()
    s = torch.ones((), device="cuda")
    _, _, pos = torch.ops.infcl.inf_fwd(q, k, s, y, 0, False, 0, precision)
    exact = (q.double() * k.double()[y]).sum(1)
    bias = float((pos.double() - exact).sum() / exact.abs().sum())
    assert abs(bias) < bound, bias


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["ieee", None])
@pytest.mark.parametrize(("b", "d", "scale"), [
    (4099, 384, 14.3), (1000, 1000, 50.0),
    (130, 1030, 100.0),  # one FMA chain over D erred 3.3x naive here (dq, dk); see qk_tile
], ids=str)
def test_fp32_within_twice_ieee_naive_cuda(precision, b, d, scale):
    """`precision="ieee"` (and the default under PyTorch's "highest") errs at most twice as much as
    naive with IEEE cuBLAS in every quantity, with no absolute floor: B past and below the
    tiles, D not a multiple of them, scale up to 100."""
    from helpers import judge, run

    from infcl.kernels.logits import matmul_precision

    q, k = _features(b, d, 12).cuda(), _features(b, d, 13).cuda()
    s = torch.tensor(scale, device="cuda")
    truth = run(infcl.naive_loss, q.double(), k.double(), s.double(), symmetric=True)
    with matmul_precision("ieee"):
        ref = run(infcl.naive_loss, q, k, s, symmetric=True)
    got = run(infcl.inf_loss, q, k, s, symmetric=True, precision=precision)
    verdict = judge(got, ref, truth, dtype=torch.float32, floor=0.0)
    assert verdict.ok, "\n".join(verdict.lines)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fn", [infcl.inf_loss, infcl.inf_sigmoid_loss], ids=lambda f: f.__name__)
def test_autocast_computes_in_the_autocast_dtype_cuda(fn):
    """Under CUDA autocast fp32 features take the bf16 Triton path: the numbers of bf16 inputs,
    the loss in float32, the gradients in float32."""
    q, k = _features(300, 70, 10).cuda(), _features(300, 70, 11).cuda()
    kw = {"symmetric": True} if fn is infcl.inf_loss else {}
    want = _loss_and_grads(fn, q.bfloat16(), k.bfloat16(), 9.0, **kw)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = _loss_and_grads(fn, q, k, 9.0, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


@pytest.mark.parametrize(("setting", "want"), [("tf32", "tf32"), ("ieee", configs.HIGHEST)])
def test_default_precision_follows_torchs_newer_setting(setting, want):
    """`torch.backends.cuda.matmul.fp32_precision` (after which the older setting's getter
    raises): resolved from it, and cuBLAS's setting restored after a backward."""
    from infcl.kernels.logits import matmul_precision

    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = setting
    try:
        assert configs.resolve_precision("default") == want
        with matmul_precision("tf32" if setting == "ieee" else "ieee"):
            assert matmul.fp32_precision != setting
        assert matmul.fp32_precision == setting
        q = _features(9, 5, 12).requires_grad_()
        infcl.inf_loss(q, _features(9, 5, 13), 3.0, symmetric=True).backward()
    finally:
        matmul.fp32_precision = "none"
    assert torch.get_float32_matmul_precision() == "highest"
