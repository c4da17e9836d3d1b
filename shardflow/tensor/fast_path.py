"""The eager fast path at ``__torch_function__``: a call seen before runs the same function on the shards.

DTensor and the slow path here meet ops at ``__torch_dispatch__``, below autograd: the op goes from Python
into the dispatcher and back to a Python handler (what that costs: BENCHMARKS.md, Training). A call that needs no
boxing, no gradient and no local implementation, and that the dispatcher turned into exactly one ATen op,
is remembered by its ``__torch_function__`` key (function, each input's layout signature, the other
arguments and their types). The next such call is answered one level up: the same public function on the
local shards, wrapped with the remembered layout, never entering the dispatcher on the wrapper.

What it refuses (then the slow path decides, as before): keyword arguments, containers, plain tensors,
anything that requires a gradient, an active dispatch mode (it must see the op on GlobalTensors), Python
functions and C ones whose ATen op got other arguments than the call (both could compute from the global
shape what on the shards they would compute from the local one), views (the wrapper's view relation
belongs to autograd), results of another dtype than the first one had (autocast).
"""

from __future__ import annotations

from typing import Any

import torch

# (function, key of each argument) -> hit(); filled by the slow path (``tensor.dispatch``), read by
# ``GlobalTensor.__torch_function__``. Bounded: floats in arguments make new keys.
HITS: dict[Any, tuple[Any, ...]] = {}
LIMIT = 8192


class Sig:
    """One layout signature (mesh, sbp, global shape, dtype, the local's device), interned: keys hash it
    by identity. With the device in it, the inputs' signatures fix the output's device (calls that move
    data between devices take keyword arguments or make no ATen op here: never remembered)."""

    __slots__ = ("mesh", "sbp", "shape", "dtype", "device")

    def __init__(self, mesh: Any, sbp: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> None:
        self.mesh, self.sbp, self.shape, self.dtype, self.device = mesh, sbp, shape, dtype, device


_SIGS: dict[Any, Sig] = {}


def sig(mesh: Any, sbp: Any, shape: tuple[int, ...], dtype: Any, device: Any) -> Sig:
    key = (id(mesh), sbp, shape, dtype, device)
    s = _SIGS.get(key)
    if s is None:
        if len(_SIGS) > LIMIT:
            _SIGS.clear()  # tensors keep their Sig objects; new ones only miss once
        s = _SIGS[key] = Sig(mesh, sbp, shape, dtype, device)  # holds the mesh: its id stays its own
    return s


def hit(out: Sig, local: Any) -> tuple[Any, ...]:
    """What a remembered call gives, as one tuple the handler unpacks at once: the output's global
    shape, its local's dtype and device here, the output's signature."""
    return (out.shape, local.dtype, local.device, out)


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def plain_arg(a: Any) -> bool:
    """Arguments a kept key may hold (by value, keeping nothing alive): numbers, strings, None, dtypes,
    devices, layouts, memory formats, tuples of numbers."""
    if isinstance(a, _SCALARS):
        return True
    return isinstance(a, tuple) and all(isinstance(v, (int, float, bool)) for v in a)


def same_args(op_args: Any, args: Any) -> bool:
    """Whether the ATen op was called with exactly the function's arguments (the same tensors in the same
    places, equal numbers of the same types): not a composite that computed its op's arguments, perhaps
    from the global shape (``sum_to_size``), which on the shards would compute them from the local one."""
    return (
        op_args is not None
        and len(op_args) == len(args)
        and all(x is y or _same_value(x, y) for x, y in zip(op_args, args))
    )


def _same_value(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return False  # tensors match by identity only (``==`` would compare them elementwise)
    return type(x) is type(y) and bool(x == y)


# Remembered for a call the fast path cannot stand for (in-place, boxing, several ops...): the next one
# goes straight to the slow path without being recorded again.
NEVER: tuple[Any, ...] = ()


def remember(key: Any, out: Sig | None, local: Any = None) -> None:
    if len(HITS) > LIMIT:
        HITS.clear()
    HITS[key] = NEVER if out is None else hit(out, local)
