"""The spec itself: naive_loss is F.cross_entropy on explicit logits, with its symmetries."""

import pytest
import torch
import torch.nn.functional as F
from helpers import run
from hypothesis import example, given
from hypothesis import strategies as st
from strategies import Problem, problems

from infcl import naive_loss

F64 = {"rtol": 1e-12, "atol": 1e-12, "equal_nan": True}  # all rows ignored: mean is NaN


def _logits(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k = p.inputs()
    return q, k, p.scale * q @ k.T


@given(p=problems())
@example(p=Problem(m=5, n=9, d=3, labels=(0, 7, -100, 8, 2), reduction="mean"))
@example(p=Problem(m=5, n=9, d=3, labels=(0, 7, 7, 8, 2), ignore_index=7, reduction="none"))
@example(p=Problem(m=3, n=3, d=2, labels=(7, 7, 1), ignore_index=7, reduction="sum"))
@example(p=Problem(m=9, n=9, d=2, ignore_index=7, reduction="none"))
@example(p=Problem(m=3, n=5, d=4, labels=(-100, -100, -100)))
def test_equals_cross_entropy_on_explicit_logits(p):
    q, k, logits = _logits(p)
    kw = p.kwargs()
    got = naive_loss(q, k, p.scale_for(torch.float64), **kw)
    if p.symmetric:
        diag = torch.arange(p.m)
        per = 0.5 * (
            F.cross_entropy(logits, diag, reduction="none")
            + F.cross_entropy(logits.T, diag, reduction="none")
        )
        want = {"none": per, "sum": per.sum(), "mean": per.mean()}[p.reduction]
    elif kw["labels"] is None:  # the diagonal: ignore_index plays no part
        want = F.cross_entropy(logits, torch.arange(p.m), reduction=p.reduction)
    else:
        want = F.cross_entropy(
            logits, kw["labels"], reduction=p.reduction, ignore_index=p.ignore_index
        )
    torch.testing.assert_close(got, want, **F64)


def test_mean_skips_ignored_rows_in_the_count():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, -100, 5, -100])
    per = naive_loss(q, k, labels=labels, reduction="none")
    assert per[1] == 0 and per[3] == 0
    torch.testing.assert_close(naive_loss(q, k, labels=labels), (per[0] + per[2]) / 2, **F64)


@given(p=problems(), data=st.data())
def test_invariant_to_permuting_rows_and_columns(p, data):
    q, k = p.inputs()
    kw = p.kwargs()
    labels, symmetric, ignore = kw.pop("labels"), kw.pop("symmetric"), kw.pop("ignore_index")
    base = naive_loss(q, k, p.scale, labels=labels, symmetric=symmetric, ignore_index=ignore, **kw)
    rows = torch.tensor(data.draw(st.permutations(range(p.m)), label="rows"))
    if symmetric:
        # Diagonal positives: the same permutation on both sides keeps each pair together.
        moved = naive_loss(q[rows], k[rows], p.scale, symmetric=True, **kw)
    else:
        # A column whose index is ignore_index stays put, or a real label could move onto it.
        fixed = ignore if labels is not None and 0 <= ignore < p.n else None
        cols = data.draw(st.permutations([j for j in range(p.n) if j != fixed]), label="columns")
        if fixed is not None:
            cols.insert(fixed, fixed)
        cols = torch.tensor(cols)
        where = torch.argsort(cols)  # column j of k sits at where[j] in k[cols]
        if labels is None:  # the diagonal becomes explicit labels; no row is ignored
            y, ignore = where, -100
        else:
            y = torch.where(labels == ignore, labels, where[labels.clamp(0, p.n - 1)])
        moved = naive_loss(q[rows], k[cols], p.scale, labels=y[rows], ignore_index=ignore, **kw)
    want = base[rows] if p.reduction == "none" else base
    torch.testing.assert_close(moved, want, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@given(
    m=st.integers(1, 20), d=st.integers(1, 9), scale=st.floats(0, 100), seed=st.integers(0, 2**32)
)
def test_symmetric_is_the_mean_of_both_directions(reduction, m, d, scale, seed):
    q, k = Problem(m=m, n=m, d=d, seed=seed).inputs()
    both = naive_loss(q, k, scale, symmetric=True, reduction=reduction)
    halves = 0.5 * (
        naive_loss(q, k, scale, reduction=reduction) + naive_loss(k, q, scale, reduction=reduction)
    )
    torch.testing.assert_close(both, halves, **F64)


def test_does_not_normalise_inputs():
    q, k = Problem(m=6, n=6, d=4, seed=1).inputs()
    torch.testing.assert_close(naive_loss(2.5 * q, k, 3.0), naive_loss(q, k, 7.5), **F64)


GRADCHECK_CASES = {
    "diagonal": {},
    "labels": {"labels": torch.tensor([4, -100, 0, 6, 2])},
    "labels-ignore-7": {"labels": torch.tensor([4, 7, 0, 7, 2]), "ignore_index": 7},
    "symmetric": {"symmetric": True},
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck(case, reduction):
    kw = GRADCHECK_CASES[case]
    gen = torch.Generator().manual_seed(2)
    m, n = (5, 8) if "labels" in kw else (5, 5)
    q = torch.randn(m, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, scale):
        return naive_loss(q, k, scale, reduction=reduction, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, scale))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("scale_dtype", [None, torch.float32, torch.float64], ids=str)
def test_output_and_gradient_dtypes(dtype, scale_dtype):
    q, k = Problem(m=7, n=7, d=5, seed=3).inputs()
    scale = 2.0 if scale_dtype is None else torch.tensor(2.0, dtype=scale_dtype)
    r = run(naive_loss, q.to(dtype), k.to(dtype), scale)
    assert r.loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert r.dq.dtype == dtype and r.dk.dtype == dtype
    if scale_dtype is not None:
        assert r.dscale.dtype == scale_dtype
