"""``Runner``: what every compiled model offers (``step``, ``explain``, ``memory``, ``save``/``load``,
``full_state_dict``, ``plan``) and the parts of it that do not depend on how a step runs.

A compiled single-program step (``graph/parallel_module.py``) and a pipeline of stages
(``runtime/pipeline.py``) derive from it, so that the snapshot format, the trace gathering, the memory
report's collective and the optimizer factory exist once. It sits in the runtime so that both can reach it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shardflow.checkpoint.index import read_index
from shardflow.checkpoint.rng import restore_rng, rng_states
from shardflow.checkpoint.snapshots import Snapshots
from shardflow.checkpoint.store import load as load_checkpoint
from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.ops.flop_count import Flops
from shardflow.placement.mesh import Mesh
from shardflow.plan import ParallelPlan
from shardflow.runtime import trace as tracing
from shardflow.runtime.memory import MemoryReport, ProgramMemory, with_every_peak
from shardflow.runtime.trace import Event
from shardflow.tensor.global_tensor import GlobalTensor

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    # foreach=None: torch's choice, the fused multi-tensor kernels on GPUs, a loop on CPUs
    return torch.optim.AdamW(params, lr=1e-3, foreach=None)


class Runner(Snapshots, abc.ABC):
    """A model compiled over a mesh: ``step(*inputs)`` trains one step on the global batch, ``evaluate(*inputs)``
    runs its forward on it without training.

    Subclasses give the step, their explanation, their memory on a rank that holds part of the model
    (``_memory``) and where each snapshot tensor lives on this rank (``_named_state`` for writing; for
    reading ``_model_targets``, ``_optim_target``, ``_optim_index`` and ``_load_optimizer``).
    """

    mesh: Mesh
    _plan: ParallelPlan
    steps: int
    events: list[Event]  # every rank's events of the last traced step
    absent = "no part of the model on this rank"  # the memory report's note on ranks outside the mesh

    @property
    def plan(self) -> ParallelPlan:
        """The plan this module runs (change its options with ``pm.<option> = ...`` or ``replan``)."""
        return self._plan

    @property
    def inside(self) -> bool:
        """Whether this rank holds part of the model (ranks outside the mesh only join collectives)."""
        return world()[0] in self.mesh

    @abc.abstractmethod
    def step(self, *inputs: Any, trace: str | None = None) -> float:
        raise NotImplementedError

    @abc.abstractmethod
    def evaluate(self, *inputs: Any, method: str = "forward") -> Any:
        """Run ``method`` of the model forward only on the global batch ``inputs`` under the plan: no
        gradient, no update, modules in eval mode (dropout off). Returns its result as plain tensors holding
        the full value on every rank of the mesh (None on ranks outside it). Parameters, optimizer state,
        gradients and RNG state are left as they were (a step after it equals a step without it), and the
        modules in training mode. Collective over the mesh."""
        raise NotImplementedError

    @abc.abstractmethod
    def explain(self) -> str:
        raise NotImplementedError

    @abc.abstractmethod
    def flops(self, *inputs: Any) -> Flops:
        """FLOPs of one step on the global batch ``inputs`` (default: the example inputs), counted from the
        plan's ops (``ops/flops/``): the logical step, each op once whatever the plan, and in ``rank``
        what this rank computes (replicated work included; zero on a rank outside the mesh). Lowers, runs
        nothing, and needs no other rank."""
        raise NotImplementedError

    @abc.abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- memory ------------------------------------------------------------------------------------------
    def memory(self, *inputs: Any) -> MemoryReport:
        """Predicted memory of a step on this rank, with every rank's peak (collective over the job).

        ``inputs`` default to the example inputs the model was compiled with; nothing runs but lowering.
        """
        if self.inside:
            report = self._memory(inputs)
        else:
            report = MemoryReport(world()[0], {}, ProgramMemory(0, [], 0, ""), 0, self.absent)
        return with_every_peak(report)

    @abc.abstractmethod
    def _memory(self, inputs: Sequence[Any]) -> MemoryReport:
        raise NotImplementedError

    # -- traces ------------------------------------------------------------------------------------------
    def gather_trace(self, mine: list[Event], path: str) -> None:
        """Collect every rank's events of this step (collective over the mesh); the mesh's first rank
        writes the timeline to ``path``."""
        everyone: list[Any] = [None] * self.mesh.size
        torch.distributed.all_gather_object(everyone, mine, group=group_for(self.mesh.ranks).group)
        self.events = [e for rank_events in everyone for e in rank_events]
        if world()[0] == self.mesh.ranks[0]:
            tracing.write(self.events, path)

    # -- snapshots ---------------------------------------------------------------------------------------
    # NOTE: one format for every runner: parameters and buffers as ``model.<name>``, optimizer tensors as
    # ``optim.<name>.<key>``, optimizer scalars by the index of the parameter in ``model.named_parameters()``,
    # so that a snapshot of one plan loads into any other plan of the same model.
    def _snapshot_meta(
        self, groups: list[dict[str, Any]], scalars: dict[str, float], aliases: dict[str, str]
    ) -> dict[str, Any]:
        """The JSON-able part of a snapshot: step count, optimizer settings and scalars, tied names, RNG."""
        meta = {"step": self.steps, "param_groups": groups, "optim_scalars": scalars, "aliases": aliases}
        meta["rng"] = rng_states()
        return meta

    def load(self, directory: str) -> None:
        """Load a snapshot of this model saved by any plan (pipelined or not, any mesh) (collective)."""
        self.wait_save()
        targets = self._model_targets()
        # optimizer state: laid out like its parameter, read into fresh locals, then given to the optimizer
        state: dict[int, dict[str, Any]] = {}
        for full in read_index(directory)["tensors"]:
            if not full.startswith("optim."):
                continue
            pname, key = full[len("optim.") :].rsplit(".", 1)
            target = self._optim_target(pname, directory)
            if target is not None:
                i, piece, laid = target
                targets[full] = laid
                state.setdefault(i, {})[key] = piece
        meta = load_checkpoint(directory, self._targets_here(targets))  # one pass: each shard file opened once
        for ik, value in meta["optim_scalars"].items():
            saved, key = ik.split(".", 1)
            index = self._optim_index(int(saved))
            if index is not None:
                state.setdefault(index, {})[key] = torch.tensor(value)
        self._load_optimizer(state, meta["param_groups"], directory)
        self.steps = int(meta["step"])
        restore_rng(meta.get("rng"))

    @abc.abstractmethod
    def _model_targets(self) -> dict[str, GlobalTensor]:
        """This rank's parameters and buffers, by snapshot name, to be filled in place."""
        raise NotImplementedError

    @abc.abstractmethod
    def _optim_target(self, name: str, directory: str) -> tuple[int, torch.Tensor, GlobalTensor] | None:
        """For the optimizer state of parameter ``name``: its index in this rank's optimizer, a fresh local
        piece and that piece as the GlobalTensor the snapshot fills; None if this rank does not hold it."""
        raise NotImplementedError

    def _optim_index(self, saved: int) -> int | None:
        """The index in this rank's optimizer of the parameter saved at index ``saved`` (None: not here)."""
        return saved

    def _targets_here(self, targets: Mapping[str, GlobalTensor]) -> Mapping[str, GlobalTensor]:
        """The targets this rank reads (all of them: ranks outside a target's mesh only check its shape)."""
        return targets

    @abc.abstractmethod
    def _load_optimizer(self, state: dict[int, dict[str, Any]], groups: list[dict[str, Any]], directory: str) -> None:
        raise NotImplementedError
