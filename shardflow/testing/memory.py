"""Measure what a training step really allocates, without asking the planner: torch's profiler records
every allocation and free of the step (``profile_memory=True``); the peak is the largest running sum of
them on top of the bytes alive when the step starts (storages of the parameters, buffers, optimizer
state and gradients, counted from the objects themselves). CPU only: on GPU use
``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

import collections
import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from shardflow.graph import lower
from shardflow.runtime.tensor_stage import local

_MARK = 777_781  # bytes


def memory_case(kind: str) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
    """(model, batch) of the memory test and benchmark: ``"gpt"`` (2 layers, 128 wide, 8 x 64 tokens),
    ``"cnn"`` (BatchNorm CNN, 32 x 3 x 32 x 32 images) or ``"mlp"`` (256 -> 1024 -> 1024 -> 16, batch 64), the
    same weights every call."""
    from shardflow.models import GPT, MLP, CNNConfig, GPTConfig, MLPConfig, SmallCNN

    torch.manual_seed(0)
    if kind == "gpt":
        x = torch.randint(0, 256, (8, 64))
        return GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128)), (x, x)
    if kind == "cnn":
        cnn = SmallCNN(CNNConfig(in_channels=3, image_size=32, channels=(16, 32), num_classes=10))
        return cnn, (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    model = MLP(MLPConfig(in_features=256, hidden_sizes=(1024, 1024), num_classes=16))
    return model, (torch.randn(64, 256), torch.randint(0, 16, (64,)))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct CPU storages behind ``tensors``, counted from the objects (not the planner)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def alive_before_step(pm: Any) -> int:
    """Bytes of the distinct storages a ParallelModule holds between steps."""
    return storage_bytes(_held(pm))


def _held(pm: Any) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = [p._local for p in pm.params]
    tensors += [b._local for b in pm.module.buffers() if hasattr(b, "_local")]
    tensors += [lp.grad for lp in pm.local_params if lp.grad is not None]
    for state in pm.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    # static placement's arenas (graph/arena.py), held from a program's first run on
    tensors += [p.arena.buffer for p in pm.programs.values() if p.arena is not None and p.arena.buffer is not None]
    return tensors


def _waited(launch: Callable[..., Any], work: Callable[[Any], Any]) -> Callable[..., Any]:
    def launch_and_wait(*args: Any) -> Any:
        handle = launch(*args)
        if work(handle) is not None:
            work(handle).wait()
        return handle

    return launch_and_wait


@contextlib.contextmanager
def collectives_waited_at_launch() -> Iterator[None]:
    """Programs lowered inside wait for every asynchronous collective where it is launched (gradient
    buckets, reduce-scatter buckets, prefetched gathers): the same buffers and order, no overlap."""
    saved = lower._launch, lower._launch_scatter, lower.start_plan
    lower._launch = _waited(saved[0], lambda h: h[0])  # type: ignore[assignment]
    lower._launch_scatter = _waited(saved[1], lambda h: h.work)  # type: ignore[assignment]
    lower.start_plan = _waited(saved[2], lambda h: h.work)  # type: ignore[assignment]
    try:
        yield
    finally:
        lower._launch, lower._launch_scatter, lower.start_plan = saved


def _allocations(prof: Any) -> list[tuple[int, int, int, int]]:
    """Every allocation (size > 0) and free (size < 0) the profiler saw: ``(time ns, size, address, thread)``,
    from its raw event tree (the allocator's own records), in time order."""
    from torch._C._profiler import _EventType

    out: list[tuple[int, int, int, int]] = []
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            out.append((node.start_time_ns, f.alloc_size, f.ptr, node.start_tid))
        todo += node.children
    return sorted(out)


def profiled_peak(prof: Any, marked: bool = False, held: Iterable[int] = ()) -> int:
    """The most bytes allocated above the start at any moment, from a profiler run's allocation records;
    with ``marked``, counted from the marker block on (``_MARK`` bytes, allocated and freed by the step's
    thread). ``held``: addresses of storages alive at the start and counted by the caller, whose frees then
    count too (the frees of other blocks from before the start are not this figure's).

    Each free is matched to its allocation by address. Two ways the records fall short are handled: gloo
    allocates staging blocks on its own threads (an output-sized block per all-gather) and their frees are
    never recorded, so an allocation on another thread than the step's counts for its moment only; and a
    block freed by gloo's thread (its last reference dropped there) has no recorded free, which shows when
    the allocator hands out its address again: the earlier block was freed by then. (Summing the
    per-operator figures of ``prof.events()`` instead loses or folds frees that happen inside an open region:
    the optimizer's, an asynchronous collective's or a pending send's.)"""
    events = _allocations(prof)
    if marked:
        first = next(i for i, (_, size, _, _) in enumerate(events) if size == _MARK)
        main = events[first][3]
    else:  # the step's thread is the one that allocates most often
        first = -1
        main = collections.Counter(th for _, size, _, th in events if size > 0).most_common(1)[0][0]
    before = set(held)
    live: dict[int, int] = {}
    run = peak = 0
    for _, size, ptr, thread in events[first + 1 :]:
        if abs(size) == _MARK:
            continue
        if size > 0:
            if thread != main:
                peak = max(peak, run + size)
                continue
            run -= live.pop(ptr, 0)  # an address handed out again: the block there was freed unrecorded
            before.discard(ptr)
            live[ptr] = size
            run += size
            peak = max(peak, run)
        elif ptr in live:
            run -= live.pop(ptr)
        elif ptr in before:  # a block counted at the start (an old gradient, say) freed during the step
            before.discard(ptr)
            run += size
    return peak


def storage_addresses(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Addresses of the CPU storages behind ``tensors`` (the blocks the allocator handed out for them)."""
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu"}


def measure_step_peak(pm: Any, *inputs: Any) -> tuple[int, float]:
    """(peak bytes during ``pm.step(*inputs)``, the step's loss), measured by the profiler.

    Two steps run under the profiler and the second is measured: the profiler does not see frees of blocks
    allocated before it started, and a step frees what the step before it made (gradients, input shards).
    """
    # ``profiled_peak`` takes what other threads allocate as momentary (gloo's staging), so the measured
    # steps keep the step's own allocations on its thread: programs lowered with bucket all-reduces,
    # reduce-scatters and prefetched gathers waited for at once (gloo's thread would otherwise drop the
    # last reference to some blocks: frees it never records), and each unit's update run inline at its
    # release point, not on the optimizer actor (the same allocations and frees in the same order; only
    # the overlap goes). The optimizer runs without its record_function wrapper (harmless for the
    # allocation records; summing per-operator figures instead folded the frees inside it).
    step = type(pm.optimizer).step
    unwrapped = getattr(step, "__wrapped__", step)
    pm.optimizer.step = types.MethodType(unwrapped, pm.optimizer)
    programs, updates = dict(pm.programs), pm.updates
    pm.programs.clear()
    pm.updates = "inline" if updates == "actors" else updates
    try:
        with collectives_waited_at_launch(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            pm.step(*inputs)
            held = _held(pm)
            base, addresses = storage_bytes(held), storage_addresses(held)
            del held  # the step frees some of these (the last gradients): no reference may keep them
            # a block of an odd size marks where the measured step begins (a record_function region would swallow
            # the free events that happen between ops, which the profiler then reports as the region's own)
            mark = torch.empty(_MARK, dtype=torch.uint8)
            del mark
            loss = pm.step(*inputs)
    finally:
        del pm.optimizer.step  # back to the class's method
        pm.updates = updates
        pm.programs.clear()
        pm.programs.update(programs)
    return base + profiled_peak(prof, marked=True, held=addresses), loss


def measure_pipeline_peak(pm: Any, *inputs: Any) -> tuple[int, float]:
    """(peak bytes during one pipelined ``pm.step(*inputs)`` on this rank, its loss), measured by the profiler
    on top of the storages held before the step (parameters, gradients, optimizer state)."""
    step = type(pm.optimizer).step if pm.optimizer is not None else None
    if step is not None:  # see measure_step_peak: frees inside the optimizer's region would be folded
        pm.optimizer.step = types.MethodType(getattr(step, "__wrapped__", step), pm.optimizer)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            pm.step(*inputs)
            # a tensor-parallel stage's parameters and gradients are GlobalTensors: their local shards count
            tensors = [local(p).detach() for p in pm.params] + [local(p.grad) for p in pm.params if p.grad is not None]
            if pm.optimizer is not None:
                for state in pm.optimizer.state.values():
                    tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
            arenas = [p.program.arena for p in pm.programs.values() if p.program.arena is not None]
            tensors += [a.buffer for a in arenas if a.buffer is not None]  # held from the first step on
            base, addresses = storage_bytes(tensors), storage_addresses(tensors)
            del tensors  # the step frees some of these: no reference may keep them
            mark = torch.empty(_MARK, dtype=torch.uint8)
            del mark
            loss = pm.step(*inputs)
    finally:
        if step is not None:
            del pm.optimizer.step
    return base + profiled_peak(prof, marked=True, held=addresses), loss
