"""chunked_loss under torch.compile(fullgraph=True): same numbers, no graph break, no recompile."""

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from infcl import chunked_loss

CASES = {
    "diagonal": {},
    "labels": {"labels": True},
    "symmetric": {"symmetric": True},
    "symmetric-none": {"symmetric": True, "reduction": "none"},
    "labels-sum": {"labels": True, "reduction": "sum"},
}


class CountingBackend:
    """aot_eager that counts dynamo frames and the forward / backward graphs AOTAutograd builds."""

    def __init__(self):
        self.frames = self.forward = self.backward = 0
        self._aot = aot_autograd(fw_compiler=self._fw, bw_compiler=self._bw)

    def _fw(self, gm, example_inputs):
        self.forward += 1
        return make_boxed_func(gm.forward)

    def _bw(self, gm, example_inputs):
        self.backward += 1
        return make_boxed_func(gm.forward)

    def __call__(self, gm, example_inputs):
        self.frames += 1
        return self._aot(gm, example_inputs)

    @property
    def counts(self):
        return {"frames": self.frames, "forward": self.forward, "backward": self.backward}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _make_step(case):
    kw = {key: v for key, v in CASES[case].items() if key != "labels"}

    def step(q, k, logit_scale, labels):
        return chunked_loss(q, k, logit_scale.exp(), labels=labels, chunk_size=16, **kw)

    return step


def _batch(case, m, seed):
    """q, k, logit_scale (leaves), labels or None, and a cotangent for the loss."""
    gen = torch.Generator().manual_seed(seed)
    n = m + 3 if CASES[case].get("labels") else m
    q = torch.randn(m, 12, generator=gen, requires_grad=True)
    k = torch.randn(n, 12, generator=gen, requires_grad=True)
    logit_scale = torch.tensor(2.6, requires_grad=True)
    labels = None
    if CASES[case].get("labels"):
        labels = torch.randint(0, n, (m,), generator=gen)
        labels[::5] = -100
    cot = torch.randn(m, generator=gen) if CASES[case].get("reduction") == "none" else None
    return q, k, logit_scale, labels, cot


def _train_step(fn, q, k, logit_scale, labels, cot, *, dynamic_batch=False):
    """Loss and grads from fresh leaves; `dynamic_batch` marks their batch dim (clones lose it)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, logit_scale)]
    if dynamic_batch:
        for x in (*leaves[:2], labels):
            if x is not None:
                torch._dynamo.mark_dynamic(x, 0)
    loss = fn(*leaves, labels)
    loss.backward(torch.ones_like(loss) if cot is None else cot)
    return loss.detach(), *(x.grad for x in leaves)


@pytest.mark.parametrize("case", CASES)
def test_compiled_step_matches_eager_without_recompiling(case):
    step = _make_step(case)
    backend = CountingBackend()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for m in (24, 37, 61):
        q, k, logit_scale, labels, cot = _batch(case, m, seed=m)
        got = _train_step(compiled, q, k, logit_scale, labels, cot, dynamic_batch=True)
        want = _train_step(step, q, k, logit_scale, labels, cot)
        for name, a, b in zip(("loss", "dq", "dk", "dscale"), got, want, strict=True):
            torch.testing.assert_close(a, b, msg=lambda s, name=name, m=m: f"{name} at M={m}: {s}")
        assert backend.counts == {"frames": 1, "forward": 1, "backward": 1}, (m, backend.counts)


def test_counting_backend_sees_a_recompile():
    """Control for the test above: a new batch size not marked dynamic does recompile."""
    step = _make_step("diagonal")
    backend = CountingBackend()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    for m in (24, 37):
        _train_step(compiled, *_batch("diagonal", m, seed=m))
    assert backend.counts == {"frames": 2, "forward": 2, "backward": 2}


@pytest.mark.parametrize("case", ["labels", "symmetric"])
def test_no_graph_breaks(case):
    q, k, logit_scale, labels, _ = _batch(case, 19, seed=0)
    explanation = torch._dynamo.explain(_make_step(case))(q, k, logit_scale, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_inductor_step_matches_eager():
    """The default backend, forward and backward (about 35 s of compiling on 2 CPU cores)."""
    step = _make_step("symmetric")
    compiled = torch.compile(step, fullgraph=True)
    for m in (24, 37):
        q, k, logit_scale, labels, cot = _batch("symmetric", m, seed=m)
        got = _train_step(compiled, q, k, logit_scale, labels, cot, dynamic_batch=True)
        want = _train_step(step, q, k, logit_scale, labels, cot)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
