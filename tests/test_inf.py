"""inf_loss against the spec: its Triton kernels through the interpreter on CPU (marker
`interpret`, run with TRITON_INTERPRET=1), on CUDA when present (marker `gpu`), and its torch
fallback on a plain CPU run. Also the Inf-CL defects of ANCHORS.md that apply to one device."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOOR,
    Allocations,
    OpLog,
    aligned,
    assert_close_to_naive,
    round_tf32,
    run,
    runs_tf32,
    tma_everywhere,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from strategies import Problem, problems

import infcl
from infcl import inf
from infcl.kernels import configs, lse_bwd, lse_fwd
from infcl.kernels.logits import matmul_precision, use_tma

INTERPRET = configs.INTERPRET
HAS_CUDA = torch.cuda.is_available()
interpret = pytest.mark.interpret
needs_interpret = pytest.mark.skipif(not INTERPRET, reason="set TRITON_INTERPRET=1 (make test does)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
SMALL = st.integers(1, 40) | st.sampled_from([1, 17, 31, 37])


@pytest.fixture(scope="module")
def small_blocks():
    """Several forward partitions and backward blocks even at the interpreter's small shapes
    (module scope: Hypothesis examples share it, and nothing mutates it)."""
    saved = configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK
    configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK = 2, 2, 24
    yield
    configs.PARTS, configs.BWD_PARTS, configs.BWD_BLOCK = saved


TINY_K_TF32 = 2.0**-10
"""cuBLAS runs products of tiny D off the tensor cores even with TF32 allowed (H200: D=1 under
"TF32" had IEEE errors), so the TF32 reference has no TF32 error to scale. Below D=8 the
reference takes inputs rounded to TF32 (`helpers.round_tf32`), and the floor TF32's own error:
inputs rounded to 2^-11 relative each, logits off by up to 2^-10 * |S|. (The floor alone missed
dscale at m = n = 257, D = 1, unit=False: its terms cancel, 0.020 against 0.0104.)"""


def check(p: Problem, dtype: torch.dtype, device: str, **kw) -> None:
    q, k = p.inputs()
    kwargs = p.kwargs()
    if kwargs["labels"] is not None:
        kwargs["labels"] = kwargs["labels"].to(device)
    tf32 = runs_tf32(dtype, device, kw.get("precision"))
    floor = FLOOR["tf32" if tf32 else dtype]
    # The backward recomputes S with other tile shapes than the forward, so S may differ from
    # the forward's by an ulp: probabilities then carry an absolute error of about eps * |S|
    # (flash attention has the same property). Naive reuses one S and has no such term.
    s_max = float(abs(p.scale) * (q.double() @ k.double().T).abs().max())
    floor += 8 * torch.finfo(torch.float32).eps * s_max
    tiny_tf32 = tf32 and p.d < 8
    if tiny_tf32:  # see TINY_K_TF32
        floor += TINY_K_TF32 * s_max
    scale = p.scale_for(dtype)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device)
    with matmul_precision("tf32" if tf32 else "ieee"):  # the same-dtype reference's too
        assert_close_to_naive(
            infcl.inf_loss, q.to(device), k.to(device), scale, dtype=dtype, floor=floor,
            seed=p.seed, ref_inputs=round_tf32 if tiny_tf32 else None, **kwargs, **kw,
        )


@interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@settings(max_examples=10)
@given(p=problems(rows=SMALL))
@example(p=Problem(m=37, n=37, d=33, symmetric=True, scale=100.0, unit=True, seed=1))
@example(p=Problem(m=31, n=40, d=20, labels=tuple([3, -100] * 15 + [39]), reduction="sum"))
@example(p=Problem(m=1, n=1, d=1, seed=2))
def test_kernels_match_naive_interpreted(small_blocks, dtype, p):
    assert inf._block(torch.empty(1, dtype=dtype)) == "inf", "the Triton kernels must be tested"
    check(p, dtype, "cpu", precision="ieee")


def check_tma(p: Problem, dtype: torch.dtype, device: str) -> None:
    q, k = (x.to(dtype).to(device) for x in p.inputs())
    assert use_tma(q, k), "the descriptor path must be the one tested"
    check(p, dtype, device)


@interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=8)
@given(p=problems(rows=SMALL).map(aligned))
@example(p=Problem(m=37, n=37, d=40, symmetric=True, scale=100.0, unit=True, seed=1))
def test_tma_path_interpreted(small_blocks, dtype, p):
    """Tiles loaded through TMA descriptors (zero-filled past the edges instead of masked)."""
    with tma_everywhere():
        check_tma(p, dtype, "cpu")


def underflowing_column(m: int, d: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows that all point one way but for key 0, which points the other way: at scale
    100 each row's largest logit is about +100 and every logit of column 0 about -100, so the
    column terms `exp(S - R)` of the separable column sums (`lse_fwd.SEPARABLE`) underflow."""
    gen = torch.Generator().manual_seed(3)
    q = torch.zeros(m, d, dtype=torch.float64)
    q[:, 0] = 1
    q[:, 1:] = 0.01 * torch.randn(m, d - 1, generator=gen, dtype=torch.float64)
    k = q.clone()
    k[0] = -q[0]
    return F.normalize(q, dim=1).to(device), F.normalize(k, dim=1).to(device)


def check_underflowing_column(device: str, m: int, d: int) -> None:
    q64, k64 = underflowing_column(m, d, device)
    for dtype in (torch.bfloat16, torch.float16):
        q, k = q64.to(dtype), k64.to(dtype)
        s = torch.tensor(100.0, device=device)
        _, col, _ = lse_fwd.lse_fwd(q, k, s, torch.arange(m, device=device), 0, True, "ieee")
        want = torch.logsumexp(100.0 * (q.double() @ k.double().T), dim=0)
        torch.testing.assert_close(col, want, rtol=1e-6, atol=1e-5)
        assert_close_to_naive(infcl.inf_loss, q64, k64, 100.0, dtype=dtype, symmetric=True)


def check_terms_far_below_their_rows(device: str, m: int) -> None:
    """Rows 0..m-2 have their best logit near +100 and -10 in column 0; row m-1 has 0 in every
    column. Column 0's LSE is `log(1 + (m - 1) e^-10)`: its terms from the first rows lie 110
    below their own rows' best, where `exp(S - r_i)` alone flushes to 0 (even as a subnormal),
    but far above the column's underflow line (`lse_fwd.ROW_SHIFT`)."""
    q64 = torch.zeros(m, 5, dtype=torch.float64)
    q64[:-1, 0], q64[:-1, 1], q64[-1, 2] = -0.1, 0.99**0.5, 1.0
    k64 = torch.zeros(m, 5, dtype=torch.float64)
    k64[0, 0], k64[1:, 1] = 1.0, 1.0
    for dtype in (torch.bfloat16, torch.float16):
        q, k = q64.to(dtype).to(device), k64.to(dtype).to(device)
        s = torch.tensor(100.0, device=device)
        row, col, _ = lse_fwd.lse_fwd(q, k, s, torch.arange(m, device=device), 0, True, "ieee")
        logits = 100.0 * (q.double() @ k.double().T)
        # the separable terms carry fp32 rounding of `S - R`, about 1e-5 at |S - R| = 100; the
        # terms lost to a flush would leave 1.8e-3 at m = 41
        torch.testing.assert_close(col, torch.logsumexp(logits, dim=0), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(row, torch.logsumexp(logits, dim=1), rtol=1e-6, atol=1e-5)
        # the backward: column 0's LSE lies about 100 below its rows' (`lse_bwd.SEPARABLE_SPAN`)
        assert_close_to_naive(infcl.inf_loss, q.double(), k.double(), 100.0, dtype=dtype,
                              symmetric=True)


@interpret
@needs_interpret
def test_separable_columns_keep_terms_far_below_their_rows_interpreted(small_blocks):
    check_terms_far_below_their_rows("cpu", 41)


@interpret
@needs_interpret
def test_separable_columns_recomputed_where_they_underflow_interpreted(small_blocks):
    """Column 0's terms all underflow in the separable sums: the merge finds the column
    (`FLUSH_MARGIN`) and recomputes it exactly, so its LSE is about -100 + log(M), not -inf."""
    check_underflowing_column("cpu", 40, 16)


@interpret
@needs_interpret
def test_opcheck_interpreted(small_blocks):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(19, 7, generator=gen, requires_grad=True)
    k = torch.randn(23, 7, generator=gen, requires_grad=True)
    s = torch.tensor(3.0, requires_grad=True)
    y = torch.randint(0, 23, (19,), generator=gen)
    torch.library.opcheck(torch.ops.infcl.inf_fwd.default, (q, k, s, y, 0, False, 0, "ieee"))
    q2, k2 = q[:, :], torch.randn(19, 7, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.infcl.inf_fwd.default, (q2, k2, s, torch.arange(19), 0, True,
                                                             0, "ieee"))
    row, col = torch.randn(19), torch.randn(23)
    g = torch.randn(19), torch.randn(23), torch.randn(19)
    torch.library.opcheck(torch.ops.infcl.inf_bwd.default,
                          (q.detach(), k.detach(), s.detach(), y, 0, row, col, *g, 0, "ieee"))


@interpret
@needs_interpret
def test_symmetric_pays_once_and_keeps_low_precision(small_blocks):
    """Defects 3 and 9: bf16 goes to the kernels as bf16 (no fp32 copies of q, k), and the CLIP
    loss is one forward op and one backward op, not one per direction."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(29, 12, generator=gen).bfloat16().requires_grad_()
    k = torch.randn(29, 12, generator=gen).bfloat16().requires_grad_()
    with OpLog() as log:
        infcl.inf_loss(q, k, 10.0, symmetric=True).backward()
    names = [n for n, _ in log.calls]
    assert names == ["infcl.inf_fwd.default", "infcl.inf_bwd.default"], names
    for _, dtypes in log.calls:
        assert dtypes[:2] == [torch.bfloat16, torch.bfloat16]
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16


HELD_CASES = {
    "symmetric": lambda q, k, s: infcl.inf_loss(q, k, s, symmetric=True),
    "one direction, sum": lambda q, k, s: infcl.inf_loss(q, k, s, reduction="sum"),
    "labels with ignored rows": lambda q, k, s: infcl.inf_loss(
        q, k, s, labels=torch.tensor([3, -100, 40, 0] * 9 + [-100], device=q.device)),
    "sigmoid": lambda q, k, s: infcl.inf_sigmoid_loss(q, k, s, -5.0),
    "sigmoid, sum": lambda q, k, s: infcl.inf_sigmoid_loss(q, k, s, -5.0, reduction="sum"),
}


def held_gradients_agree(fn, q, k, s) -> None:
    """The eager "mean"/"sum" path (`ops._Held`: the gradients formed with the loss, the
    launchers called straight) against the ops' path (taken under a dispatch mode): the same
    loss and gradients; the held gradients become `.grad` without a copy; a retained graph's
    second backward sweeps again for its own incoming gradient."""
    def leaves():
        return [x.detach().clone().requires_grad_() for x in (q, k, s)]

    eager = leaves()
    loss = fn(*eager)
    assert type(loss.grad_fn).__name__ == "_HeldBackward", loss.grad_fn
    held = [x.data_ptr() for x in loss.grad_fn.held[:2]]
    loss.backward()
    assert [eager[0].grad.data_ptr(), eager[1].grad.data_ptr()] == held  # taken, not copied
    ops_path = leaves()
    with OpLog() as log:
        loss_ops = fn(*ops_path)
        loss_ops.backward()
    assert log.names and all(not n.startswith("_") for n in log.names)
    torch.testing.assert_close(loss.detach(), loss_ops.detach(), rtol=1e-6, atol=0)
    for a, b in zip(eager, ops_path, strict=True):  # the same kernels and row weights
        rtol = 2**-8 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-7)
    scaled = leaves()
    (0.75 * fn(*scaled)).backward()  # the held gradients scaled in place (fp32, one rounding)
    for a, b in zip(scaled, ops_path, strict=True):
        rtol = 2**-8 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a.grad, 0.75 * b.grad, rtol=rtol, atol=1e-7)
    again = leaves()
    loss = fn(*again)
    once = torch.autograd.grad(loss, again, retain_graph=True)
    (2.5 * loss).backward(retain_graph=True)
    loss.backward()
    for g1, leaf in zip(once, again, strict=True):
        # another sweep: the GEMMs round dS * 2.5 afresh, and bf16 `.grad` rounds each sum
        tol = (2**-7 if g1.dtype == torch.bfloat16 else 1e-5) * 3.5 * float(g1.abs().max())
        torch.testing.assert_close(leaf.grad, 3.5 * g1, rtol=1e-5, atol=tol)
    with pytest.raises(RuntimeError, match="cannot differentiate its gradients"):
        fresh = leaves()
        torch.autograd.grad(fn(*fresh), fresh[0], create_graph=True)


@interpret
@needs_interpret
@pytest.mark.parametrize("case", HELD_CASES)
def test_eager_held_gradients_interpreted(small_blocks, case):
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(37, 21, generator=gen), torch.randn(41 if "labels" in case else 37, 21,
                                                           generator=gen)
    held_gradients_agree(HELD_CASES[case], q, k, torch.tensor(4.0))


@interpret
@needs_interpret
def test_eager_held_gradients_edges_interpreted(small_blocks):
    """Every label ignored: a NaN loss (0 / 0) and zero gradients, as naive and
    `F.cross_entropy` give. An input changed in place between the forward and the backward
    makes the backward raise (as for any saved tensor). After the backward nothing of the
    inputs is kept alive by a loss that is still referenced."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(8)
    q = torch.randn(13, 9, generator=gen).requires_grad_()
    k = torch.randn(17, 9, generator=gen).requires_grad_()
    s = torch.tensor(3.0, requires_grad=True)
    ignored = torch.full((13,), -100)
    loss = infcl.inf_loss(q, k, s, labels=ignored)
    ref = infcl.naive_loss(q.detach().double().requires_grad_(), k.detach().double(), 3.0,
                           labels=ignored)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss.backward()
    assert q.grad.eq(0).all() and k.grad.eq(0).all() and s.grad.eq(0), (q.grad, s.grad)

    for fn in (lambda q, k: infcl.inf_loss(q, k, 3.0, symmetric=True),
               lambda q, k: infcl.inf_sigmoid_loss(q, k, 3.0, -2.0)):
        q2 = torch.randn(13, 9, generator=gen).requires_grad_()
        k2 = torch.randn(13, 9, generator=gen).requires_grad_()
        x = q2 * 1.0  # a non-leaf that can be changed in place
        loss = fn(x, k2)
        with torch.no_grad():
            x.mul_(2.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()

        x = q2 * 1.0
        alive = weakref.ref(x)
        loss = fn(x, k2)
        loss.backward()
        del x
        gc.collect()
        assert alive() is None, "the loss keeps its input alive after the backward"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", HELD_CASES)
def test_eager_held_gradients_cuda(case):
    """As the interpreted test, with the real tiles in bf16, and the backward's peak: the held
    gradients are scaled in place and handed over, never copied."""
    gen = torch.Generator().manual_seed(6)
    m, n, d = 4099, 4103 if "labels" in case else 4099, 384
    q = torch.randn(m, d, generator=gen).cuda().bfloat16()
    k = torch.randn(n, d, generator=gen).cuda().bfloat16()
    fn = HELD_CASES[case]
    if "labels" in case:
        labels = torch.tensor([3, -100, 40, 0] * (m // 4) + [-100] * (m % 4), device="cuda")
        fn = lambda q, k, s: infcl.inf_loss(q, k, s, labels=labels)  # noqa: E731
    held_gradients_agree(fn, q, k, torch.tensor(10.0, device="cuda"))
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = fn(q, k, torch.tensor(10.0, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss.backward()
    grads = (m + n) * d * 2
    assert torch.cuda.max_memory_allocated() - before < grads // 8, "held gradients copied"


@interpret
@needs_interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("two_sweeps", [False, True], ids=["accumulator", "two-sweeps"])
def test_large_backward_holds_no_key_accumulator(small_blocks, monkeypatch, dtype, two_sweeps):
    """Past `ACC_BYTES_MAX` the backward sweeps twice instead of holding an fp32 [N, D]
    key-gradient accumulator: the same gradients (against naive), and no such tensor made."""
    if two_sweeps:
        monkeypatch.setattr(configs, "ACC_BYTES_MAX", 0)
    gen = torch.Generator().manual_seed(11)
    labels = tuple(torch.randint(0, 61, (50,), generator=gen).tolist())
    for p in (Problem(m=53, n=53, d=19, symmetric=True, scale=20.0, unit=True, seed=12),
              Problem(m=50, n=61, d=19, labels=labels, reduction="sum", seed=13)):
        check(p, dtype, "cpu")
    q = torch.randn(61, 19, dtype=dtype, generator=gen)
    k = torch.randn(70, 19, dtype=dtype, generator=gen)
    s, y = torch.tensor(5.0), torch.arange(61)
    row, col, _ = torch.ops.infcl.inf_fwd(q, k, s, y, 0, False, 0, "ieee")
    g = torch.full((61,), 1 / 61)
    with Allocations() as log:  # the backward op's body, where the mode sees its allocations
        lse_bwd.ds_bwd(q, k, s, y, 0, row, col, g, col, -g, "ieee")
    fp32_keys = [m for m in log.made if m == ((70, 19), torch.float32)]
    # fp32: the gradient itself; bf16 and fp16: the accumulator, unless sweeping twice
    assert len(fp32_keys) == (1 if dtype == torch.float32 else int(not two_sweeps)), log.made


@interpret
@needs_interpret
@pytest.mark.parametrize("d", [1, 255, 257, 300])
def test_any_width_and_ragged_batch(small_blocks, d):
    """Defects 4 and 5: D need not be a multiple of anything, B > 64 with B % 64 != 0."""
    gen = torch.Generator().manual_seed(d)
    q = F.normalize(torch.randn(67, d, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(67, d, generator=gen, dtype=torch.float64), dim=1)
    assert_close_to_naive(infcl.inf_loss, q, k, 20.0, dtype=torch.float32, symmetric=True,
                          precision="ieee")


@interpret
@needs_interpret
def test_learnable_scale_without_process_group(small_blocks):
    """Defect 1: a learnable scale on one device, no process group: backward works."""
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    logit_scale = torch.nn.Parameter(torch.tensor(2.3))
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(21, 9, generator=gen, requires_grad=True)
    k = torch.randn(21, 9, generator=gen, requires_grad=True)
    infcl.inf_loss(q, k, logit_scale.exp(), symmetric=True).backward()
    assert logit_scale.grad is not None and torch.isfinite(logit_scale.grad)


@interpret
@needs_interpret
@pytest.mark.parametrize("norm", [10.0, 100.0])
def test_huge_logits_stay_finite(small_blocks, norm):
    """Defect 6: logits far past 88.7 (here up to +-1e4) give the exact, finite loss."""
    gen = torch.Generator().manual_seed(7)
    q = F.normalize(torch.randn(33, 6, generator=gen, dtype=torch.float64), dim=1) * norm
    k = F.normalize(torch.randn(33, 6, generator=gen, dtype=torch.float64), dim=1) * norm
    got = run(infcl.inf_loss, q.float(), k.float(), 1.0, symmetric=True, precision="ieee")
    want = run(infcl.naive_loss, q, k, 1.0, symmetric=True)
    assert torch.isfinite(got.loss) and torch.isfinite(got.dq).all()
    torch.testing.assert_close(got.loss.double(), want.loss, rtol=1e-5, atol=1e-4 * norm)


@interpret
@needs_interpret
def test_non_finite_inputs_propagate(small_blocks):
    q = torch.randn(9, 4)
    k = torch.randn(9, 4)
    q[3, 1] = float("nan")
    assert not torch.isfinite(infcl.inf_loss(q, k, 1.0))
    q[3, 1] = float("inf")
    assert not torch.isfinite(infcl.inf_loss(q, k, 1.0, symmetric=True))


def test_cpu_without_interpreter_falls_back_to_torch_tiles():
    if INTERPRET:
        pytest.skip("this run interprets the kernels")
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(23, 10, generator=gen)
    assert inf._block(q) == "chunked"
    with OpLog() as log:
        infcl.inf_loss(q, torch.randn(23, 10, generator=gen), 5.0, symmetric=True)
    assert [n for n, _ in log.calls] == ["infcl.chunked_fwd.default"]
    assert_close_to_naive(infcl.inf_loss, q, torch.randn(23, 10, generator=gen), 5.0,
                          dtype=torch.float32, symmetric=True)


def test_float64_takes_torch_tiles_exactly():
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    k = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    assert inf._block(q) == "chunked"
    assert_close_to_naive(infcl.inf_loss, q, k, 3.0, dtype=torch.float64, symmetric=True)


def test_bad_precision_is_rejected():
    with pytest.raises(ValueError, match="precision"):
        infcl.inf_loss(torch.randn(3, 2), torch.randn(3, 2), precision="fp64")


CUDA_CASES = [(torch.bfloat16, None), (torch.float16, None)] + [
    (torch.float32, precision) for precision in configs.PRECISIONS
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "precision"), CUDA_CASES, ids=str)
@settings(max_examples=15)
@given(p=problems(rows=st.integers(1, 600) | st.sampled_from([1, 97, 257, 513])))
@example(p=Problem(m=300, n=300, d=47, symmetric=True, scale=100.0, unit=True, seed=3))
@example(p=Problem(m=130, n=130, d=1030, symmetric=True, scale=100.0, unit=True, seed=5))
@example(p=Problem(m=31, n=40, d=20, labels=tuple([3, -100] * 15 + [39]), reduction="sum"))
# a lone column at |S| = 481: its gradient is exactly 0 only if the backward subtracts the
# forward's rounded S (fp16 once missed its floor here: configs.rounded_logits)
@example(p=Problem(m=1, n=1, d=33, symmetric=True, scale=86.0, seed=0))
def test_kernels_match_naive_cuda(dtype, precision, p):
    check(p, dtype, "cuda", precision=precision)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=10)
@given(p=problems(rows=st.integers(1, 600) | st.sampled_from([1, 97, 257, 513])).map(aligned))
@example(p=Problem(m=300, n=300, d=48, symmetric=True, scale=100.0, unit=True, seed=3))
@example(p=Problem(m=1, n=1, d=32, symmetric=True, scale=86.0, seed=0))
def test_tma_path_cuda(dtype, p):
    """The TMA kernels with their real tiles (128 x 256 forward, 128 x 128 backward) at any
    size; backward blocks of 256 so that descriptors of row and column slices are built."""
    with tma_everywhere(bwd_block=256):
        check_tma(p, dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [41, 5000])
def test_separable_columns_keep_terms_far_below_their_rows_cuda(m):
    check_terms_far_below_their_rows("cuda", m)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [40, 5000])
def test_separable_columns_recomputed_where_they_underflow_cuda(m):
    with tma_everywhere():
        check_underflowing_column("cuda", m, 64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "precision"), CUDA_CASES, ids=str)
@pytest.mark.parametrize(
    "p",
    [Problem(m=4099, n=4099, d=384, symmetric=True, scale=14.3, unit=True, seed=6),
     Problem(m=8200, n=8300, d=200, labels=None, scale=30.0, unit=True, seed=7),
     Problem(m=130, n=130, d=1030, scale=100.0, unit=True, seed=8, scale_is_tensor=True)],
    ids=["4099-sym", "8200x8300", "130-d1030"],
)
def test_large_shapes_cuda(dtype, precision, p):
    """Shapes past the 128/256 tiles and the 8192 backward block, at every precision."""
    if p.m != p.n:
        gen = torch.Generator().manual_seed(p.seed)
        p = dataclasses.replace(p, labels=tuple(torch.randint(0, p.n, (p.m,), generator=gen).tolist()))
    check(p, dtype, "cuda", precision=precision)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ieee_precision_and_several_blocks_cuda(monkeypatch, dtype):
    monkeypatch.setattr(configs, "BWD_BLOCK", 256)
    p = Problem(m=1000, n=1000, d=300, symmetric=True, scale=30.0, unit=True, seed=4)
    check(p, dtype, "cuda", precision="ieee")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_sweep_backward_cuda(monkeypatch, dtype):
    """The backward without an fp32 key accumulator (`ACC_BYTES_MAX` passed), several blocks."""
    monkeypatch.setattr(configs, "BWD_BLOCK", 256)
    monkeypatch.setattr(configs, "ACC_BYTES_MAX", 0)
    p = Problem(m=1000, n=1000, d=300, symmetric=True, scale=30.0, unit=True, seed=14)
    check(p, dtype, "cuda")
    gen = torch.Generator().manual_seed(15)
    labels = tuple(torch.randint(0, 700, (900,), generator=gen).tolist())
    check(Problem(m=900, n=700, d=130, labels=labels, scale=20.0, unit=True, seed=16), dtype, "cuda")


@pytest.mark.gpu
@needs_cuda
def test_opcheck_cuda():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = F.normalize(torch.randn(100, 70, device="cuda", generator=gen), dim=1).bfloat16()
    k = F.normalize(torch.randn(100, 70, device="cuda", generator=gen), dim=1).bfloat16()
    s = torch.tensor(10.0, device="cuda")
    y = torch.arange(100, device="cuda")
    args = (q.requires_grad_(), k.requires_grad_(), s.requires_grad_(), y, 0, True, 0, "tf32")
    torch.library.opcheck(torch.ops.infcl.inf_fwd.default, args)
    # the backward op on statistics from the forward (random LSEs would overflow exp)
    row, col, _ = torch.ops.infcl.inf_fwd(q.detach(), k.detach(), s.detach(), y, 0, True, 0, "tf32")
    g = [torch.randn(100, device="cuda", generator=gen) for _ in range(3)]
    torch.library.opcheck(torch.ops.infcl.inf_bwd.default,
                          (q.detach(), k.detach(), s.detach(), y, 0, row, col, *g, 0, "tf32"))


@pytest.mark.gpu
@needs_cuda
def test_compile_fullgraph_training_step_cuda():
    """No graph break forward or backward, eager agreement, no recompile for a new batch size."""
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    model = torch.nn.Linear(64, 48, device="cuda", dtype=torch.bfloat16)
    logit_scale = torch.nn.Parameter(torch.tensor(2.0, device="cuda"))

    def loss_fn(x, t):
        return infcl.inf_loss(model(x), t, logit_scale.exp(), symmetric=True)

    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    for b in (512, 777):
        x = torch.randn(b, 64, device="cuda", dtype=torch.bfloat16)
        t = torch.randn(b, 48, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(t, 0)
        grads = []
        for fn in (compiled, loss_fn):
            model.zero_grad()
            logit_scale.grad = None
            fn(x, t).backward()
            grads.append((model.weight.grad.clone(), logit_scale.grad.clone()))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        torch.testing.assert_close(grads[0][1], grads[1][1])
    assert len(frames) == 1, f"{len(frames)} graphs: a recompile or a graph break"


@interpret
@needs_interpret
@pytest.mark.parametrize("bad", [-1, 23, 10**6])
def test_label_range_is_checked_when_compiled_interpreted(small_blocks, bad):
    """Out-of-range labels on the Triton path: the ValueError of eager mode, never a finite loss
    (the positive logit of a label outside the block would read as 0)."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(19, 7, generator=gen)
    k = torch.randn(23, 7, generator=gen)
    labels = torch.randint(0, 23, (19,), generator=gen)
    labels[5] = bad
    assert inf._block(q) == "inf"
    torch._dynamo.reset()
    compiled = torch.compile(infcl.inf_loss, backend="aot_eager", fullgraph=True)
    for fn in (infcl.inf_loss, compiled):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 23\).*\[{bad}\]"):
            fn(q, k, 2.0, labels=labels)


def _graph_inputs(seed: int, b: int = 3000, d: int = 200) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, d, device="cuda", generator=gen), dim=1).bfloat16()
            for _ in range(2))
    return q.requires_grad_(), k.requires_grad_(), torch.tensor(20.0 + seed, device="cuda",
                                                                requires_grad=True)


def _graph_loss(labelled: bool):
    y = torch.randperm(3000, device="cuda") if labelled else None

    def fn(q, k, s):
        return infcl.inf_loss(q, k, s, labels=y, symmetric=not labelled)

    return fn


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("labelled", [False, True], ids=["diagonal", "labels"])
def test_cuda_graph_capture_replays_exactly_cuda(labelled):
    """The ops capture into a CUDA graph (no host sync, no host copy) forward and backward,
    and replays on new inputs give what eager gives on them."""
    fn = _graph_loss(labelled)
    graphed = torch.cuda.make_graphed_callables(fn, _graph_inputs(0))
    for seed in (1, 2):
        want = run(fn, *_graph_inputs(seed))
        got = run(graphed, *_graph_inputs(seed))
        for name in ("loss", "dq", "dk", "dscale"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("labelled", [False, True], ids=["diagonal", "labels"])
def test_compile_reduce_overhead_uses_cuda_graphs_cuda(labelled):
    """`torch.compile(mode="reduce-overhead")` graphs the loss forward and backward (no
    cudagraph skip) and agrees with eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = _graph_loss(labelled)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3):
        want = run(fn, *_graph_inputs(seed))
        got = run(compiled, *_graph_inputs(seed))
        for name in ("loss", "dq", "dk", "dscale"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), msg=name)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
