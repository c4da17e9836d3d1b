"""A lowered program's kernels fused by Inductor (``torch.compile``) instead of run op by op.

A program (graph/lower.py) is straight-line Python over ATen ops, forward and backward in one function, so
``torch.compile`` traces it as it is: Inductor fuses the pointwise and reduction chains around the matrix
products (layer norms, GELU, the loss's softmax) and plans its own buffers, which is where ``torch.compile``
of a model gains over eager on a GPU. Boxing on a one-device mesh moves no data and its plans are bound at
lowering (``bound_plan``), so the trace holds only tensor work (where dynamo still splits it,
runtime/cuda_graph.py copes).

On several ranks the program also communicates: gradient buckets launched mid-backward, boxing between
layouts, units handed to the update actors through ``ready``. The asynchronous messages (bucket launches
and their waits, prefetching gathers, point-to-point sends) and the hand-offs break the graph, so the
stretches between them compile on their own, as torch's DDPOptimizer splits a DDP model's graph at its
buckets, and communication overlaps compute as in the op-by-op program. Blocking collectives inside
boxing (a tp all-reduce) are traced by dynamo as functional collectives and stay in the graph. Every rank
issues its collectives in program order either way: graph breaks keep it, and Inductor keeps collectives
in graph order unless ``reorder_for_compute_comm_overlap`` is set, which is pinned off here.

``ready`` changes every step (the step's actors). The compiled code calls one fixed trampoline instead,
which forwards to the current step's, so a new step does not recompile. Where the update runs after
backward (one device, or ``pm.updates = "after"``), nothing is released and the trampoline's breaks go.
The program's first run stays op by op (it checks local shapes); the second compiles, and a rank that
compiles longer holds its peers in their next collective meanwhile. The collective timeout bounds that
wait (``sf.init(timeout=...)`` for large models). The memory plan predicts the op-by-op program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def check_inductor(zero: int) -> None:
    """Raise unless the programs can be compiled by Inductor."""
    if zero == 3:
        raise ValueError(
            "inductor=True with zero=3: the prefetched parameter gathers make torch.compile recompile at every "
            "handle; use zero=1 or 2, or inductor=False"
        )


def _no_release(unit: int | None, payload: Any) -> None:
    """Nothing to hand on: the update runs after backward."""


def compile_program(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run(args, ready=None)`` compiled. With ``ready``, it is called as the program releases units, outside
    the trace; without it, the program releases nothing and compiles to fewer, larger graphs."""
    current: list[Callable[..., None]] = [_no_release]

    @torch.compiler.disable
    def release(unit: int | None, payload: Any) -> None:
        current[0](unit, payload)

    # collectives in program order on every rank
    options: dict[str, str | int | bool | Callable[..., Any]] = {"reorder_for_compute_comm_overlap": False}
    quiet = torch.compile(functools.partial(run, ready=_no_release), dynamic=False, options=options)
    loud = torch.compile(functools.partial(run, ready=release), dynamic=False, options=options)

    def call(args: list[Any], ready: Callable[..., None] | None = None) -> Any:
        if ready is None:
            return quiet(args)
        current[0] = ready
        try:
            return loud(args)
        finally:
            current[0] = _no_release

    return call
