"""Every input the contract rejects raises the documented error, naming the argument at fault,
in eager mode and from a `torch.compile(fullgraph=True)`d call alike (same type, same message).

LOSSES collects whichever public losses exist, so a new one is checked as soon as it is exported.
"""

import inspect

import pytest
import torch
import torch._dynamo

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


def _compiled_call(fn, args):
    """The same call inside a compiled function (a fresh compile: nothing cached from eager)."""
    torch._dynamo.reset()
    return torch.compile(lambda a: _call(fn, a), backend="aot_eager", fullgraph=True)(args)


MODES = {"eager": _call, "compiled": _compiled_call}


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
    ("labels-uint8-too-big", _base(labels=torch.tensor([0, 6, 1, 2], dtype=torch.uint8)),
     ValueError, ["labels", "6"]),
    ("labels-list", _base(labels=[0, 5, 1, 2]), TypeError, ["labels", "list"]),
    ("scale-bool", _base(scale=True), TypeError, ["scale", "bool"]),
    ("reduction-none-object", _base(reduction=None), TypeError, ["reduction", "NoneType"]),
    ("scale-1d", _base(scale=torch.ones(1)), ValueError, ["scale", r"\(1,\)"]),
    ("scale-2d", _base(scale=torch.ones(1, 1)), ValueError, ["scale"]),
    ("scale-str", _base(scale="2.0"), TypeError, ["scale", "str"]),
    ("scale-int-tensor", _base(scale=torch.tensor(2)), TypeError, ["scale", "int64"]),
    ("symmetric-str", _base(symmetric="yes"), TypeError, ["symmetric"]),
    ("ignore-index-float", _base(ignore_index=-100.0), TypeError, ["ignore_index"]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_valid_base_call_passes(fn, mode):
    """The baseline every bad case edits is itself valid, so each error is the edit's."""
    assert torch.isfinite(MODES[mode](fn, _base()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("args", "error", "patterns"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_bad_input_raises(fn, args, error, patterns, mode):
    with pytest.raises(error) as info:
        MODES[mode](fn, args)
    assert type(info.value) is error or error is TypeError, type(info.value)
    for pattern in patterns:
        assert info.match(pattern), (pattern, str(info.value))


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_compiled_error_message_equals_eager(fn):
    """Not only the type and a few words: the whole message is the eager one."""
    for _, args, error, _ in BAD:
        with pytest.raises(error) as eager:
            _call(fn, args)
        with pytest.raises(error) as compiled:
            _compiled_call(fn, args)
        assert str(compiled.value) == str(eager.value)


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32]
)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_every_integer_label_dtype(fn, dtype):
    q, k, labels = _inputs()
    labels = labels.clamp(min=0)
    want = _call(fn, _base(labels=labels))
    torch.testing.assert_close(_call(fn, _base(labels=labels.to(dtype))), want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["q", "k", "both"])
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_empty_batch_raises(fn, which, mode):
    """Without a process group the tensors are the whole batch (one rank's shard may be empty).

    Rows with no columns at all may also be reported as labels without a valid column.
    """
    q, k = torch.ones(0 if which != "k" else M, D), torch.ones(0 if which != "q" else M, D)
    labels = torch.zeros(q.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="empty" if which != "k" else "empty|labels"):
        MODES[mode](fn, {"q": q, "k": k, "scale": 1.0, "labels": labels})


@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_zero_width_raises(fn):
    with pytest.raises(ValueError, match="D"):
        fn(torch.ones(M, 0), torch.ones(M, 0), 1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("chunk_size", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("4", TypeError)],
)
@pytest.mark.parametrize(
    "fn", [f for f in LOSSES if _has_param(f, "chunk_size")], ids=lambda f: f.__name__
)
def test_bad_chunk_size_raises(fn, chunk_size, error, mode):
    with pytest.raises(error, match="chunk_size"):
        MODES[mode](fn, _base(chunk_size=chunk_size))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("precision", "error"), [("fast", ValueError), (32, TypeError)])
@pytest.mark.parametrize(
    "fn", [f for f in LOSSES if _has_param(f, "precision")], ids=lambda f: f.__name__
)
def test_bad_precision_raises(fn, precision, error, mode):
    with pytest.raises(error, match="precision"):
        MODES[mode](fn, _base(precision=precision))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group", ["world", 1, object()])
@pytest.mark.parametrize(
    "fn", [f for f in LOSSES if _has_param(f, "group")], ids=lambda f: f.__name__
)
def test_bad_group_raises_type_error(fn, group, mode):
    with pytest.raises(TypeError, match="group must be None or a torch.distributed.ProcessGroup"):
        MODES[mode](fn, _base(group=group))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_nan_in_nan_out(fn, mode):
    q, k, labels = _inputs()
    q = q.clone()
    q[1, 0] = float("nan")
    assert torch.isnan(MODES[mode](fn, _base(q=q)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", LOSSES, ids=lambda f: f.__name__)
def test_call_the_loss_cannot_take(fn, mode):
    """Python's TypeError for arguments the loss does not have, not another loss's check."""
    def four_positional():
        return fn(q0, q0, 2.0, labels0)

    if mode == "compiled":
        torch._dynamo.reset()
        four_positional = torch.compile(four_positional, backend="aot_eager", fullgraph=True)
    with pytest.raises(TypeError, match="positional arguments but 4 were given"):
        four_positional()
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        MODES[mode](fn, _base(temperature=0.1))


@pytest.mark.parametrize("ignore_index", [1 << 63, -(1 << 64)])
def test_ignore_index_must_fit_int64(ignore_index):
    with pytest.raises(ValueError, match="int64"):
        _call(infcl.chunked_loss, _base(ignore_index=ignore_index))


@pytest.mark.parametrize(
    "fn", [infcl.naive_sigmoid_loss, infcl.chunked_sigmoid_loss, infcl.inf_sigmoid_loss],
    ids=lambda f: f.__name__,
)
def test_int64_min_is_a_label_out_of_range(fn):
    """-2**63 is infcl's own 'no ignore_index' sentinel; as a label it is out of range."""
    labels = torch.tensor([0, 1, 2, -(1 << 63)])
    with pytest.raises(ValueError, match="labels must lie in"):
        fn(q0, k0, 2.0, 1.0, labels=labels)


def test_typecheck_runs_once_per_signature_and_again_for_a_new_one():
    """beartype runs on a signature's first call only; a call that differs in a type, dtype or
    rank is checked again (and rejected when the annotations say so)."""
    from jaxtyping import Float

    from infcl._typing import typechecked

    calls = []

    @typechecked
    def f(x: Float[torch.Tensor, " n"], out_rank: int) -> Float[torch.Tensor, ""]:
        calls.append(out_rank)
        return x.sum() if out_rank == 0 else x

    f(torch.ones(3), 0)
    f(torch.ones(5), 0)  # the same signature: not checked again, still run
    assert calls == [0, 0]
    # the proof that it was not checked again: a result that breaks the annotation passes
    # (the contract's own checks, run on every call, are what guard the losses' inputs)
    assert f(torch.ones(4), 1).shape == (4,)
    with pytest.raises(TypeError):
        f(torch.ones(3, dtype=torch.int64), 0)  # a new dtype: checked, and rejected
    with pytest.raises(TypeError):
        f(torch.ones(2, 2), 0)  # a new rank: checked, and rejected
    with pytest.raises(TypeError):
        f(torch.ones(3).double(), 1)  # a new signature whose result breaks the annotation
