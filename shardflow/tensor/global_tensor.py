"""``GlobalTensor``: one logical tensor laid over a mesh, as a ``torch.Tensor`` wrapper subclass.

It holds this rank's local shard, the mesh and the nd-SBP; its ``shape`` is the global shape. Being a
real ``torch.Tensor`` (like DTensor) lets ``nn.Parameter``, autograd and optimizers take it. Autograd
follows the logical tensor: every conversion is an ``autograd.Function`` whose backward converts the
arriving gradient to the source's gradient layout with the same boxing engine (the gradient rule: a
gradient has its value's layout with P replaced by B).
"""

from __future__ import annotations

import threading
import types as pytypes
from collections.abc import Sequence
from typing import Any

import torch

from shardflow.boxing import plan_boxing, run_plan
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, Placement, format_sbp, grad_sbp, normalize_sbp
from shardflow.tensor import fast_path
from shardflow.tensor.fast_path import HITS as _FAST_HITS
from shardflow.tensor.trace import note_boxing

_disabled_tf: Any = torch._C._disabled_torch_function_impl  # its stub wants kwargs, which getters refuse


def _any_grad_py(*args: Any) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


_any_grad = getattr(torch._C, "_any_requires_grad", _any_grad_py)  # the C one where this torch has it
_dispatch_modes = torch._C._len_torch_dispatch_stack
_STRIDED = torch.strided
_NEVER = fast_path.NEVER
_make_wrapper = torch.Tensor._make_wrapper_subclass  # type: ignore[attr-defined]
# functions implemented in C: the same call on plain tensors makes the same ATen op (no Python-level checks)
_C_FUNCS = (pytypes.BuiltinFunctionType, pytypes.MethodDescriptorType)
_LOCAL = threading.local()  # .pending: the call being recorded on this thread


class _FromSig:
    """``_mesh`` / ``_sbp`` of a tensor the fast path made, read from its signature. Not a data descriptor:
    tensors made otherwise hold their own in ``__dict__``, which wins; the fast path sets two attributes
    where it would set four (the handler's time is the whole overhead of a small eager op)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self if obj is None else getattr(obj._sig, self.field)


class GlobalTensor(torch.Tensor):
    """A logical tensor of global ``shape`` over ``mesh`` with layout ``sbp`` (one placement per axis)."""

    _local: torch.Tensor
    _mesh: Mesh = _FromSig("mesh")  # type: ignore[assignment]
    _sbp: NdSbp = _FromSig("sbp")  # type: ignore[assignment]
    _sig: fast_path.Sig | None = None  # the layout signature, interned once the fast path asks for it

    @staticmethod
    def __new__(
        cls,
        local: torch.Tensor,
        mesh: Mesh,
        sbp: NdSbp,
        shape: Sequence[int],
        requires_grad: bool = False,
        sig: fast_path.Sig | None = None,
    ) -> GlobalTensor:
        if local.requires_grad:  # autograd follows the wrapper; a local tracking its own graph (a view made
            local = local.detach()  # under no_grad of a leaf) would record the fast path's ops on it
        t = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls, tuple(shape), dtype=local.dtype, device=local.device, requires_grad=requires_grad
        )
        t._local, t._mesh, t._sbp = local, mesh, tuple(sbp)
        if sig is not None:  # known to the caller (eager dispatch): the fast path's key needs no lookup
            t._sig = sig
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    # -- views of the logical tensor ------------------------------------------------------------------
    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def sbp(self) -> NdSbp:
        return self._sbp

    def requires_grad_(self, requires_grad: bool = True) -> GlobalTensor:  # type: ignore[override]
        """As torch's, and a leaf that requires grad converts its accumulated gradient to the gradient
        layout (``P`` summed to ``B``, or reduce-scattered to ``S``) as soon as backward has produced it,
        overlapping that communication with the rest of backward."""
        super().requires_grad_(requires_grad)
        if requires_grad and self.is_leaf and not getattr(self, "_sf_grad_hook", False):
            self.register_post_accumulate_grad_hook(_to_grad_layout)
            self._sf_grad_hook = True
        return self

    def to_local(self, grad_sbp: Placement | Sequence[Placement] | None = None) -> torch.Tensor:
        """This rank's shard (empty outside the mesh). Differentiable: the gradient of the local is read
        with ``grad_sbp`` (default: this tensor's gradient layout, i.e. its sbp with ``P`` as ``B``)."""
        g = grad_sbp_of(self) if grad_sbp is None else normalize_sbp(grad_sbp, self._mesh.ndim, self.dim())
        return _ToLocal.apply(self, g)

    def full(self) -> torch.Tensor:
        """The logical value as a plain tensor on every rank of the mesh (collective); empty elsewhere."""
        return self.redistribute((B,) * self._mesh.ndim).to_local()

    def redistribute(self, sbp: Placement | Sequence[Placement], mesh: Mesh | None = None) -> GlobalTensor:
        """Boxing to ``sbp`` (on ``mesh`` if given: every rank of both meshes calls it). Differentiable."""
        dst_mesh = self._mesh if mesh is None else mesh
        dst = normalize_sbp(sbp, dst_mesh.ndim, self.dim())
        if dst_mesh.device_type != self._mesh.device_type:
            raise ValueError(
                f"cannot redistribute from a {self._mesh.device_type} mesh to a {dst_mesh.device_type} mesh; "
                f"move the tensor between devices first"
            )
        return _Redistribute.apply(self, dst_mesh, dst)

    @staticmethod
    def from_local(
        local: torch.Tensor,
        mesh: Mesh,
        sbp: Placement | Sequence[Placement],
        shape: Sequence[int] | None = None,
        check: bool = False,
    ) -> GlobalTensor:
        """Wrap this rank's shard; see ``shardflow.tensor.api.from_local``."""
        from shardflow.tensor.api import from_local

        return from_local(local, mesh, sbp, shape=shape, check=check)

    def __repr__(self) -> str:  # type: ignore[override]
        grad = ", requires_grad=True" if self.requires_grad else ""
        return (
            f"GlobalTensor(shape={tuple(self.shape)}, sbp={format_sbp(self._sbp)}, mesh={self._mesh}, "
            f"dtype={self.dtype}{grad}, local={self._local!r})"
        )

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a GlobalTensor cannot be pickled; save with shardflow's checkpoints or pass .full()")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        """The fast path (``fast_path.py``): a C function called as before on the same layouts runs on the
        shards; everything else goes to ``__torch_dispatch__`` as if this handler did not exist. Other
        arguments enter the key with their types (1, 1.0 and True are equal by value). Written flat
        (two-argument calls unrolled): it is the whole overhead of a small eager op."""
        if kwargs or type(func) not in _C_FUNCS:
            return _disabled_tf(func, types, args, kwargs) if kwargs else _disabled_tf(func, types, args)
        if _any_grad(*args):  # autograd must see it (under no_grad too: rare, and right on the slow path)
            return _disabled_tf(func, types, args)
        if len(args) == 2:
            a, b = args
            ga, gb = type(a) is GlobalTensor, type(b) is GlobalTensor
            try:
                key: Any = (
                    func,
                    a._sig or _sig_of(a) if ga else (type(a), a),
                    b._sig or _sig_of(b) if gb else (type(b), b),
                )
                hit = _FAST_HITS.get(key)
            except TypeError:  # an unhashable argument
                return _disabled_tf(func, types, args)
            if hit is None or hit is _NEVER or _dispatch_modes():
                return _slow(key, hit, func, types, args)
            r = func(a._local if ga else a, b._local if gb else b)
        else:
            try:
                key = (func, *[a._sig or _sig_of(a) if type(a) is GlobalTensor else (type(a), a) for a in args])
                hit = _FAST_HITS.get(key)
            except TypeError:
                return _disabled_tf(func, types, args)
            if hit is None or hit is _NEVER or _dispatch_modes():
                return _slow(key, hit, func, types, args)
            r = func(*[a._local if type(a) is GlobalTensor else a for a in args])
        shape, dtype, device, out = hit
        if r.dtype is not dtype:  # not what was remembered (autocast cast it): the slow path decides
            return _disabled_tf(func, types, args)
        if _POSITIONAL:
            t = _make_wrapper(cls, shape, None, None, None, dtype, _STRIDED, device)
        else:
            t = _make_wrapper(cls, shape, dtype=dtype, device=device)
        t._local, t._sig = r, out
        return t

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # type: ignore[override]
        return _dispatcher()(func, args, kwargs or {})


def _positional_wrapper() -> bool:
    """Whether ``_make_wrapper_subclass`` takes (size, strides, offset, format, dtype, layout, device) by
    position here, as torch 2.x does: less per op than parsing keywords (BENCHMARKS.md, Training). Checked,
    not assumed."""
    try:
        t = _make_wrapper(GlobalTensor, (3, 2), None, None, None, torch.float16, torch.strided, torch.device("meta"))
    except TypeError:
        return False
    return (tuple(t.shape), t.dtype, t.device.type, t.requires_grad) == ((3, 2), torch.float16, "meta", False)


_POSITIONAL = _positional_wrapper()


def _slow(key: Any, hit: Any, func: Any, types: Any, args: Any) -> Any:
    """A call the fast path does not answer (new, refused before, or under a dispatch mode, which must see
    the op on GlobalTensors, not on shards): the slow path, recorded when the call is new."""
    if hit is None:
        return _record(key, func, types, args)
    return _disabled_tf(func, types, args)


def _sig_of(a: GlobalTensor) -> fast_path.Sig:
    with torch._C.DisableTorchFunctionSubclass():
        shape, dtype = tuple(a.shape), a.dtype
    a._sig = fast_path.sig(a._mesh, a._sbp, shape, dtype, a._local.device)
    return a._sig


def _record(key: Any, func: Any, types: Any, args: Any) -> Any:
    """Run a call by the slow path, and remember it when it made exactly one ATen op that the fast path
    can stand for (``dispatch`` says so by leaving its output and arguments in the pending record) and
    that op took this call's own arguments: then the function on the shards is that op on the shards."""
    outer, rec = pending(), [key, 0, None, None]
    _LOCAL.pending = rec
    try:
        ret = _disabled_tf(func, types, args)
    finally:
        _LOCAL.pending = outer
    if not all(fast_path.plain_arg(a) for a in args if type(a) is not GlobalTensor):
        return ret  # a key holding tensors (in a tuple) is never kept: it would keep them alive
    if _dispatch_modes() or torch._C._is_any_autocast_enabled():
        return ret  # what a mode or autocast made of the call says nothing of the call without them
    if rec[1] == 1 and rec[2] is ret and fast_path.same_args(rec[3], args):
        fast_path.remember(key, ret._sig or _sig_of(ret), ret._local)
    else:  # not for the fast path (in-place, boxed, no op or several...): remember that too
        fast_path.remember(key, None)
    return ret


def pending() -> list[Any] | None:
    """The call ``__torch_function__`` is recording on this thread, for ``dispatch`` to count and fill."""
    return getattr(_LOCAL, "pending", None)


_DISPATCH: list[Any] = []


def _dispatcher() -> Any:
    """``tensor.dispatch.dispatch``, imported once (it builds on this module), not at every op."""
    if not _DISPATCH:
        from shardflow.tensor.dispatch import dispatch  # noqa: PLC0415

        _DISPATCH.append(dispatch)
    return _DISPATCH[0]


def _to_grad_layout(p: torch.Tensor) -> None:
    g = p.grad
    if getattr(p, "_sf_partial_grad", False):  # its holder sums partial gradients and reduces them itself
        return
    if isinstance(p, GlobalTensor) and isinstance(g, GlobalTensor):
        want = grad_sbp(p.sbp)
        if g.sbp != want:
            from shardflow.tensor.grad_sync import collector  # noqa: PLC0415 (grad_sync builds on this module)

            sync = collector()
            if sync is not None:
                sync.add(p)
            else:
                p.grad = box(g, p.mesh, want)


def grad_sbp_of(x: GlobalTensor) -> NdSbp:
    return grad_sbp(x.sbp)


def wrap(
    local: torch.Tensor, mesh: Mesh, sbp: NdSbp, shape: Sequence[int], sig: fast_path.Sig | None = None
) -> GlobalTensor:
    return GlobalTensor(local, mesh, sbp, shape, sig=sig)


def box(x: GlobalTensor, dst_mesh: Mesh, dst: NdSbp) -> GlobalTensor:
    """Non-differentiable boxing of a GlobalTensor (the executor under autograd)."""
    if x.mesh == dst_mesh and x.sbp == dst:
        return x
    plan = plan_boxing(tuple(x.shape), x.dtype, x.mesh, x.sbp, dst_mesh, dst)
    note_boxing(plan)
    return wrap(run_plan(plan, x._local), dst_mesh, dst, x.shape)


def as_global(grad: torch.Tensor | None, mesh: Mesh, sbp: NdSbp, shape: Sequence[int]) -> GlobalTensor | None:
    """A gradient arriving as a plain tensor is this rank's local of layout ``sbp``."""
    if grad is None or isinstance(grad, GlobalTensor):
        return grad
    return wrap(grad, mesh, sbp, shape)


class _Redistribute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: GlobalTensor, dst_mesh: Mesh, dst: NdSbp) -> GlobalTensor:  # type: ignore[override]
        ctx.src_mesh, ctx.src, ctx.dst_mesh, ctx.dst, ctx.shape = x.mesh, x.sbp, dst_mesh, dst, tuple(x.shape)
        out = box(x, dst_mesh, dst)
        if out is x:  # an identity route still returns a new tensor for autograd
            out = wrap(x._local.view_as(x._local), dst_mesh, dst, x.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None]:  # type: ignore[override]
        g = as_global(grad, ctx.dst_mesh, grad_sbp(ctx.dst), ctx.shape)
        assert g is not None
        return box(g, ctx.src_mesh, grad_sbp(ctx.src)), None, None


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: GlobalTensor, g_sbp: NdSbp) -> torch.Tensor:  # type: ignore[override]
        ctx.mesh, ctx.g_sbp, ctx.shape = x.mesh, g_sbp, tuple(x.shape)
        return x._local.view_as(x._local)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None]:  # type: ignore[override]
        return wrap(grad, ctx.mesh, ctx.g_sbp, ctx.shape), None


class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, mesh: Mesh, sbp: NdSbp, shape: tuple[int, ...]) -> GlobalTensor:  # type: ignore[override]
        ctx.mesh, ctx.sbp, ctx.shape = mesh, sbp, shape
        return wrap(local.view_as(local), mesh, sbp, shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, None, None, None]:  # type: ignore[override]
        g = as_global(grad, ctx.mesh, grad_sbp(ctx.sbp), ctx.shape)
        assert g is not None
        return box(g, ctx.mesh, grad_sbp(ctx.sbp))._local, None, None, None
