"""Stable names for the forward's intermediate values, and the layouts a plan forces on them.

A plan (``ParallelPlan.values``) may fix the layout of a value inside the model, as an automatic search
will. FX node names (``addmm_3``) shift whenever any module gains an op, so a value is named by the module
that made it and the op's place in that module's own forward: ``module.path/op.k``, the k-th ATen ``op``
the module ran itself (``net.0/addmm.0``; the root module's path is empty). While the step is traced,
module hooks write the running module into the node metadata torch copies onto each node it records.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
import torch.utils.checkpoint as checkpointing
from torch import fx, nn

from shardflow.ops.flop_count import RECOMPUTED
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import NdSbp, is_split
from shardflow.plan import PlanError


@contextlib.contextmanager
def module_paths(model: nn.Module) -> Iterator[None]:
    """While tracing, tag each node the forward makes with the innermost module running it (its path in
    ``model.named_modules()``); nothing after the model's forward returns (backward, recomputation)."""
    paths = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    done = [False]

    def tag() -> None:
        if stack:
            fx_traceback.current_meta["custom"] = {"sf_module": stack[-1]}
        else:
            fx_traceback.current_meta.pop("custom", None)

    def pre(module: nn.Module, args: Any) -> None:
        if id(module) in paths and not done[0]:
            stack.append(paths[id(module)])
            tag()

    def post(module: nn.Module, args: Any, out: Any) -> None:
        if id(module) in paths and not done[0] and stack:
            stack.pop()
            done[0] = not stack
            tag()

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre),
        torch.nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        for h in hooks:
            h.remove()
        fx_traceback.current_meta.pop("custom", None)


_TAGGING: contextvars.ContextVar[bool] = contextvars.ContextVar("sf_tag_recomputation", default=False)


@contextlib.contextmanager
def recomputations() -> Iterator[None]:
    """While tracing (in this thread or task), tag the nodes of every recomputation of torch's non-reentrant
    ``checkpoint`` (shardflow's ``recompute=``, a user's own checkpointing, Hugging Face's activation
    checkpointing) as ``RECOMPUTED``. ``checkpoint`` runs its forward with the caller's function and
    recomputes with the one its generator was given, so that one is wrapped to run under ``recomputing()``.
    Not reached: the reentrant variant and callers that import the generator by name; their recomputation
    counts as backward work."""
    _install()
    token = _TAGGING.set(True)
    try:
        yield
    finally:
        _TAGGING.reset(token)


def _install() -> None:
    """Wrap torch's generator once, for good; it does nothing unless ``recomputations()`` is active."""
    original = checkpointing._checkpoint_without_reentrant_generator
    if getattr(original, "_sf_wrapped", False):
        return

    def generator(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not _TAGGING.get():
            return original(fn, *args, **kwargs)

        def again(*a: Any, **k: Any) -> Any:
            with recomputing():
                return fn(*a, **k)

        return original(again, *args, **kwargs)

    generator._sf_wrapped = True  # type: ignore[attr-defined]
    checkpointing._checkpoint_without_reentrant_generator = generator  # type: ignore[assignment]


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """While tracing, tag each node made inside as a recomputed forward (``ops/flop_count.py`` counts it as
    hardware work, not model work)."""
    before = fx_traceback.current_meta.get("custom")
    fx_traceback.current_meta["custom"] = {RECOMPUTED: True}
    try:
        yield
    finally:
        if before is None:
            fx_traceback.current_meta.pop("custom", None)
        else:
            fx_traceback.current_meta["custom"] = before


def value_keys(graph: fx.Graph) -> dict[str, fx.Node]:
    """Stable names of the forward's values, ``module.path/op.k`` (the k-th ATen ``op`` the module ran itself,
    e.g. ``net.0/addmm.0``; the root module's path is empty), set as ``node.meta["sf_key"]``. Plans force
    layouts of intermediate values by them (``ParallelPlan.values``): unlike FX node names, they do not
    shift when another module gains an op."""
    counts: dict[tuple[str, str], int] = {}
    out = {}
    for node in graph.nodes:
        module = (node.meta.get("custom") or {}).get("sf_module")
        if module is None or node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target.overloadpacket.__name__
        k = counts.get((module, op), 0)
        counts[(module, op)] = k + 1
        key = node.meta["sf_key"] = f"{module}/{op}.{k}"
        out[key] = node
    return out


def forced_nodes(graph: fx.Graph, values: Mapping[str, NdSbp], mesh: Mesh) -> dict[fx.Node, NdSbp]:
    """The nodes whose layouts ``values`` fixes; a key naming no value, or a layout that does not fit the
    value, is an error naming the keys there are."""
    if not values:
        return {}
    nodes = {n.meta["sf_key"]: n for n in graph.nodes if "sf_key" in n.meta}
    out = {}
    for key, sbp in values.items():
        node = nodes.get(key)
        if node is None:
            raise PlanError(
                f"the plan forces the layout of value {key!r}, but the forward has no such value; its values "
                f"are named like {list(nodes)[:6]} (module path / op . index within that module's forward)"
            )
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise PlanError(f"value {key!r} is not one tensor ({type(val).__name__}): it cannot be given a layout")
        if len(sbp) != mesh.ndim or any(is_split(p) and p.dim >= val.dim() for p in sbp):  # type: ignore[union-attr]
            raise PlanError(
                f"value {key!r} of shape {tuple(val.shape)} cannot be laid out {sbp}: one placement per mesh "
                f"axis ({mesh.ndim}), splits of dims < {val.dim()}"
            )
        out[node] = tuple(sbp)
    return out
