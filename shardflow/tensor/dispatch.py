"""Eager ATen ops on GlobalTensors: a registry of layout rules, one decorated function per op.

This layer knows only the ops autograd and optimizers need to move gradients around (aliasing, copies,
linear element-wise arithmetic). Operands in different layouts are boxed to the first operand's layout;
``P`` is kept only where the op is linear. An op without a rule raises an error naming it, never a silent
gather. The compiler's full per-op signatures extend this same registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from shardflow.placement.sbp import _Partial, format_sbp
from shardflow.tensor.global_tensor import GlobalTensor, box, wrap

aten = torch.ops.aten
Rule = Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
RULES: dict[Any, Rule] = {}


def rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the eager rule of each ATen overload in ``ops``."""

    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


def dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    fn = RULES.get(func)
    if fn is None:
        layouts = [format_sbp(a.sbp) for a in args if isinstance(a, GlobalTensor)]
        raise NotImplementedError(
            f"shardflow has no layout rule for {func} on GlobalTensors with layouts {layouts}; add one with "
            f"@rule({func}) in shardflow/tensor/dispatch.py, or call .full() / .to_local() and use plain tensors"
        )
    return fn(func, args, kwargs)


def _has_partial(x: GlobalTensor) -> bool:
    return any(isinstance(p, _Partial) for p in x.sbp)


def _first(args: tuple[Any, ...]) -> GlobalTensor:
    return next(a for a in args if isinstance(a, GlobalTensor))


def _locals(args: tuple[Any, ...], like: GlobalTensor) -> list[Any]:
    """Locals of every operand, each GlobalTensor boxed to ``like``'s mesh and layout first."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, GlobalTensor):
            if tuple(a.shape) != tuple(like.shape):
                raise ValueError(
                    f"operands of global shapes {tuple(like.shape)} and {tuple(a.shape)} differ; eager "
                    f"broadcasting between GlobalTensors is not supported yet"
                )
            if a.mesh != like.mesh:
                raise ValueError(
                    f"operands live on different meshes ({like.mesh} and {a.mesh}); move one first with "
                    f"x.redistribute(sbp, mesh=other_mesh)"
                )
            a = box(a, like.mesh, like.sbp)._local
        out.append(a)
    return out


@rule(aten.detach.default, aten.alias.default, aten.clone.default, aten.neg.default, aten._to_copy.default)
def _unary_local(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    return wrap(func(x._local, *args[1:], **kwargs), x.mesh, x.sbp, x.shape)


@rule(aten.zeros_like.default, aten.empty_like.default)
def _like(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    out = func(x._local, **kwargs)
    return wrap(out, x.mesh, x.sbp, x.shape)


@rule(aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor, aten.copy_.default)
def _linear_binary(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = _first(args)
    if not all(isinstance(a, GlobalTensor) for a in args[:2]):
        if _has_partial(x) and func is not aten.copy_.default:
            raise ValueError(
                f"{func} of a plain value and a GlobalTensor with layout {format_sbp(x.sbp)} would add the "
                f"value once per partial rank; redistribute to a layout without P first"
            )
        if func is aten.copy_.default:
            raise ValueError("copy_ into a GlobalTensor needs a GlobalTensor source; use sf.distribute first")
    loc = _locals(args, x)
    out = func(*loc, **kwargs)
    if func in (aten.add_.Tensor, aten.sub_.Tensor, aten.copy_.default):
        return args[0]
    return wrap(out, x.mesh, x.sbp, x.shape)


@rule(aten.mul.Scalar, aten.div.Scalar, aten.mul_.Scalar, aten.div_.Scalar, aten.zero_.default)
def _scale(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = args[0]
    out = func(x._local, *args[1:], **kwargs)
    return x if out is x._local else wrap(out, x.mesh, x.sbp, x.shape)


@rule(aten.mul.Tensor, aten.div.Tensor, aten.mul_.Tensor, aten.div_.Tensor)
def _mul(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x = _first(args)
    others = [a for a in args if isinstance(a, GlobalTensor)]
    if len(others) == 2 and any(_has_partial(a) for a in others):
        raise ValueError(
            f"{func} of two GlobalTensors is not linear in a P operand (layouts "
            f"{[format_sbp(a.sbp) for a in others]}); redistribute P to B or S first"
        )
    if len(others) == 1 and not all(isinstance(a, (int, float)) or a is x or a.dim() == 0 for a in args):
        raise ValueError(f"{func} of a GlobalTensor and a plain non-scalar tensor needs both as GlobalTensors")
    out = func(*_locals(args, x), **kwargs)
    if func in (aten.mul_.Tensor, aten.div_.Tensor):
        return args[0]
    return wrap(out, x.mesh, x.sbp, x.shape)
