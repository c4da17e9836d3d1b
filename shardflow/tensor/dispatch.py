"""Eager ATen ops on GlobalTensors: look up the op's layout rule, pick a signature, box the inputs,
run the op on the shards, wrap the outputs.

Like DTensor, autograd runs above this layer, so backward ops come through here too. Global output
shapes come from running the op on meta tensors. Plain tensors may join only as 0-d scalars; anything
else must be a GlobalTensor on the same mesh, so data is never moved without the user saying how.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from shardflow.boxing import empty_local
from shardflow.comm.init import world
from shardflow.ops import LOCALS, LocalContext, OpCall, TensorMeta, choose, writes_arg
from shardflow.placement.sbp import B
from shardflow.placement.shard import local_shape
from shardflow.tensor import fast_path
from shardflow.tensor.global_tensor import GlobalTensor, box, pending, wrap
from shardflow.tensor.trace import _ACTIVE as _RECORDING
from shardflow.tensor.trace import begin_op, end_op, recording_active


def _mesh_of(flat: list[Any], func: Any) -> Any:
    meshes = {a.mesh for a in flat if isinstance(a, GlobalTensor)}
    if len(meshes) > 1:
        a, b = sorted(meshes, key=repr)[:2]
        raise ValueError(
            f"{func}: operands live on different meshes ({a} and {b}); move one first with "
            f"x.redistribute(sbp, mesh=other_mesh)"
        )
    return meshes.pop()


_FAST = "flat"  # the spec of a call whose arguments are all positional and none is a container


def _flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    """pytree flattening, skipped for the common flat positional call (it costs more than the op)."""
    if not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args):
        return list(args), (_FAST, len(args))
    return tree_flatten((args, kwargs))  # type: ignore[return-value]


def _unflatten(flat: list[Any], spec: Any) -> tuple[Any, Any]:
    if isinstance(spec, tuple) and spec[0] == _FAST:
        return tuple(flat), {}
    return tree_unflatten(flat, spec)  # type: ignore[no-any-return]


def _flatten_out(out: Any) -> tuple[list[Any], Any]:
    if isinstance(out, torch.Tensor):
        return [out], None
    return tree_flatten(out)  # type: ignore[return-value]


def _unflatten_out(flat: list[Any], spec: Any) -> Any:
    return flat[0] if spec is None else tree_unflatten(flat, spec)


_COORDS: dict[Any, tuple[int, ...] | None] = {}


def _coord(mesh: Any) -> tuple[int, ...] | None:
    """This rank's coordinate in ``mesh`` (None outside it), looked up once per mesh and process group."""
    rank = world()[0]
    key = (mesh, rank)
    if key not in _COORDS:
        _COORDS[key] = mesh.coord_of(rank) if rank in mesh else None
    return _COORDS[key]


def _boxer(mesh: Any) -> Any:
    def run(local: torch.Tensor, src: Any, shape: tuple[int, ...], dst: Any) -> torch.Tensor:
        return box(wrap(local, mesh, src, shape), mesh, dst)._local

    return run


# Decisions (signature, output metadata) per op call shape: layouts depend only on op, mesh, argument
# metadata and input layouts, so eager ops after the first pay a dict lookup, not meta execution + search.
_DECISIONS: dict[Any, Any] = {}


_IMPLICIT_B = [False]


@contextlib.contextmanager
def implicit_broadcast() -> Iterator[None]:
    """Inside, plain tensors meeting GlobalTensors count as ``B`` (every rank computed the same one), as
    when a compiled model builds positions or masks in its forward."""
    old, _IMPLICIT_B[0] = _IMPLICIT_B[0], True
    try:
        yield
    finally:
        _IMPLICIT_B[0] = old


def _key_of(a: Any) -> Any:
    if isinstance(a, GlobalTensor):
        return ("gt", tuple(a.shape), a.dtype)
    if isinstance(a, torch.Tensor):
        return ("t", tuple(a.shape), a.dtype)
    try:
        hash(a)
        return a
    except TypeError:
        return repr(a)


def _decide(
    func: Any,
    mesh: Any,
    spec: Any,
    flat: list[Any],
    where: list[int],
    gts: list[GlobalTensor],
    mutated: tuple[int, ...],
) -> Any:
    metas = tuple(TensorMeta(tuple(g.shape), g.dtype) for g in gts)
    meta_flat = list(flat)
    for i, m in zip(where, metas):
        meta_flat[i] = m
    margs, mkwargs = _unflatten(meta_flat, spec)
    call = OpCall(func, tuple(margs), dict(mkwargs), metas)
    # global shapes of the outputs, from the op on meta tensors; a device argument (``x.to("cpu")``) is meta
    # too, as a copy out of a meta tensor has no data to copy
    dev_flat = [_on_meta(a) for a in flat]
    dargs, dkwargs = _unflatten(dev_flat, spec)
    out_flat, out_spec = _flatten_out(func(*dargs, **dkwargs))
    out_metas = tuple(TensorMeta(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else o for o in out_flat)
    ins, outs = choose(call, mesh, [g.sbp for g in gts], fixed=mutated)
    # the outputs' signatures, interned at the first wrap on a device: the fast path keys calls by them
    sigs: list[Any] = [None] * len(out_metas)
    return call, ins, outs, out_metas, out_spec, sigs


def _on_meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.empty(a.shape, dtype=a.dtype, device="meta")
    return torch.device("meta") if isinstance(a, torch.device) else a


# The fast path: a call already decided whose inputs need no boxing, whose op has no local implementation,
# changes no input and returns one tensor is, from then on, "unwrap, call the op, wrap" keyed by what the
# decision depended on (op, each input's mesh, layout, shape and dtype, the other arguments, the policy).
# It skips flattening, the decision's key and the output checks, which cost more than a small op itself.
_HITS: dict[Any, tuple[Any, Any, Any, Any]] = {}


def _fast_key(func: Any, args: tuple[Any, ...]) -> Any:
    """The fast path's key for a flat positional call of GlobalTensors and scalars; None for other calls."""
    key: list[Any] = [func]
    for a in args:
        if type(a) is GlobalTensor:
            key.append((id(a._mesh), a._sbp, a.shape, a.dtype))
        elif isinstance(a, (torch.Tensor, list, tuple, dict)):
            return None
        else:
            key.append(a)
    return tuple(key)


def dispatch(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    rec = pending()  # a __torch_function__ call being recorded for its fast path: count the ops it makes
    if rec is not None:
        rec[1] += 1
    fast = None if kwargs or _RECORDING[0] is not None else _fast_key(func, args)
    if fast is not None:
        try:
            hit = _HITS.get(fast)
        except TypeError:  # an unhashable argument
            hit = fast = None
        if hit is not None:
            mesh, sbp, shape, sig = hit
            op = getattr(func, "_op", func)  # the C++ op behind an OpOverload: one Python frame less
            r = op(*[a._local if type(a) is GlobalTensor else a for a in args])
            # the key holds no device: the signature only where it is the result's (a meta copy has its own)
            out = GlobalTensor(r, mesh, sbp, shape, sig=sig if sig is not None and sig.device == r.device else None)
            if rec is not None and not getattr(func, "is_view", True):
                rec[2], rec[3] = out, args
            return out
    if func is torch.ops.aten._local_scalar_dense.default:  # .item(): the logical value, on every rank
        x = args[0]
        return box(x, x.mesh, (B,) * x.mesh.ndim)._local.item()
    flat, spec = _flatten(args, kwargs)
    mesh = _mesh_of(flat, func)
    for i, a in enumerate(flat):
        if isinstance(a, torch.Tensor) and not isinstance(a, GlobalTensor) and a.dim() > 0:
            if _IMPLICIT_B[0]:  # a tensor the model made itself (arange, a mask): the same on every rank
                flat[i] = wrap(a, mesh, (B,) * mesh.ndim, a.shape)
                continue
            raise ValueError(
                f"{func} mixes a GlobalTensor with a plain tensor of shape {tuple(a.shape)}; lay it out first "
                f"with sf.distribute(t, mesh, sbp) or GlobalTensor.from_local"
            )
    where = [i for i, a in enumerate(flat) if isinstance(a, GlobalTensor)]
    gts: list[GlobalTensor] = [flat[i] for i in where]
    mutated = (0,) if where and where[0] == 0 and writes_arg(func, 0) else ()
    key_flat = [_key_of(a) for a in flat]
    key = (func, mesh, spec, tuple(key_flat), tuple(g.sbp for g in gts), mutated)
    decision = _DECISIONS.get(key)
    first_use = decision is None
    if decision is None:
        if len(_DECISIONS) > 8192:  # floats in arguments (learning rates, ...) make new keys: stay bounded
            _DECISIONS.clear()
        decision = _DECISIONS[key] = _decide(func, mesh, spec, flat, where, gts, mutated)
    call, ins, outs, out_metas, out_spec, sigs = decision
    local_flat = list(flat)
    if recording_active():
        begin_op(str(func), tuple(g.sbp for g in gts), ins, outs)
    try:
        for i, g, need in zip(where, gts, ins):
            local_flat[i] = box(g, mesh, need)._local
    finally:
        end_op()
    largs, lkwargs = _unflatten(local_flat, spec)

    shapes = tuple(m.shape if isinstance(m, TensorMeta) else None for m in out_metas)
    coord = _coord(mesh)
    if coord is None:  # no data here: every output is an empty local
        if mutated:
            return args[0]
        dev = gts[0]._local.device
        tensor_outs = iter(outs)
        empties = [
            wrap(empty_local(o.dtype, dev), mesh, next(tensor_outs), o.shape) if isinstance(o, TensorMeta) else o
            for o in out_metas
        ]
        return _unflatten_out(empties, out_spec)
    fn = LOCALS.get(func)
    if fn is not None:
        ctx = LocalContext(call, mesh, coord, ins, outs, shapes, _boxer(mesh))
        result = fn(ctx, tuple(largs), dict(lkwargs))
    else:
        result = func(*largs, **lkwargs)
    if mutated:
        return args[0]
    if (
        fast is not None
        and fn is None
        and isinstance(result, torch.Tensor)
        and all(g.sbp == need for g, need in zip(gts, ins))
        and all(g.mesh is mesh for g in gts)
        and not first_use
    ):
        if len(_HITS) > 8192:
            _HITS.clear()
        _HITS[fast] = (mesh, outs[0], shapes[0], sigs[0])
    res_flat, res_spec = _flatten_out(result)
    wrapped, j = [], 0
    for i, (r, shape) in enumerate(zip(res_flat, shapes)):
        if isinstance(r, torch.Tensor):
            assert shape is not None
            want = local_shape(shape, outs[j], mesh.shape, coord) if first_use else tuple(r.shape)
            if tuple(r.shape) != want:  # checked when a decision is new: rules are deterministic
                raise AssertionError(
                    f"layout rule bug: {func} with inputs {ins} gave a local of shape {tuple(r.shape)} for output "
                    f"{j} of global shape {shape} in layout {outs[j]}, expected {want}"
                )
            sig = sigs[i]
            if sig is None or sig.dtype != r.dtype or sig.device != r.device:
                sig = fast_path.sig(mesh, outs[j], tuple(shape), r.dtype, r.device)
                if sigs[i] is None:
                    sigs[i] = sig
            wrapped.append(wrap(r, mesh, outs[j], shape, sig))  # type: ignore[arg-type]
            j += 1
        else:
            wrapped.append(r)
    if (
        rec is not None
        and fast is not None
        and fn is None
        and res_spec is None
        and not getattr(func, "is_view", True)  # below ADInplaceOrView no local shows as a view: ask the schema
        and all(g.sbp == need and g.mesh is mesh for g, need in zip(gts, ins))
    ):  # one output, no boxing, no local implementation, no view: the fast path may stand for this call
        rec[2], rec[3] = wrapped[0], args
    return _unflatten_out(wrapped, res_spec)
