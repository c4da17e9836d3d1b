"""One device: a lowered program's kernels fused by Inductor (``torch.compile``) instead of run op by op.

A program (graph/lower.py) is straight-line Python over ATen ops, forward and backward in one function, so
``torch.compile`` traces it as it is: Inductor fuses the pointwise and reduction chains around the matrix
products (layer norms, GELU, the loss's softmax) and plans its own buffers, which is where ``torch.compile``
of a model gains over eager on a GPU. Boxing on a one-device mesh moves no data and its plans are bound at
lowering (``bound_plan``), so the trace holds only tensor work: a GPT's program is one graph on CPU (on an
H100 dynamo split a small fp32 GPT's once, around attention; runtime/cuda_graph.py copes with that).

Only on one device: on several ranks the program launches collectives and hands gradient units to the
update actors through ``ready``, which a trace would break around or replay wrongly. The program's first
run stays op by op (it checks local shapes); the second compiles. The memory plan predicts the op-by-op
program: Inductor's buffers usually take less.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch


def _no_release(unit: int | None, payload: Any) -> None:
    """One device releases nothing early: every update runs after backward."""


def compile_program(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run(args, ready)`` compiled; ``ready`` is never called (one device: updates run after backward)."""
    compiled = torch.compile(functools.partial(run, ready=_no_release), dynamic=False)

    def call(args: list[Any], ready: Callable[..., None] | None = None) -> Any:
        return compiled(args)

    return call
