"""One tolerance table and one comparison against the spec, shared by the tests of every loss
and by the benchmarks' correctness gate (`judge` returns the verdict that
`assert_close_to_naive` asserts on).

Ground truth is `naive_loss` in float64 on the very inputs the implementation sees (already
rounded to the low dtype), so only the implementation's own arithmetic is measured. For each of
the loss, dq, dk and dscale, with `err(x) = ||x - x64|| / max(||x64||, NORM_FLOOR)`:

    err(impl) <= c * err(naive_loss in the same dtype) + FLOOR[dtype]

The error is relative for outputs of norm >= NORM_FLOOR and absolute below it. A purely relative
error (a tiny denominator) fails correct code whenever the exact value is 0 or nearly so while
the terms that produce it are not: gradients that cancel exactly by symmetry (unit rows in D=1)
come out of any tiled sum as ~1e-17 instead of 0, and a loss of 1e-10 next to logits of 20 is
known only to ~eps * 20 absolute once `LSE - S[i, y_i]` is formed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from infcl import naive_loss

FLOOR: dict[torch.dtype | str, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    # float32 inputs on a GPU whose matmuls run in TF32 (look it up with this key explicitly).
    "tf32": 2e-3,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}
NORM_FLOOR = 1.0
TINY = torch.finfo(torch.float64).tiny
SPEC_KWARGS = ("labels", "symmetric", "reduction", "ignore_index")
"""Arguments every loss shares; any other keyword (chunk_size, group) goes to the impl only."""

LossFn = Callable[..., Tensor]


class Result(NamedTuple):
    loss: Tensor
    dq: Tensor
    dk: Tensor
    dscale: Tensor | None  # None when scale was a Python number


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss dtype the contract promises for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(
    fn: LossFn, q: Tensor, k: Tensor, scale: float | Tensor, *, cotangent: Tensor | None = None,
    **kw: Any,
) -> Result:
    """Loss and the gradients of `loss.sum()` (of `(loss * cotangent).sum()` if given) for any loss.

    q, k and a tensor scale are copied into fresh leaves that require grad.
    """
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    s = scale.detach().clone().requires_grad_() if isinstance(scale, Tensor) else scale
    loss = fn(q, k, s, **kw)
    grad = torch.ones_like(loss) if cotangent is None else cotangent.to(loss)
    loss.backward(grad)
    return Result(loss.detach(), q.grad, k.grad, s.grad if isinstance(s, Tensor) else None)


def ground_truth(
    q: Tensor, k: Tensor, scale: float | Tensor, *, cotangent: Tensor | None = None, **kw: Any
) -> Result:
    """naive_loss on float64 upcasts of the same inputs (no new rounding: the upcast is exact)."""
    s64 = scale.detach().double() if isinstance(scale, Tensor) else scale
    return run(naive_loss, q.double(), k.double(), s64, cotangent=cotangent, **kw)


def make_cotangent(m: int, seed: int) -> Tensor:
    """A random float64 cotangent whose values are exact in float32 too (so every run sees them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, generator=gen, dtype=torch.float64).float().double()


def within(
    x: Tensor, x_ref: Tensor, x64: Tensor, *, floor: float, c: float = 2.0,
    norm_floor: float = NORM_FLOOR,
) -> tuple[bool, float, float, float]:
    """The rule for one quantity: (passes, err(x), err(x_ref), bound), bound = c * err(x_ref) +
    floor, errors against the float64 `x64`. Every check of this project goes through it."""
    e, e_ref = rel_err(x, x64, norm_floor), rel_err(x_ref, x64, norm_floor)
    bound = c * e_ref + floor
    return e <= bound, e, e_ref, bound


def rel_err(x: Tensor, ref: Tensor, norm_floor: float = NORM_FLOOR) -> float:
    """||x - ref|| / max(||ref||, norm_floor) over the entries where both are finite."""
    both = torch.isfinite(x) & torch.isfinite(ref)
    diff = (x.double() - ref)[both].norm()
    return float(diff / max(float(ref[both].norm()), norm_floor, TINY))


def assert_close_to_naive(
    fn: LossFn,
    q: Tensor,
    k: Tensor,
    scale: float | Tensor,
    *,
    dtype: torch.dtype,
    c: float = 2.0,
    floor: float | None = None,
    norm_floor: float = NORM_FLOOR,
    seed: int = 0,
    poison: bool = True,
    ref_inputs: Callable[[Tensor], Tensor] | None = None,
    **kw: Any,
) -> None:
    """Check fn's loss, dq, dk, dscale against the float64 spec with the tolerance rule above.

    q and k are rounded to `dtype` first; a tensor scale is used as given (its dtype is the
    caller's choice). `kw` holds the shared arguments plus fn's own (e.g. chunk_size), which the
    references do not get. With reduction="none" the gradients are of a random weighting of the
    per-row losses (drawn from `seed`), not of their plain sum. `norm_floor=0` makes every error
    purely relative, for a test about precision on small values. With `poison`, fn runs forward
    and backward inside `poisoned_memory()`, so an output element it never writes shows up as NaN.
    """
    spec_kw = {key: v for key, v in kw.items() if key in SPEC_KWARGS}
    q, k = q.to(dtype), k.to(dtype)
    cot = make_cotangent(q.shape[0], seed) if kw.get("reduction") == "none" else None
    truth = ground_truth(q, k, scale, cotangent=cot, **spec_kw)
    q_ref, k_ref = (q, k) if ref_inputs is None else (ref_inputs(q), ref_inputs(k))
    ref = run(naive_loss, q_ref, k_ref, scale, cotangent=cot, **spec_kw)
    with poisoned_memory() if poison else contextlib.nullcontext():
        got = run(fn, q, k, scale, cotangent=cot, **kw)
    floor = FLOOR[dtype] if floor is None else floor

    expected_dtypes = {
        "loss": acc_dtype(dtype),
        "dq": dtype,
        "dk": dtype,
        "dscale": scale.dtype if isinstance(scale, Tensor) else None,
    }
    for name, x, x64 in zip(Result._fields, got, truth, strict=True):
        if x64 is None:
            assert x is None, f"{name}: expected None for a Python-number scale, got {x}"
            continue
        assert x is not None, f"{name}: no gradient"
        want_dtype = expected_dtypes[name]
        assert x.dtype == want_dtype, f"{name}: dtype {x.dtype}, want {want_dtype}"
        assert x.shape == x64.shape, f"{name}: shape {tuple(x.shape)}, want {tuple(x64.shape)}"
    verdict = judge(got, ref, truth, dtype=dtype, c=c, floor=floor, norm_floor=norm_floor)
    fn_name = getattr(fn, "__name__", repr(fn))
    assert verdict.ok, f"{fn_name} off the spec in {verdict.failed}:\n" + "\n".join(verdict.lines)


class Verdict(NamedTuple):
    """What the tolerance rule says about one run: `ok`, and the evidence."""

    ok: bool
    failed: list[str]  # the quantities off the spec, once per reason
    lines: list[str]  # one line per quantity (its errors and bound) and per finiteness problem
    errors: dict[str, tuple[float, float]]  # quantity -> (err(impl), err(naive in the same dtype))


def judge(
    got: Result,
    ref: Result,
    truth: Result,
    *,
    dtype: torch.dtype,
    c: float = 2.0,
    floor: float | None = None,
    norm_floor: float = NORM_FLOOR,
) -> Verdict:
    """The tolerance rule of this module as a verdict instead of an assertion (it never raises).

    `got` is the implementation's `Result`, `ref` naive_loss's in the same dtype and `truth`
    naive_loss's in float64, on the same inputs. A quantity passes when it is finite exactly
    where the float64 spec is finite (and fits `got`'s dtype) and
    `err(got) <= c * err(ref) + floor` (floor: `FLOOR[dtype]` unless given). A quantity
    missing where the spec has one (or present where it has none, or of another shape) fails.
    `assert_close_to_naive` asserts on this verdict; the benchmarks gate on it.
    """
    floor = FLOOR[dtype] if floor is None else floor
    lines: list[str] = []
    failed: list[str] = []
    errors: dict[str, tuple[float, float]] = {}
    for name, x, x_ref, x64 in zip(Result._fields, got, ref, truth, strict=True):
        if x64 is None or x is None or x_ref is None or x.shape != x64.shape:
            if x is None and x64 is None:
                continue
            failed.append(name)
            lines.append(f"{name}: shape {_shape(x)}, want {_shape(x64)}")
            continue
        # Finite wherever the exact value is finite and fits the output dtype; non-finite where
        # the exact value is.
        fits = torch.isfinite(x64) & (x64.abs() <= torch.finfo(x.dtype).max)
        if not bool(torch.isfinite(x)[fits].all()):
            failed.append(name)
            lines.append(f"{name}: non-finite where the float64 spec is finite")
        if bool(torch.isfinite(x)[~torch.isfinite(x64)].any()):
            failed.append(name)
            lines.append(f"{name}: finite where the float64 spec is not")
        ok, e_impl, e_ref, bound = within(x, x_ref, x64, floor=floor, c=c, norm_floor=norm_floor)
        errors[name] = (e_impl, e_ref)
        if not ok:
            failed.append(name)
        lines.append(f"{name}: err {e_impl:.3g}, naive {dtype} err {e_ref:.3g}, bound {bound:.3g}")
    return Verdict(not failed, failed, lines, errors)


def _shape(x: Tensor | None) -> tuple[int, ...] | None:
    return None if x is None else tuple(x.shape)


@contextlib.contextmanager
def poisoned_memory() -> Iterator[None]:
    """While active, every fresh allocation (`torch.empty` and friends) is filled with NaN.

    This is PyTorch's own switch (`torch.utils.deterministic.fill_uninitialized_memory`, live
    under deterministic mode) and works for CPU and CUDA, so an output element that an op never
    writes reads as NaN instead of whatever the allocator last held there.
    """
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def round_tf32(x: Tensor) -> Tensor:
    """fp32 values rounded to the nearest TF32 value (ties away from zero), as cuBLAS and the
    kernels' "tf32" round their inputs; non-finite values unchanged."""
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & -0x2000).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x)


def runs_tf32(dtype: torch.dtype, device: str, precision: str | None) -> bool:
    """Whether an infcl loss multiplies `dtype` in TF32 on `device` at `precision` (None:
    PyTorch's setting). Then its reference in the same dtype is naive with cuBLAS TF32
    (`matmul_precision("tf32")` around it) and its floor is `FLOOR["tf32"]`."""
    from infcl.kernels import configs

    tf32 = configs.resolve_precision(precision or "default") == "tf32"
    return dtype == torch.float32 and device == "cuda" and tf32


class OpLog(TorchDispatchMode):
    """Records the infcl ops called (`calls`: name and the dtypes of their tensor arguments;
    `names`: the op names alone, e.g. "inf_fwd")."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[torch.dtype]]] = []

    @property
    def names(self) -> list[str]:
        return [name.split(".")[1] for name, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("infcl."):
            self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


class Allocations(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns in new memory (not in place). A
    custom op's body is seen only when its Python function is called directly."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = {a.untyped_storage().data_ptr() for a in [*args, *kwargs.values()]
                 if isinstance(a, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self.made.append((tuple(t.shape), t.dtype))
        return out


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by storages made while active, each counted from the op that
    makes it until it is freed (a weakref finalizer on the storage), with what was live at that
    peak. The bodies of `infcl::` ops run under the mode too (`torch.ops.infcl.*` and ops called
    from them), so one call of a public loss and its backward shows every buffer, transfers'
    receive buffers included; the memory held before (the inputs) is not counted.

    `at_peak` lists (where, shape, dtype, bytes): `where` is the innermost `infcl/` line that
    made the storage (`file.py:line`), or the op's name."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live: dict[int, tuple[str, tuple[int, ...], torch.dtype, int]] = {}
        self.at_peak: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import torch._library.custom_ops as custom_ops

        kwargs = kwargs or {}
        given = {a.untyped_storage().data_ptr() for a in [*args, *kwargs.values()]
                 if isinstance(a, torch.Tensor)}
        body = custom_ops.OPDEFS.get(func._schema.name) if func.namespace == "infcl" else None
        if body is not None:
            with self:
                out = body._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
                self._track(t, str(func))
        return out

    def _track(self, t: Tensor, op: str) -> None:
        import sys
        import weakref

        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        where, frame = op, sys._getframe(2)
        while frame is not None:
            parts = frame.f_code.co_filename.replace("\\", "/").split("/")
            if "infcl" in parts[:-1]:
                where = f"{parts[-1]}:{frame.f_lineno}"
                break
            frame = frame.f_back
        self.live[key] = (where, tuple(t.shape), t.dtype, storage.nbytes())
        self.now += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.now > self.peak:
            self.peak = self.now
            self.at_peak = list(self.live.values())

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key)[3]


@contextlib.contextmanager
def tma_everywhere(bwd_block: int | None = None) -> Iterator[None]:
    """The TMA path (descriptor loads and its tiles) at any size, not only past
    `configs.TMA_MIN_LOGITS`, and backward blocks of `bwd_block` if given (a context manager,
    not a fixture: Hypothesis runs every example inside one test call)."""
    from infcl.kernels import configs

    saved = configs.TMA_MIN_LOGITS, configs.BWD_BLOCK
    configs.TMA_MIN_LOGITS = 0
    configs.BWD_BLOCK = bwd_block or configs.BWD_BLOCK
    try:
        yield
    finally:
        configs.TMA_MIN_LOGITS, configs.BWD_BLOCK = saved


def aligned(p: Any) -> Any:
    """A test problem (a dataclass with a `d`) with D a multiple of 8 (16-byte rows in bf16
    and fp16, as TMA descriptors need), up to 144: several D chunks of the GPU tiles (64 wide)
    as well as one."""
    return dataclasses.replace(p, d=8 * (1 + p.d % 18))
