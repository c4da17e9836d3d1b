"""One GPU: a static step captured once as a CUDA graph and replayed.

A lowered program (graph/lower.py) launches the same kernels on the same shapes every step, so on one
device its step, with clipping and the optimizer update, can be recorded once into a ``torch.cuda.CUDAGraph``
and replayed: one launch instead of Python, ATen dispatch and a kernel launch per op. This is torch's
whole-network capture recipe (``torch.cuda.graph``: warm up, capture with static inputs, optimizer with
``capturable``), applied to the plan shardflow already holds:

- warm-up: the first ``warmup`` steps of a program run eagerly (its first run checks shapes; cuBLAS
  workspaces and the optimizer's state come into being), then the step is captured and replayed from then
  on. The batch is copied into the graph's own input tensors before each replay.
- what the graph reads by address is fingerprinted each step: parameters, buffers, the optimizer's state
  tensors and its hyper-parameters. A load, a replaced tensor or a changed learning rate makes the next
  step capture anew, never replay stale addresses or a stale constant (a float ``lr`` is baked into the
  captured kernels; a tensor ``lr``, which torch's capturable optimizers read from device memory, is
  fingerprinted by identity and may change in place).
- ops that synchronise with the host cannot be captured. CUDA's ``embedding_dense_backward`` does on some
  torch versions (the host reads its sort's segment count); during capture it is replaced by a scatter-add
  accumulated in float32, as the native kernel accumulates (``capture_safe``).
- a program compiled by Inductor (runtime/inductor.py) is captured with its compiled kernels; where dynamo
  split it and the later part would recompile under capture, that part runs op by op inside the capture.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from shardflow.placement.mesh import Mesh

aten = torch.ops.aten


def check_graphable(mesh: Mesh, zero: int) -> None:
    """Raise unless a step on ``mesh`` can be replayed as one CUDA graph (one GPU, nothing to shard)."""
    if mesh.device_type != "cuda" or mesh.size != 1:
        raise ValueError(
            f"cuda_graphs=True replays a step on one GPU; {mesh} is not a one-device CUDA mesh: compile for "
            "sf.Mesh('cuda', (1,)) or leave cuda_graphs=False"
        )
    if zero:
        raise ValueError(f"cuda_graphs=True with zero={zero}: one device has nothing to shard; leave zero=0")


def embedding_backward(
    grad: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int, scale_grad_by_freq: bool
) -> torch.Tensor:
    """``aten.embedding_dense_backward`` without a host read: rows summed by ``index_add_`` in float32 (or
    wider). On CUDA the sum's order is the atomics', not the native kernel's sorted one."""
    dim = grad.shape[-1]
    flat = indices.reshape(-1)
    acc = torch.promote_types(grad.dtype, torch.float32)  # as the native kernel accumulates
    rows = grad.reshape(-1, dim).to(acc)
    if padding_idx >= 0:  # the padding row gets no gradient
        rows = rows * (flat != padding_idx).unsqueeze(-1).to(rows.dtype)
    if scale_grad_by_freq:  # each row divided by how often its index occurs in the batch
        counts = torch.zeros(num_weights, dtype=rows.dtype, device=rows.device)
        counts.index_add_(0, flat, torch.ones_like(flat, dtype=rows.dtype))
        rows = rows / counts.index_select(0, flat).unsqueeze(-1)
    out = torch.zeros(num_weights, dim, dtype=acc, device=grad.device)
    return out.index_add_(0, flat, rows).to(grad.dtype)


_REPLACED: dict[Any, Callable[..., Any]] = {aten.embedding_dense_backward.default: embedding_backward}


class capture_safe(TorchDispatchMode):
    """Run ops that would synchronise with the host during capture by equivalents that do not. Only the
    capture pays the Python dispatch: a replay runs the recorded kernels."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        replacement = _REPLACED.get(func)
        if replacement is not None:
            return replacement(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def make_capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Set ``capturable`` on every parameter group of an optimizer that has the option (Adam, AdamW, …: their
    step count then lives on the device, so a replayed update counts steps) and move existing step counts
    there; returns whether the update can be captured (also true for optimizers without step counts, SGD)."""
    if "capturable" not in optimizer.defaults:
        return isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = step.to(p.device, torch.float32)
    return True


def fingerprint(tensors: Sequence[Any], optimizer: torch.optim.Optimizer) -> Hashable:
    """What a captured step reads by address or bakes in: the tensors' storages, the optimizer's state
    tensors and its hyper-parameters (tensor-valued ones by identity)."""
    ptrs = tuple(t.data_ptr() if isinstance(t, torch.Tensor) else t for t in tensors)
    state = tuple(v.data_ptr() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    hyper = tuple(
        tuple((k, id(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in g.items() if k != "params")
        for g in optimizer.param_groups
    )
    return ptrs, state, hyper


class GraphedStep:
    """One program's step: ``body(args)`` (device work only, no host reads; returns the step's outputs) run
    eagerly for ``warmup`` steps, then captured and replayed while ``key`` stays the same. A compiled program
    (runtime/inductor.py) compiles in the warm-up's second step, so capture records Inductor's kernels."""

    def __init__(self, body: Callable[[list[Any]], Any], warmup: int = 2, safe: bool = True, owner: Any = None) -> None:
        self.body, self.warmup = body, warmup
        self.safe = safe  # capture under ``capture_safe`` (ATen ops; Inductor's kernels need no swap)
        self.owner = owner  # what the body was built for (a program): callers start anew when it changes
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Hashable = None
        self.eager = 0  # eager steps run so far (warm-up)
        self.captures = 0
        self.replays = 0
        self.last = ""  # what the last call did: "eager", "capture" (then replayed) or "replay"
        self.in_a_row = 0  # captures on consecutive calls
        self.inputs: list[Any] = []  # the graph's own copies of the inputs, by position
        self.outputs: Any = None  # what the captured body returned: the graph writes them on each replay

    def __call__(self, fixed: Sequence[Any], inputs: Sequence[Any], key: Hashable) -> Any:
        """Step with ``fixed`` args (read in place: parameters, buffers) and ``inputs`` (copied in)."""
        if key != self.key:  # something the graph reads by address, or a baked-in value, changed
            self.graph, self.key = None, key
        if self.graph is None and self.eager < self.warmup:
            self.eager += 1
            self.last = "eager"
            # on a side stream, as capture runs (torch's recipe: state set up lazily per stream exists there)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.body([*fixed, *inputs])
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self._capture(fixed, inputs)
        else:
            self.in_a_row, self.last = 0, "replay"
            for mine, x in zip(self.inputs, inputs):
                if isinstance(mine, torch.Tensor):
                    mine.copy_(x, non_blocking=True)
        assert self.graph is not None
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _capture(self, fixed: Sequence[Any], inputs: Sequence[Any]) -> None:
        self.graph = None
        self.inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        torch.cuda.synchronize()  # the warm-up's work is done before capture begins
        graph = torch.cuda.CUDAGraph()
        # NOTE: a compiled program that dynamo split at a graph break recompiles its later part under
        # capture (a tensor crossing the break, such as attention's RNG state, may sit on the host in
        # warm-up and on the device under capture). Compiling cannot be captured, so that part runs op by op
        # inside the capture (the stance keeps compiled code wherever its guards still hold). Capture errors
        # are this thread's only ("thread_local"): a loader thread copying the next batch goes on.
        stance = torch.compiler.set_stance("eager_on_recompile")
        safe = capture_safe() if self.safe else contextlib.nullcontext()
        try:
            with stance, torch.cuda.graph(graph, capture_error_mode="thread_local"), safe:
                self.outputs = self.body([*fixed, *self.inputs])
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise RuntimeError(
                f"CUDA graph capture of the step failed ({e}). The likely cause: an op in the model or its "
                "optimizer reads back to the host. Compile with cuda_graphs=False to run the step op by op."
            ) from e
        self.graph = graph
        self.captures += 1
        self.last = "capture"
        self.in_a_row += 1
        if self.in_a_row == 3:
            warnings.warn(
                "the step was captured anew on 3 steps in a row: something the CUDA graph bakes in changes every "
                "step, likely a learning-rate schedule setting a float lr. Give the optimizer a tensor lr on the "
                "device (schedulers update it in place) or compile with cuda_graphs=False.",
                stacklevel=3,
            )
