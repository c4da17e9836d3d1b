"""``Program``: one rank's lowered step (or pipeline stage), ready to run, with what the passes found.

The runner (graph/parallel_module.py, runtime/pipeline.py) only ever sees this record: the generated
functions, the update units and where they are released, the communication and memory it was priced at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shardflow.graph.arena import Arena
from shardflow.graph.ir.explain import explain
from shardflow.graph.ir.instr import Comm
from shardflow.graph.ir.step import StepIR, Unit
from shardflow.ops.flop_count import Flops
from shardflow.runtime.memory import ProgramMemory
from shardflow.tensor.trace import Record


@dataclass
class Program:
    """This rank's step: ``run(args) -> (loss local in B, [synchronised gradient locals])``. A stage's:
    ``run(args) -> ([output locals in B], saved)`` then ``backward(saved, grads_in) -> ([synchronised
    gradient locals], [input gradient locals in B])``."""

    source: str
    run: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]  # run(args, ready=None)
    checked: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]  # same, asserting local shapes
    record: Record
    grad_of: tuple[int, ...]
    collectives: list[Comm] = field(default_factory=list)  # every communication, in program order
    cost: float = 0.0  # seconds of this rank's communication per step, by the cost model
    memory: ProgramMemory | None = None
    ran: bool = False  # the first run is the checked one
    # update units in the order the program releases them through ``run(args, ready)``: ``ready(u, handle)``
    # for a gradient bucket (``wait_bucket`` gives its gradients), ``ready(u, (grads...))`` otherwise, and
    # ``ready(None, None)`` once backward is over (the rest is waiting for communication)
    units: list[Unit] = field(default_factory=list)
    release_lines: list[int] = field(default_factory=list)  # per unit: the instruction it is released after
    backward: Callable[..., Any] | None = None  # a stage's backward (``checked_backward``: asserting shapes)
    checked_backward: Callable[..., Any] | None = None
    saved_bytes: int = 0  # a stage: bytes its forward keeps for its backward (parameters not counted)
    arena: Arena | None = None  # static placement's blocks (graph/arena.py), allocated at the first run
    ir: StepIR | None = None  # the instructions it was generated from
    flops: Flops | None = None  # the traced step's FLOPs, with this rank's share (graph/flops.py)

    def explain(self) -> str:
        """This rank's program, one instruction a line (``ir/explain.py``)."""
        assert self.ir is not None, "a program made without its IR"
        return explain(self.ir)
