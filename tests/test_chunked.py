"""chunked_loss computes the spec (forward and dq, dk, dscale) without ever holding M x N."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_naive, poisoned_memory, run
from hypothesis import example, given
from strategies import CHUNK_SIZES, Problem, problems

from infcl import chunked_loss, naive_loss

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LABELS_61_67 = tuple(-100 if i % 5 == 0 else (7 * i) % 67 for i in range(61))
LABELS_61_67_IGNORE_7 = tuple(7 if y == -100 else y for y in LABELS_61_67)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@given(p=problems(), chunk_size=CHUNK_SIZES)
@example(p=Problem(m=1, n=1, d=1), chunk_size=None)
@example(p=Problem(m=1, n=1, d=3, symmetric=True, reduction="none"), chunk_size=1)
@example(p=Problem(m=13, n=13, d=5, reduction="sum", scale_is_tensor=True), chunk_size=1)
@example(p=Problem(m=13, n=13, d=5, symmetric=True, scale_is_tensor=True), chunk_size=100)
@example(
    p=Problem(m=61, n=67, d=33, labels=LABELS_61_67, scale=14.285714, scale_is_tensor=True),
    chunk_size=7,
)
@example(
    p=Problem(m=61, n=67, d=33, labels=LABELS_61_67_IGNORE_7, ignore_index=7, reduction="none"),
    chunk_size=8,
)
@example(
    p=Problem(m=40, n=40, d=47, symmetric=True, scale=100.0, scale_is_tensor=True, unit=True),
    chunk_size=3,
)
@example(p=Problem(m=40, n=40, d=47, scale=100.0, unit=True, reduction="none"), chunk_size=None)
@example(p=Problem(m=9, n=9, d=2, ignore_index=7, reduction="mean"), chunk_size=4)
@example(p=Problem(m=3, n=5, d=4, labels=(-100, -100, -100), scale_is_tensor=True), chunk_size=2)
@example(  # found by Hypothesis: float32 gradients far less precise than naive's
    p=Problem(m=3, n=2, d=1, labels=(-100, 0, -100), scale=16.0, seed=688), chunk_size=None
)
def test_matches_naive(dtype, p, chunk_size):
    q, k = p.inputs()
    assert_close_to_naive(
        chunked_loss, q, k, p.scale_for(dtype), dtype=dtype, seed=p.seed,
        chunk_size=chunk_size, **p.kwargs(),
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_fp32_precision_of_trained_clip_batch(symmetric):
    """Late-training CLIP: unit rows, scale 100, each q near its own k (mean loss about 0.17).

    dscale is small here (the row terms nearly cancel), so it is compared purely relatively
    (norm_floor=0). naive keeps each row's max apart from its log-sum-exp (log_softmax), so
    `S - max` is exact; recomputing probabilities as `exp(S - lse)` from an lse rounded at
    magnitude |S| ~ 100 costs about log2(100) bits, and the float32 dscale comes out 30-60x
    worse than naive's. Keeping (row max, log-sum) apart, as log_softmax does, restored naive's
    precision in a prototype.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    q = F.normalize(x + 0.7 * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    k = F.normalize(x)
    assert_close_to_naive(
        chunked_loss, q, k, torch.tensor(100.0), dtype=torch.float32, norm_floor=0.0,
        symmetric=symmetric, chunk_size=16,
    )


def test_poisoned_memory_exposes_unwritten_outputs():
    def leaky(q, k, scale, **kw):
        out = torch.empty(2, dtype=torch.float32)
        out[0] = naive_loss(q, k, scale, **kw)
        return out.sum()

    q = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with poisoned_memory():
        assert torch.isnan(leaky(q, q, 1.0))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    ("norm", "scale"), [(1.0, 100.0), (100.0, 1.0)], ids=["unit-scale100", "norm100-scale1"]
)
def test_large_logits_are_stable(norm, scale, symmetric):
    """Logits up to +-1e4 must not overflow: the loss is finite and equals the float64 spec."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(37, 11, generator=gen, dtype=torch.float64)
    k = torch.randn(37, 11, generator=gen, dtype=torch.float64)
    q = norm * q / q.norm(dim=1, keepdim=True)
    k = norm * k / k.norm(dim=1, keepdim=True)
    assert (scale * q @ k.T).abs().max() > 0.5 * scale * norm**2
    for dtype in (torch.float32, torch.float64):
        loss = chunked_loss(q.to(dtype), k.to(dtype), scale, symmetric=symmetric, chunk_size=5)
        assert torch.isfinite(loss)
    assert_close_to_naive(
        chunked_loss, q, k, scale, dtype=torch.float32, symmetric=symmetric, chunk_size=5
    )
    assert_close_to_naive(
        chunked_loss, q, k, scale, dtype=torch.float64, symmetric=symmetric, chunk_size=5
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_non_finite_inputs_propagate(bad, where, symmetric):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(9, 4, generator=gen)
    k = torch.randn(9, 4, generator=gen)
    (q if where == "q" else k)[3, 1] = bad
    for reduction in ("mean", "sum"):
        loss = chunked_loss(q, k, 2.0, symmetric=symmetric, reduction=reduction, chunk_size=4)
        assert not torch.isfinite(loss), reduction
    per_row = chunked_loss(q, k, 2.0, symmetric=symmetric, reduction="none", chunk_size=4)
    assert not torch.isfinite(per_row[3])


@pytest.mark.parametrize(
    "kw",
    [
        {"labels": torch.tensor([4, -100, 0, 6, 2]), "reduction": "none"},
        {"labels": torch.tensor([4, 7, 0, 7, 2]), "ignore_index": 7},
        {"symmetric": True, "reduction": "sum"},
    ],
    ids=["labels-none", "ignore-7-mean", "symmetric-sum"],
)
def test_gradcheck(kw):
    """The custom backward against finite differences, independently of naive."""
    gen = torch.Generator().manual_seed(7)
    m, n = (5, 5) if kw.get("symmetric") else (5, 8)
    q = torch.randn(m, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, s: chunked_loss(q, k, s, chunk_size=2, **kw), (q, k, scale)
    )


def _saved_numels(fn, q, k, scale, **kw):
    numels = []

    def pack(x):
        numels.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run(fn, q, k, scale, **kw)
    return numels


@pytest.mark.parametrize("symmetric", [False, True])
def test_autograd_saves_nothing_m_by_n(symmetric):
    m, d = 2048, 8
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
    scale = torch.tensor(10.0)
    naive = _saved_numels(naive_loss, q, k, scale, symmetric=symmetric)
    assert max(naive) >= m * m, "the hook must see an M x N tensor saved by naive"
    saved = _saved_numels(chunked_loss, q, k, scale, symmetric=symmetric, chunk_size=64)
    assert m * d in saved, "the hook must see q saved by the chunked op"
    assert max(saved) < m * m, f"chunked saved a tensor of {max(saved)} elements"


@pytest.mark.parametrize("symmetric", [False, True])
def test_no_m_by_n_tensor_in_forward_or_backward(symmetric):
    """Every aten op run by forward and backward sees at most a chunk_size x N strip."""
    m, d, chunk = 2048, 8, 64
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)

    def biggest(fn, **kw):
        with torch.profiler.profile(record_shapes=True, profile_memory=True) as prof:
            run(fn, q, k, torch.tensor(10.0), symmetric=symmetric, **kw)
        shapes = [
            torch.Size(s).numel()
            for e in prof.events() for s in e.input_shapes if isinstance(s, list) and s
        ]
        allocated = [e.cpu_memory_usage for e in prof.events()]
        return max(shapes), max(allocated)

    naive_shape, naive_bytes = biggest(naive_loss)
    assert naive_shape >= m * m and naive_bytes >= 4 * m * m, "the profiler must see naive's logits"
    shape, allocated = biggest(chunked_loss, chunk_size=chunk)
    assert shape > m * d, "the profiler must see the strips inside the chunked ops"
    assert shape <= chunk * m, shape
    assert allocated < 4 * m * m, allocated


def _op_args(gen, m=11, n=7, d=5, dtype=torch.float32):
    q = torch.randn(m, d, generator=gen, dtype=dtype, requires_grad=True)
    k = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    scale = torch.tensor(3.0, requires_grad=True)
    labels = torch.randint(0, n, (m,), generator=gen)
    labels[2] = -100
    return q, k, scale, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_fwd(dtype, symmetric):
    gen = torch.Generator().manual_seed(5)
    q, k, scale, labels = _op_args(gen, dtype=dtype)
    if symmetric:  # the symmetric case: diagonal positives, M == N
        k = torch.randn(q.shape, generator=gen, dtype=dtype, requires_grad=True)
        labels = torch.arange(q.shape[0])
    for chunk_size in (0, 1, 4, 100):
        torch.library.opcheck(
            torch.ops.infcl.chunked_fwd.default, (q, k, scale, labels, 0, symmetric, chunk_size, "tf32")
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_opcheck_bwd(dtype, symmetric):
    gen = torch.Generator().manual_seed(6)
    q, k, scale, labels = _op_args(gen, m=9, n=9, dtype=dtype)
    q, k, scale = q.detach(), k.detach(), scale.detach()
    row, col, _ = torch.ops.infcl.chunked_fwd(q, k, scale, labels, 0, symmetric, 0, "tf32")
    acc = row.dtype
    g_row = torch.randn(9, generator=gen, dtype=acc)
    g_col = torch.randn(col.shape, generator=gen, dtype=acc)
    g_pos = torch.randn(9, generator=gen, dtype=acc)
    for chunk_size in (0, 2, 100):
        torch.library.opcheck(
            torch.ops.infcl.chunked_bwd.default,
            (q, k, scale, labels, 0, row, col, g_row, g_col, g_pos, chunk_size, "tf32"),
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("symmetric", [False, True])
def test_bwd_into_adds_to_accumulators(dtype, symmetric):
    """`infcl::chunked_bwd_into` (the ring's step) adds the gradients of `infcl::chunked_bwd`
    into accumulators holding other blocks' sums, in the accumulation dtype (opcheck: schema,
    fake, the mutation declared)."""
    gen = torch.Generator().manual_seed(7)
    q, k, scale, labels = (x.detach() for x in _op_args(gen, m=9, n=9, dtype=dtype))
    row, col, _ = torch.ops.infcl.chunked_fwd(q, k, scale, labels, 0, symmetric, 0, "tf32")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g_row, g_pos = (torch.randn(9, generator=gen, dtype=acc) for _ in range(2))
    g_col = torch.randn(col.shape, generator=gen, dtype=acc)
    args = (q, k, scale, labels, 3, row, col, g_row, g_col, g_pos, 2, "tf32")
    dq0, dk0 = (torch.randn(9, 5, generator=gen, dtype=acc) for _ in range(2))
    dq, dk = dq0.clone(), dk0.clone()
    dscale = torch.ops.infcl.chunked_bwd_into(*args, dq, dk)
    want = torch.ops.infcl.chunked_bwd(*args)
    # chunked_bwd rounds its gradients to the input dtype once; the accumulators stay in acc
    rtol, atol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6),
                  torch.bfloat16: (1e-2, 1e-3)}[dtype]
    for got, base, ref in ((dq, dq0, want[0]), (dk, dk0, want[1])):
        assert got.dtype == acc
        torch.testing.assert_close(got - base, ref.to(acc), rtol=rtol, atol=atol)
    torch.testing.assert_close(dscale.to(scale.dtype), want[2], rtol=1e-5, atol=1e-6)
    torch.library.opcheck(torch.ops.infcl.chunked_bwd_into.default, (*args, dq, dk))
    s_args = (q, k, scale, torch.tensor(-1.0), labels, 3, g_row, 2, "tf32")
    torch.library.opcheck(torch.ops.infcl.chunked_sigmoid_bwd_into.default, (*s_args, dq, dk))
