"""Measured op and update times on this machine, for pricing plans on its own profile.

A roofline holds for large kernels and is far off for the small ones a CPU job runs: a 3-channel convolution
or a max-pool reaches a tenth of the calibrated rate. Where the plan is priced for the machine the estimate
runs on (its own calibrated profile), each distinct op on its local shapes is timed once on random operands
with the rank's thread count, and that time replaces its roofline; other devices (a datasheet's H100) keep
the roofline. Only small work is timed (``TIMED_SECONDS``, ``TIMED_BYTES``): large kernels run near their
roofline. Decision: vTrain's and Proteus' way (profile each distinct kernel once, cache it), since the op's own
schema and local shapes are in the program already; an op that will not run on random operands, writes an
input in place, or does not give the program's local shapes when called as is (its local function in
``ops/`` computes something else) keeps its roofline.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten, tree_map

from shardflow.cost.profile import DeviceProfile, machine_name
from shardflow.runtime.meter import rank_threads

_TIMES: dict[tuple[str, int, str], float | None] = {}  # (op and local shapes, threads, device) -> seconds
_BUDGET = 2e-3  # seconds of calls per timed batch
# what is timed: work the roofline prices under 0.1 s, on operands under 64 MiB. Larger work runs near its
# roofline, and timing it would cost as much time and memory as running it
TIMED_SECONDS = 0.1
TIMED_BYTES = 64 << 20


class KernelCall(NamedTuple):
    """An ATen op on local shapes: tensor arguments as ``(shape, dtype)`` metadata, the rest as given, and
    the local shapes its tensor results must have (an op whose local function rewrites its size arguments
    gives other shapes when called as is: it is not what the program runs, and keeps its roofline)."""

    func: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outs: tuple[tuple[int, ...], ...]

    def key(self) -> str:
        return f"{self.func}{self.args!r}{sorted(self.kwargs.items())!r}{self.outs!r}"


def measures_here(profile: DeviceProfile) -> bool:
    """Whether ``profile`` is this machine's own calibrated CPU profile, so its ops can be timed here."""
    return profile.calibrated and profile.device_type == "cpu" and profile.name == machine_name()


def timed_here(profile: DeviceProfile, roofline: float, nbytes: int) -> bool:
    """Whether work the roofline prices at ``roofline`` seconds over ``nbytes`` is timed here instead."""
    return roofline < TIMED_SECONDS and nbytes <= TIMED_BYTES and measures_here(profile)


def kernel_seconds(call: KernelCall, profile: DeviceProfile) -> float | None:
    """Median seconds of one ``call`` on this machine with the profile's threads (cached), or None where it
    cannot run on random operands."""
    key = (call.key(), profile.threads, profile.device_type)
    if key not in _TIMES:
        _TIMES[key] = _time(call, profile.threads)
    return _TIMES[key]


def _time(call: KernelCall, threads: int) -> float | None:
    with _as_a_rank(threads):
        try:
            args, kwargs = tree_map(_operand, (call.args, dict(call.kwargs)))
            with torch.no_grad():
                got = call.func(*args, **kwargs)  # warm-up (and: does it run at all, to the program's shapes)
                shapes = tuple(tuple(t.shape) for t in tree_flatten(got)[0] if isinstance(t, torch.Tensor))
                if shapes != call.outs:
                    return None
                return _median_call(lambda: call.func(*args, **kwargs))
        except Exception:  # noqa: BLE001 - whatever an op raises on random operands, it keeps its roofline
            return None


@contextlib.contextmanager
def _as_a_rank(threads: int) -> Iterator[None]:
    """With a rank's intra-op threads (0: as they are), and the caller's random stream left as it was."""
    with rank_threads(threads), torch.random.fork_rng(devices=[]):
        yield


def _median_call(fn: Callable[[], object]) -> float:
    """Median seconds of one call of ``fn``, over 3 batches of about ``_BUDGET`` seconds each."""
    start = time.perf_counter()
    fn()
    inner = max(1, min(1000, math.ceil(_BUDGET / max(time.perf_counter() - start, 1e-7))))
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def _operand(x: Any) -> Any:
    """A random tensor for tensor metadata (indices and masks zero: valid for any gather), a CPU device for a
    device argument, anything else as it is."""
    if isinstance(x, torch.device):
        return torch.device("cpu")
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if isinstance(x, torch.Tensor) or shape is None or not isinstance(dtype, torch.dtype):
        return x
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), dtype=dtype)
    return torch.zeros(tuple(shape), dtype=dtype)


def update_seconds_here(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], profile: DeviceProfile, skipped: int = 0
) -> float | None:
    """Median seconds of one ``optimizer`` update of tensors shaped as ``params`` on this machine (cached): a
    fresh optimizer of the same class and settings over random tensors, its state made by a first step, and
    ``skipped`` more parameters without a gradient that each step walks past; None where that optimizer
    cannot be made from its settings alone (the roofline prices it)."""
    accepted = inspect.signature(type(optimizer)).parameters  # defaults may hold more (AdamW's decoupling)
    settings = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "differentiable"}
    shapes = tuple((tuple(p.shape), p.dtype) for p in params)
    what = f"{type(optimizer).__name__}{sorted(settings.items())!r}{shapes!r} and {skipped}"
    key = (what, profile.threads, profile.device_type)
    if key not in _TIMES:
        _TIMES[key] = _time_update(type(optimizer), settings, shapes, skipped, profile.threads)
    return _TIMES[key]


def _time_update(
    cls: type, settings: dict[str, Any], shapes: tuple[Any, ...], skipped: int, threads: int
) -> float | None:
    with _as_a_rank(threads):
        try:
            tensors = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape, dtype in shapes]
            for t in tensors:
                t.grad = torch.randn_like(t)
            idle = [torch.zeros(1, requires_grad=True) for _ in range(skipped)]  # never stepped: size is moot
            optimizer = cls(tensors + idle, **settings)
            optimizer.step()  # its state
            return _median_call(optimizer.step)
        except Exception:  # noqa: BLE001 - one that needs more than its settings (a closure) keeps the roofline
            return None
