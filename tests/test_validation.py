"""Every input the contract rejects raises the documented error, naming the argument at fault.

LOSSES collects whichever public losses exist, so a new one is checked as soon as it is exported.
"""

import inspect

import pytest
import torch

import infcl

LOSSES = [
    getattr(infcl, name)
    for name in ("naive_loss", "chunked_loss", "inf_loss", "ring_loss")
    if hasattr(infcl, name)
]
M, N, D = 4, 6, 3


def _has_param(fn, name):
    return name in inspect.signature(fn).parameters


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(M, D, generator=gen)
    k = torch.randn(N, D, generator=gen)
    return q, k, torch.tensor([0, 5, -100, 2])


def _base(**change):
    """A valid call (labels, since M != N), with some arguments replaced."""
    q, k, labels = _inputs()
    args = {"q": q, "k": k, "scale": 2.0, "labels": labels}
    args.update(change)
    return args


def _call(fn, args):
    args = dict(args)
    return fn(args.pop("q"), args.pop("k"), args.pop("scale"), **args)


q0, k0, labels0 = _inputs()

# (id, arguments, error type, patterns that must all appear in the message)
BAD = [
    ("q-1d", _base(q=q0[0]), ValueError, ["q", "2-D", r"\(3,\)"]),
    ("q-3d", _base(q=q0[None]), ValueError, ["q", "2-D", r"\(1, 4, 3\)"]),
    ("k-1d", _base(k=k0[0]), ValueError, ["k", "2-D"]),
    ("d-mismatch", _base(k=torch.ones(N, D + 2)), ValueError, ["D", r"\(4, 3\)", r"\(6, 5\)"]),
    ("dtype-mismatch", _base(k=k0.double()), TypeError, ["dtype", "float32", "float64"]),
    ("device-mismatch", _base(k=k0.to("meta")), ValueError, ["device", "cpu", "meta"]),
    ("q-int", _base(q=q0.long()), TypeError, ["q", "int64"]),
    ("k-int", _base(k=k0.int()), TypeError, ["k", "int32"]),
    ("q-bool", _base(q=q0 > 0), TypeError, ["q", "bool"]),
    ("q-not-tensor", _base(q=q0.tolist()), TypeError, ["q", "list"]),
    ("labels-short", _base(labels=labels0[:3]), ValueError, ["labels", r"\(4,\)", r"\(3,\)"]),
    ("labels-2d", _base(labels=labels0[:, None]), ValueError, ["labels", r"\(4, 1\)"]),
    ("labels-float", _base(labels=labels0.float()), TypeError, ["labels", "float32"]),
    ("labels-bool", _base(labels=labels0 > 0), TypeError, ["labels", "bool"]),
    ("labels-too-big", _base(labels=torch.tensor([0, 6, 1, 2])), ValueError, ["labels", "6"]),
    ("labels-negative", _base(labels=torch.tensor([0, -1, 1, 2])), ValueError, ["labels", "-1"]),
    (
        "labels-other-ignore",
        _base(labels=torch.tensor([0, -100, 1, 2]), ignore_index=-1),
        ValueError,
        ["labels", "ignore_index"],
    ),
    (
        "labels-symmetric",
        _base(k=k0[:M], labels=torch.arange(M), symmetric=True),
        ValueError,
        ["symmetric", "labels"],
    ),
    ("m-ne-n-no-labels", _base(labels=None), ValueError, ["labels", r"\(4, 3\)", r"\(6, 3\)"]),
    ("reduction", _base(reduction="avg"), ValueError, ["reduction", "avg"]),
    ("reduction-none-object", _base(reduction=None), ValueError, ["reduction"]),
    ("scale-1d", _base(scale=torch.ones(1)), ValueError, ["scale", r"\(1,\)"]),
    ("scale-2d", _base(scale=torch.ones(1, 1)), ValueError, ["scale"]),
    ("scale-str", _base(scale="2.0"), TypeError, ["scale", "str"]),
    ("scale-int-tensor", _base(scale=torch.tensor(2)), TypeError, ["scale", "int64"]),
    ("symmetric-str", _base(symmetric="yes"), TypeError, ["symmetric"]),
    ("ignore-index-float", _base(ignore_index=-100.0), TypeError, ["ignore_index"]),
]


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_valid_base_call_passes(fn):
    """The baseline every bad case edits is itself valid, so each error is the edit's."""
    assert torch.isfinite(_call(fn, _base()))


@pytest.mark.parametrize(
    ("args", "error", "patterns"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_bad_input_raises(fn, args, error, patterns):
    with pytest.raises(error) as info:
        _call(fn, args)
    for pattern in patterns:
        assert info.match(pattern), (pattern, str(info.value))


@pytest.mark.parametrize("which", ["q", "k", "both"])
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_empty_batch_raises(fn, which):
    """Without a process group the tensors are the whole batch (one rank's shard may be empty).

    Rows with no columns at all may also be reported as labels without a valid column.
    """
    q, k = torch.ones(0 if which != "k" else M, D), torch.ones(0 if which != "q" else M, D)
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="empty" if which != "k" else "empty|labels"):
        fn(q, k, 1.0, labels=labels)


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_zero_width_raises(fn):
    with pytest.raises(ValueError, match="D"):
        fn(torch.ones(M, 0), torch.ones(M, 0), 1.0)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
@pytest.mark.parametrize(
    "fn", [f for f in LOSSES if _has_param(f, "chunk_size")], ids=lambda f: f.__name__
)
def test_bad_chunk_size_raises(fn, chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        _call(fn, _base(chunk_size=chunk_size))
