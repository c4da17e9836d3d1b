"""``SparseParallelModule``: a ``ParallelModule`` whose embedding tables live outside its program.

A step runs in three parts: before the dense program, the sparse work (ids split to this rank's samples,
deduplicated, exchanged, rows looked up and pooled: ``embedding/exchange.py``) hands it the pooled vectors
as inputs; the dense program (one static program, lowered as any model's) returns its loss, its
parameters' gradients and the pooled vectors' gradients; after it, those gradients go back to the rows'
holders, which update just the rows touched. The sparse part has data-dependent sizes, which is why it
stays outside the traced program.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardflow.comm.groups import group_for
from shardflow.comm.init import collective_timeout, world
from shardflow.embedding.dense import add_method
from shardflow.embedding.exchange import Exchange, Routed
from shardflow.embedding.lookups import Lookups, TableModule, stub_tree, trace_lookups
from shardflow.embedding.planner import cost, table_bytes
from shardflow.embedding.spec import Embeddings, optimizer_state
from shardflow.embedding.table import Shard
from shardflow.embedding.validate import check_arguments
from shardflow.graph.joint import Joint, trace_step
from shardflow.graph.parallel_module import ParallelModule
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, S
from shardflow.plan import ParallelPlan
from shardflow.runtime.memory import MemoryReport, fmt_bytes
from shardflow.runtime.runner import OptimizerFactory
from shardflow.tensor.global_tensor import GlobalTensor, wrap


class _Gone(nn.Module):
    """Where a table was in the module kept for tracing (the tracer replaces it again)."""

    def __init__(self, name: str) -> None:
        super().__init__()


@dataclass
class Prefetched:
    """A batch whose ids are being exchanged on the prefetching thread."""

    inputs: tuple[Any, ...]
    future: Future[Routed]


def _same_batch(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y:
            continue
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


class SparseParallelModule(ParallelModule):
    """A model with sparse embedding tables (``sf.Embeddings``) over a mesh: ``step``, ``evaluate``,
    ``explain``, ``full_state_dict``, ``save`` and ``load`` as a ``ParallelModule``'s, tables included."""

    def __init__(
        self,
        model: nn.Module,
        dense: nn.Module,
        mesh: Mesh,
        plan: ParallelPlan,
        optimizer: OptimizerFactory,
        spec: Embeddings,
        tables: Sequence[TableModule],
        lookups: Lookups,
    ) -> None:
        super().__init__(dense, mesh, plan, optimizer)
        # traced again for other methods' lookups (evaluate); its tables are stubs, so the user's full tables
        # are not kept alive by this module
        self.source = stub_tree(model, [t.name for t in tables], _Gone)
        self.expected_unique: dict[str, float] = {}  # distinct ids a rank looks up per table (example batch)
        self.spec = spec
        self.tables = list(tables)
        self.lookups: dict[str, Lookups] = {"forward": lookups}
        rank = world()[0]
        n = mesh.size
        me = mesh.coord_of(rank)[0] if rank in mesh else 0
        self.shards = []
        for t in self.tables:
            shard = Shard(t, plan.tables[t.name], n, me)
            shard.fill(model.get_submodule(t.name), spec.seed, spec.optimizer)
            self.shards.append(shard)
        group = group_for(mesh.ranks).group if n > 1 else None
        self.exchange = Exchange(self.shards, group, n, me, spec.optimizer)
        self._table_meshes = {t.name: self._table_mesh(s) for t, s in zip(self.tables, self.shards)}
        # the next batch's ids, exchanged on a thread of their own while a step's dense program runs
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardflow-sparse-ids")
        self._prefetched: Prefetched | None = None
        self._ids_group: Any = None

    # -- steps --------------------------------------------------------------------------------------------
    def _trace(self, inputs: Sequence[Any]) -> Joint:
        """The dense step, also returning the pooled inputs' gradients (the last inputs, one per lookup)."""
        n_pooled = len(self.lookups["forward"].calls)
        first = len(inputs) - n_pooled
        return trace_step(self.module, inputs, self.mesh.device_type, input_grads=range(first, len(inputs)))

    def step(self, *inputs: Any, trace: str | None = None, next_inputs: Sequence[Any] | None = None) -> float:
        """One step on the global batch ``inputs``. ``next_inputs``: the batch of the following step, whose
        ids are checked, routed and exchanged in the background while this step's dense program runs
        (TorchRec's sparse-data-dist pipeline); the following step must then be ``step(*next_inputs)``."""
        if not self.static:
            raise ValueError("sparse tables run around the static program: leave pm.static = True")
        lookups = self._method_lookups("forward", inputs)
        routed = self._take_prefetched(inputs) or self._route_ids(lookups, self._plain(inputs))
        pooled = self.exchange.lookup(routed)
        if next_inputs is not None:
            self.prefetch(*next_inputs)
        dense = [x for i, x in enumerate(inputs) if i not in lookups.sparse]
        loss = super().step(*dense, *self._global(pooled, routed.batch), trace=trace)
        self.exchange.backward(routed, pooled, self.input_grads[-len(pooled) :])
        return loss

    def prefetch(self, *inputs: Any) -> None:
        """Start checking, routing and exchanging the ids of the batch the next step takes (which must be
        ``inputs``), on a thread and a process group of their own; rows are looked up only in that step,
        after this one's update. Collective: every rank of the mesh calls it at the same point."""
        self.wait_prefetch()
        if self._prefetched is not None:
            self._prefetched = None  # one in flight at a time: an earlier one no step took is dropped
        lookups = self._method_lookups("forward", inputs)
        if self._ids_group is None and self.mesh.size > 1:
            self._ids_group = torch.distributed.new_group(
                list(self.mesh.ranks), timeout=collective_timeout(), use_local_synchronization=True
            )
        plain = self._plain(inputs)  # gathered here: the thread must not use the mesh's process group
        self._prefetched = Prefetched(
            tuple(inputs), self._prefetcher.submit(self._route_ids, lookups, plain, self._ids_group)
        )

    def wait_prefetch(self) -> None:
        """Wait until the prefetched batch's ids have arrived (its error, if any, raised here)."""
        if self._prefetched is not None:
            self._prefetched.future.result()

    def _route_ids(self, lookups: Lookups, plain: Sequence[Any], group: Any = None) -> Routed:
        """Check, route and exchange a batch's ids (on ``group``: the prefetching thread's own)."""
        args = lookups.arguments(plain)
        batch = check_arguments(lookups, args, {t.name: t for t in self.tables})
        routed = self.exchange.route(lookups.calls, args, batch)
        self.exchange.exchange_ids(routed, group)
        return routed

    def _take_prefetched(self, inputs: Sequence[Any]) -> Routed | None:
        """The prefetched batch, which must be ``inputs`` (the same or equal tensors, on every rank alike)."""
        if self._prefetched is None:
            return None
        given, future = self._prefetched.inputs, self._prefetched.future
        routed = future.result()  # its error, if any, is this step's (every rank checked the same batch)
        self._prefetched = None
        if not _same_batch(given, inputs):
            raise ValueError(
                "step() got another batch than the next_inputs of the step before: give each step the batch "
                "the previous one was told is next (or no next_inputs)"
            )
        return routed

    @staticmethod
    def _plain(inputs: Sequence[Any]) -> list[Any]:
        return [x.full() if isinstance(x, GlobalTensor) else x for x in inputs]

    def evaluate(self, *inputs: Any, method: str = "forward") -> Any:
        lookups = self._method_lookups(method, inputs)
        self.wait_prefetch()  # its messages are on their own group; the step after takes it as usual
        with torch.no_grad():
            routed = self._route_ids(lookups, self._plain(inputs))
            pooled = self.exchange.lookup(routed)
            dense = [x for i, x in enumerate(inputs) if i not in lookups.sparse]
            return super().evaluate(*dense, *self._global(pooled, routed.batch), method=method)

    def _method_lookups(self, method: str, inputs: Sequence[Any]) -> Lookups:
        if method not in self.lookups:
            if not callable(getattr(self.source, method, None)):
                raise ValueError(f"evaluate(method={method!r}): {type(self.source).__name__} has no such method")
            plain = self._plain(inputs)
            self.lookups[method] = trace_lookups(self.source, method, self.tables, plain)
            add_method(self.module, method, self.lookups[method])
        lookups = self.lookups[method]
        if len(inputs) != lookups.n_inputs:
            raise ValueError(f"{method} got {len(inputs)} inputs; it was traced with {lookups.n_inputs}")
        return lookups

    def _global(self, pooled: Sequence[torch.Tensor], batch: int) -> list[GlobalTensor]:
        """This rank's pooled vectors as the dense program's inputs: split by samples over the mesh."""
        return [wrap(p.detach(), self.mesh, (S(0),), (batch, *p.shape[1:])) for p in pooled]

    def _memory(self, inputs: Sequence[Any]) -> MemoryReport:
        """The dense program's report with this rank's table shards and their optimizer state added (the
        sparse step's own temporaries, a batch's unique rows and their gradients, are not counted)."""
        dense: Sequence[Any] = ()
        if inputs:
            lookups = self._method_lookups("forward", inputs)
            plain = self._plain(inputs)
            batch = check_arguments(lookups, lookups.arguments(plain), {t.name: t for t in self.tables})
            pooled = [torch.zeros((batch, *c.shape[1:])) for c in lookups.calls]
            dense = [x for i, x in enumerate(plain) if i not in lookups.sparse] + pooled
        report = super()._memory(dense)
        report.persistent["sparse tables"] = sum(s.weight.nbytes for s in self.shards)
        report.persistent["sparse optimizer state"] = sum(v.nbytes for s in self.shards for v in s.state.values())
        return report

    # -- state --------------------------------------------------------------------------------------------
    def _table_mesh(self, shard: Shard) -> Mesh:
        if shard.plan.placement != "table":
            return self.mesh
        owner = self.mesh.ranks[shard.plan.owner or 0]
        return Mesh(self.mesh.device_type, (1,), names=self.mesh.names[:1], ranks=[owner])

    def _table_tensors(self, shard: Shard) -> dict[str, GlobalTensor]:
        """The table's weight and optimizer state as GlobalTensors in its layout (sharing storage)."""
        m = shard.module
        mesh = self._table_meshes[m.name]
        sbp: NdSbp = {"row": (S(0),), "column": (S(1),)}.get(shard.plan.placement, (B,))
        out = {f"model.{m.name}.weight": wrap(shard.weight, mesh, sbp, (m.rows, m.dim))}
        for key, value in shard.state.items():
            shape: tuple[int, ...] = (m.rows,) if value.dim() == 1 else (m.rows, m.dim)
            layout = (B,) if value.dim() == 1 and shard.plan.placement == "column" else sbp
            out[f"optim.{m.name}.weight.{key}"] = wrap(value, mesh, layout, shape)
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense parameters and every table's ``<name>.weight``, as the plain model's state dict (collective)."""
        out = super().full_state_dict()
        for shard in self.shards:
            name = f"{shard.module.name}.weight"
            t = self._table_tensors(shard)[f"model.{name}"]
            if shard.plan.placement == "table":
                value = t._local.clone() if world()[0] in t.mesh else torch.empty(shard.module.rows, shard.module.dim)
                owner = t.mesh.ranks[0]
                if self.mesh.size > 1:
                    torch.distributed.broadcast(value, owner, group=group_for(self.mesh.ranks).group)
                out[name] = value
            else:
                out[name] = t.full().detach()
        return out

    def _model_targets(self) -> dict[str, GlobalTensor]:
        targets = super()._model_targets()
        for shard in self.shards:
            targets |= self._table_tensors(shard)
        return targets

    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        tensors, meta = super()._named_state()
        for shard in self.shards:
            tensors |= self._table_tensors(shard)
        meta["table_steps"] = {s.module.name: s.steps for s in self.shards}
        return tensors, meta

    def _optim_target(self, name: str, directory: str) -> Any:
        if any(name == f"{s.module.name}.weight" for s in self.shards):
            return None  # a table's state: filled in place through _model_targets
        return super()._optim_target(name, directory)

    def load(self, directory: str) -> None:
        from shardflow.checkpoint.index import read_index

        super().load(directory)
        steps = read_index(directory)["meta"].get("table_steps", {})
        for shard in self.shards:
            shard.steps = int(steps.get(shard.module.name, 0))

    # -- explanation --------------------------------------------------------------------------------------
    def explain(self) -> str:
        lines = [super().explain(), self.explain_tables()]
        return "\n".join(lines)

    def explain_tables(self) -> str:
        """Each table's placement, bytes per rank (rows and optimizer state), and expected all-to-all bytes."""
        n = self.mesh.size
        opt = self.spec.optimizer
        state = ", ".join(optimizer_state(opt)) or "no state"
        lines = [f"sparse tables over {n} rank(s), optimizer {type(opt).__name__} ({state}):"]
        width = max(len(t.name) for t in self.tables)
        for t, shard in zip(self.tables, self.shards):
            unique = self.expected_unique.get(t.name, 0.0)
            c = cost(t, shard.plan, n, unique, opt)
            held = "/".join(fmt_bytes(h) for h in c.held) if len(set(c.held)) > 1 else fmt_bytes(c.held[0])
            lines.append(
                f"  {t.name:<{width}}  {shard.plan}  held per rank {held} (of {fmt_bytes(table_bytes(t, opt))}), "
                f"~{unique:.0f} unique ids a rank, all-to-all ~{fmt_bytes(int(sum(c.sent) / n))} sent a rank a step"
            )
        last = f" (last step: {fmt_bytes(self.exchange.sent_bytes)})" if self.steps else ""
        lines.append(
            f"  expected all-to-all bytes sent per rank per step: {fmt_bytes(int(self.expected_bytes()))}{last}"
        )
        return "\n".join(lines)

    def expected_bytes(self) -> float:
        """All-to-all bytes a rank sends other ranks per step by the plan's estimate (mean over ranks): ids,
        split sizes, rows and gradients, at the example batch's unique ids per rank."""
        n = self.mesh.size
        opt = self.spec.optimizer
        total = sum(
            sum(cost(t, s.plan, n, self.expected_unique.get(t.name, 0.0), opt).sent) / n
            for t, s in zip(self.tables, self.shards)
        )
        return total + (n - 1) * len(self.tables) * 8
