"""A pipeline's snapshots and full state: each tensor read from, or written to, the stage that owns it.

The format is every runner's (``runtime/runner.py``); each tensor lies on the ``(dp, tp)`` mesh of the
stage that owns it (``B`` over dp, its own layout over tp), so a pipeline's snapshot loads into any plan of
the same model and the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shardflow.checkpoint.index import CheckpointError
from shardflow.comm.groups import group_for
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Placement
from shardflow.runtime.runner import Runner
from shardflow.runtime.tensor_stage import local
from shardflow.tensor.global_tensor import GlobalTensor, wrap


class PipelineState(Runner):
    """``save``/``load``/``full_state_dict`` for a pipeline stage (a base of ``PipelineModule``)."""

    module: nn.Module  # this rank's stage
    named: dict[str, nn.Parameter]  # its parameters by (canonical) name
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer | None
    stage: int
    stage_ranks: list[tuple[int, ...]]
    flat: list[Mesh]  # each stage's (dp, tp) mesh
    layouts: list[dict[str, Placement]]  # each stage's parameter layouts over tp
    holders: list[set[str]]  # names of the parameters and buffers each stage holds
    param_order: list[str]  # the model's parameter names: the index of optimizer state in snapshots
    canonical: dict[str, str]  # tied parameters: every name -> the one stages use
    state_meta: dict[str, tuple[torch.Size, torch.dtype]]  # shape and dtype of every state_dict entry

    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        locals_: dict[str, torch.Tensor] = {
            **{n: local(p).detach() for n, p in self.named.items()},
            **{n: b for n, b in self.module.named_buffers()},
        }
        names = list(self.named)
        sd = self.optimizer.state_dict() if self.optimizer is not None else {"state": {}, "param_groups": []}
        mine: dict[str, dict[str, Any]] = {}  # optimizer state of the parameters this stage owns
        for i, entries in sd["state"].items():
            name = names[i]
            if self._owner_stage(name) == self.stage:
                p = self.named[name]  # state shaped like a parameter's shard is that parameter's layout
                mine[name] = {
                    k: (list(p.shape if v.shape == local(p).shape else v.shape), str(v.dtype))
                    if isinstance(v, torch.Tensor) and v.dim() > 0
                    else float(v)
                    for k, v in entries.items()
                }
        every: list[Any] = [None] * self.mesh.size
        dist.all_gather_object(every, (mine, sd["param_groups"]), group=group_for(self.mesh.ranks).group)
        tensors: dict[str, GlobalTensor] = {}
        keys = [(n, "model." + n) for n in [*self.param_order, *self._buffer_names()]]
        for name, key in keys:
            shape, dtype = self.state_meta[name]
            tensors[key] = self._global(name, locals_.get(name), shape, dtype)
        scalars: dict[str, float] = {}
        by_name = {n: i for i, n in enumerate(self.param_order)}
        state = {names[i]: entries for i, entries in sd["state"].items()}
        for rank_state, _ in every:
            for name, entries in rank_state.items():
                for k, v in entries.items():
                    if isinstance(v, float):
                        scalars[f"{by_name[name]}.{k}"] = v
                    else:
                        held = state[name][k].detach() if name in state else None
                        dtype = getattr(torch, v[1].replace("torch.", ""))
                        tensors[f"optim.{name}.{k}"] = self._global(name, held, torch.Size(v[0]), dtype)
        groups: list[dict[str, Any]] = next((g for _, g in every if g), [])
        if len(groups) > 1:
            raise ValueError("pipeline snapshots support optimizers with one parameter group")
        groups = [{**g, "params": list(range(len(self.param_order)))} for g in groups]
        aliases = {n: c for n, c in self.canonical.items() if n != c}
        return tensors, self._snapshot_meta(groups, scalars, aliases)

    def _buffer_names(self) -> list[str]:
        params = set(self.canonical)
        return [n for n in self.state_meta if n not in params]

    def _global(self, name: str, piece: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> GlobalTensor:
        """``name``'s tensor as a GlobalTensor on its owner stage's ``(dp, tp)`` mesh (empty elsewhere):
        ``B`` over dp, and over tp as the parameter is laid out there."""
        owner = self._owner_stage(name)
        if piece is None or owner != self.stage:
            piece = torch.empty(0, dtype=dtype)
        return wrap(piece, self.flat[owner], (B, self.layouts[owner].get(name, B)), shape)

    def _model_targets(self) -> dict[str, GlobalTensor]:
        stage_mesh, layouts = self.flat[self.stage], self.layouts[self.stage]
        targets: dict[str, GlobalTensor] = {}
        for name, p in self.named.items():
            targets["model." + name] = wrap(local(p).data, stage_mesh, (B, layouts.get(name, B)), p.shape)
        for name, b in self.module.named_buffers():
            targets["model." + name] = wrap(b, stage_mesh, (B, B), b.shape)
        return targets

    def _optim_target(self, name: str, directory: str) -> tuple[int, torch.Tensor, GlobalTensor] | None:
        if name not in self.named:
            return None
        p = self.named[name]
        piece = torch.empty_like(local(p).data)
        laid = wrap(piece, self.flat[self.stage], (B, self.layouts[self.stage].get(name, B)), p.shape)
        return list(self.named).index(name), piece, laid

    def _optim_index(self, saved: int) -> int | None:
        name = self.param_order[saved]
        return list(self.named).index(name) if name in self.named else None

    def _targets_here(self, targets: Mapping[str, GlobalTensor]) -> Mapping[str, GlobalTensor]:
        return targets if self.inside else {}

    def _load_optimizer(self, state: dict[int, dict[str, Any]], groups: list[dict[str, Any]], directory: str) -> None:
        if self.optimizer is not None:
            if len(groups) != 1:
                raise CheckpointError(f"checkpoint {directory} has {len(groups)} parameter groups; pipelines take one")
            group = {**groups[0], "params": list(range(len(self.params)))}
            self.optimizer.load_state_dict({"state": state, "param_groups": [group]})

    def _owner_stage(self, key: str) -> int:
        for s, names in enumerate(self.holders):
            if key in names:
                return s
        raise KeyError(f"{key!r} is in no stage")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors named as in ``model.state_dict()``, equal on every rank of the mesh (collective)."""
        if not self.inside:
            return {}
        mine = {**self.named, **dict(self.module.named_buffers())}
        group = group_for(self.mesh.ranks).group if self.mesh.size > 1 else None
        out: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in self.state_meta.items():
            key = self.canonical.get(name, name)
            owner = self._owner_stage(key)
            if owner != self.stage:
                value = torch.empty(shape, dtype=dtype)
            elif isinstance(held := mine[key], GlobalTensor):  # a tensor-parallel stage's shard: gathered
                with torch.no_grad():
                    value = held.full().clone()
            else:
                value = mine[key].detach().clone()
            if self.mesh.size > 1:
                dist.broadcast(value, src=self.stage_ranks[owner][0], group=group)
            out[name] = value
        return out
