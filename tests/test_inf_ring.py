"""inf_loss across gloo ranks, its Triton kernels run by the interpreter at every ring step.

Marked `interpret`: `make test` runs it with TRITON_INTERPRET=1, which the spawned ranks inherit.
The same sharded problems as test_ring.py (pinned Inf-CL defects plus Hypothesis draws), fewer
of them: the interpreter is slow.
"""

from __future__ import annotations

import pytest
from dist_utils import PINNED, Ctx, Pool, Sharded, check_case, draw_cases

import infcl
from infcl.kernels import configs

pytestmark = [pytest.mark.dist, pytest.mark.interpret,
              pytest.mark.skipif(not configs.INTERPRET, reason="set TRITON_INTERPRET=1")]

DRAWN_PER_WORLD = 4


def inf_ring(q, k, scale, *, group, chunk_size, **kw):
    """inf_loss with check_case's call (chunk_size is ring_loss's own argument: not used here)."""
    return infcl.inf_loss(q, k, scale, group=group, precision="ieee", **kw)


def job_cases(ctx: Ctx, cases: list[Sharded]) -> list[str]:
    import infcl.ops

    assert infcl.ops.INTERPRET, "the ranks must interpret the kernels"
    # bf16 and fp16 go through the kernels; float64 takes torch tiles by design
    return [check_case(ctx, p, inf_ring) for p in cases]


def inf_ring_strided_labels(q, k, scale, *, group, chunk_size, labels=None, **kw):
    """The same with the labels a strided view (every other element of a wider tensor)."""
    import torch

    if labels is not None:
        labels = torch.stack([labels, torch.full_like(labels, -7)], 1)[:, 0]
        assert labels.numel() < 2 or not labels.is_contiguous()
    return infcl.inf_loss(q, k, scale, group=group, precision="ieee", labels=labels, **kw)


def job_cases_strided(ctx: Ctx, cases: list[Sharded]) -> list[str]:
    return [check_case(ctx, p, inf_ring_strided_labels) for p in cases]


@pytest.fixture(scope="module")
def pool():
    p = Pool()
    yield p
    p.close()


@pytest.mark.parametrize("world", [2, 3])
def test_inf_ring_matches_naive(pool, world):
    cases = [p for p in PINNED if p.world == world] + draw_cases(world, DRAWN_PER_WORLD)
    per_rank = pool.run(job_cases, cases)
    failures = [
        f"{p}\n  rank {r}: {msg}"
        for i, p in enumerate(cases)
        for r, msgs in enumerate(per_rank)
        if (msg := msgs[i])
    ]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:10])


def test_inf_ring_reads_strided_labels(pool):
    """Labels that are a view with a stride reach the kernels at every ring step as values,
    not as memory read densely."""
    cases = [p for p in PINNED if p.world == 2 and p.labels is not None][:2] + [
        p for p in draw_cases(2, 8) if p.labels is not None][:2]
    assert cases
    per_rank = pool.run(job_cases_strided, cases)
    failures = [f"{p}\n  rank {r}: {msg}" for i, p in enumerate(cases)
                for r, msgs in enumerate(per_rank) if (msg := msgs[i])]
    assert not failures, "\n".join(failures[:5])
