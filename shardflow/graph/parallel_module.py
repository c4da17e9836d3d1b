"""``ParallelModule``: a model laid over a mesh by a ``ParallelPlan``, trained step by step.

Each step runs this rank's static program (``graph/lower.py``): forward and backward traced once per input
signature, every op's signature chosen from the shared rule registry, boxing inserted, gradient buckets
launched from the generated code as soon as their last gradient exists. Clipping and the optimizer run on
the local shards (plain torch optimizers: a parameter, its gradient and its optimizer state share one
layout). The step is an actor graph: the program (compute) hands each bucket on once its gradients exist
and nothing later reads its parameters, an all-reduce actor takes it once its collective is done and an
optimizer actor updates just those parameters while backward goes on (runtime/updates.py: an event loop on
the compute thread on CPU, threads on GPU); with ``max_grad_norm`` the updates wait for the global norm (as
clip_grad_norm_). ``static = False`` runs the same layouts op by op on GlobalTensors (eager), with gradients
synchronised from post-accumulate hooks.

ZeRO is read from the plan's layouts, never decided here (graph/transforms/zero.py decides). A parameter
stored split but computed whole (ZeRO-3) is gathered by the lowering before each op that computes with it
(launched while the op before computes: a prefetch one op ahead) and the copy dies after (backward gathers
again); its gradient reaches the split layout by reduce-scatter. A parameter whose ``optim`` layout is a
piece of it (ZeRO-1/2) is stepped as a view of this rank's piece, with its state in that layout; when its
``grad`` layout is that piece too (ZeRO-2) the lowering returns gradients there (reduce-scatters packed
into buckets launched during backward); after the step the pieces are all-gathered by boxing. Recomputed
modules are checkpointed (non-reentrant), so the joint trace holds their forward twice: the program frees
activations after forward and recomputes them in backward. Options of the plan can change after compiling
(``pm.updates = "inline"``): the module re-plans and lowers new programs (plan/knobs.py).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from shardflow.checkpoint.index import CheckpointError, read_index
from shardflow.checkpoint.rng import restore_rng, rng_states
from shardflow.checkpoint.snapshots import Snapshots
from shardflow.checkpoint.store import load as load_checkpoint
from shardflow.comm.buckets import bucket_done, wait_bucket
from shardflow.comm.groups import group_for
from shardflow.comm.init import world
from shardflow.graph.lower import Program, lower, trace_step
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import (
    B,
    NdSbp,
    P,
    format_sbp,
    grad_sbp,
)
from shardflow.placement.shard import relative_shard, take_local
from shardflow.plan import MeshSpec, ParallelPlan, PlanError, check_model
from shardflow.plan.knobs import Fixed, Knob, logged
from shardflow.runtime import trace as tracing
from shardflow.runtime.cuda_graph import GraphedStep, fingerprint, make_capturable
from shardflow.runtime.inductor import compile_program
from shardflow.runtime.memory import (
    MemoryReport,
    ProgramMemory,
    optimizer_bytes,
    unique_bytes,
    update_temporaries,
    with_every_peak,
)
from shardflow.runtime.staging import Staging
from shardflow.runtime.trace import Event
from shardflow.runtime.updates import UpdateActors
from shardflow.tensor.api import distribute
from shardflow.tensor.dispatch import implicit_broadcast
from shardflow.tensor.global_tensor import GlobalTensor, box, wrap
from shardflow.tensor.grad_sync import GradSync, bucketed
from shardflow.tensor.trace import Record, recording

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    # foreach=None: torch's choice, the fused multi-tensor kernels on GPUs, a loop on CPUs
    return torch.optim.AdamW(params, lr=1e-3, foreach=None)


class ParallelModule(Snapshots):
    """A model laid over a mesh by a ``ParallelPlan``: ``step(*inputs)`` trains one step,
    ``full_state_dict()`` reads it back, ``plan`` is the plan (its options can be changed: ``Knob``)."""

    # the plan's options, changeable after compiling: setting one re-plans (plan/knobs.py). ``static``:
    # lowered programs, or op by op on GlobalTensors (eager: any input shape without lowering; the reference
    # the lowering is tested against). ``updates``: where each gradient unit's optimizer update runs
    # (runtime/updates.py): "actors" (threads: GPUs, where the compute thread only launches kernels), "loop"
    # (on the compute thread at release points once the unit's collective completed: CPUs, one core a rank),
    # "inline" (at the release point, waiting: deterministic), "after" (once backward and every all-reduce
    # are over, as plain DDP; the one-device default: nothing to hide, BENCHMARKS.md, One GPU).
    static = Knob()
    updates = Knob()
    arena = Knob()
    inductor = Knob()
    cuda_graphs = Knob()
    bucket_bytes = Knob()
    max_grad_norm = Knob()
    recompute = Knob()
    # baked into the parameters and optimizer when the module was built
    zero = Fixed("the ZeRO stage its parameter layouts amount to")
    zero_axis = Fixed("the axis ZeRO-3 parameters are split on")
    layouts = Fixed("each parameter's layout")
    input_sbp = Fixed("each input's layout")
    strategy = Fixed("the strategy the plan was built from")

    def __init__(self, model: nn.Module, mesh: Mesh, plan: ParallelPlan, optimizer: OptimizerFactory) -> None:
        if MeshSpec.of(mesh) != plan.mesh:
            raise PlanError(f"the plan is for a {plan.mesh}, not for {mesh}")
        self._plan = plan
        self.mesh = mesh
        self.strategy, self.zero, self.zero_axis = plan.strategy, plan.zero, plan.zero_axis
        self.layouts, self.input_sbp = MappingProxyType(plan.layouts()), tuple(plan.inputs)
        self.module = copy.deepcopy(model)  # the user's model stays as it was
        laid: dict[int, nn.Parameter] = {}  # tied parameters (GPT's wte / lm_head) stay one parameter
        for name, p in list(self.module.named_parameters(remove_duplicate=False)):
            owner, attr = self._owner(name)
            if id(p) not in laid:
                sbp = self.layouts[name]
                laid[id(p)] = nn.Parameter(distribute(p.detach(), mesh, sbp), requires_grad=p.requires_grad)
            setattr(owner, attr, laid[id(p)])
        for name, buf in list(self.module.named_buffers()):
            owner, attr = self._owner(name)
            owner.register_buffer(attr, distribute(buf, mesh, (B,) * mesh.ndim))
        # NOTE: the optimizer steps on the shards. A parameter, its gradient (after synchronisation) and its
        # optimizer state share one layout and updates are element-wise, so plain torch optimizers run on
        # plain local tensors that share storage with the GlobalTensors: no per-op dispatch in the update.
        self.params: list[GlobalTensor] = list(self.module.parameters())  # type: ignore[arg-type]
        entries = [plan.params[n] for n, _ in self.module.named_parameters()]
        # ZeRO-1/2: the optimizer owns one piece of each replicated parameter (a view of this rank's rows,
        # split over the data-parallel axis: the plan's ``optim`` layout); its gradient and state have that
        # piece's layout, and the updated pieces are all-gathered after each step.
        self.opt_sbps: list[NdSbp] = []  # layout of each optimizer parameter, its gradient and its state
        self.slices: list[tuple[slice, ...] | None] = []  # where it lies in the parameter's local tensor
        self.grad_sbps: list[NdSbp | None] = []  # ZeRO-2: the program returns the piece's gradient
        # ZeRO-3: stored split, computed gathered (the lowering gathers them for each use)
        self.gathered = frozenset(i for i, e in enumerate(entries) if e.compute != e.sbp)
        rank = world()[0]
        for gp, entry in zip(self.params, entries):
            if entry.optim == grad_sbp(entry.sbp) or rank not in mesh:  # it steps its whole local
                self.opt_sbps.append(entry.optim if rank in mesh else grad_sbp(gp.sbp))
                self.slices.append(None)
                self.grad_sbps.append(None)
                continue
            self.opt_sbps.append(entry.optim)
            self.slices.append(relative_shard(tuple(gp.shape), gp.sbp, entry.optim, mesh.shape, mesh.coord_of(rank)))
            self.grad_sbps.append(entry.grad if entry.grad != grad_sbp(entry.compute) else None)
        self.local_params = [
            nn.Parameter(p._local[sl] if sl is not None else p._local, requires_grad=p.requires_grad)
            for p, sl in zip(self.params, self.slices)
        ]
        self.optimizer = optimizer(self.local_params)
        self.steps = 0
        self.record: Record | None = None
        self.example_inputs: tuple[Any, ...] = ()
        self.programs: dict[Any, Program] = {}  # this rank's programs per input signature, lowered on first use
        self.staging = Staging()  # pinned host buffers the inputs' shards are copied to the device through
        self._recomputed: tuple[str, ...] = ()  # modules whose forward is patched to recompute in backward
        self.events: list[Event] = []  # every rank's events of the last traced step
        # one device: each program's step (forward, backward, clipping, update) captured as a CUDA graph
        # after warm-up and replayed (runtime/cuda_graph.py)
        self.graphs: dict[Any, GraphedStep] = {}
        self.graph_update = True  # whether the optimizer's update is captured too (else run after replay)
        self._patch_recompute(plan.recompute)

    @property
    def plan(self) -> ParallelPlan:
        """The plan this module runs (change its options with ``pm.<option> = ...`` or ``replan``)."""
        return self._plan

    @property
    def recomputed(self) -> list[str]:
        """Modules whose activations are recomputed in backward (a copy: change them with ``pm.recompute``)."""
        return list(self._recomputed)

    def replan(self, **changes: Any) -> None:
        """Change options of the plan (``plan.replace`` keywords): checked, logged, and the programs built
        from the old plan are dropped, so the next step lowers new ones. Layouts cannot change here."""
        fixed = {"params", "inputs", "mesh", "strategy", "pipeline", "values"} & set(changes)
        if fixed:
            raise AttributeError(
                f"{sorted(fixed)} are fixed once the module is built; compile another plan: "
                "sf.compile(model, plan=pm.plan.replace(...), example_inputs=..., optimizer=...)"
            )
        new = self._plan.replace(**changes)
        e = new.execution
        if e.cuda_graphs:
            check_graphable(self.mesh, self.zero)
        if e.inductor:
            check_inductor(self.zero)
        modules = {n for n, _ in self.module.named_modules()}
        check_model(new, {n: tuple(p.shape) for n, p in self.module.named_parameters()}, len(new.inputs), modules)
        if new == self._plan:
            return
        logged(self._plan, new)
        self._patch_recompute(new.recompute)
        self._plan = new
        self.programs.clear()
        self.graphs.clear()

    def set_recompute(self, names: Sequence[str]) -> None:
        """Recompute the activations of the modules ``names`` in backward instead of keeping them (activation
        checkpointing): their forward runs again, inside the traced backward, so programs are lowered anew."""
        self.replan(recompute=tuple(names))

    def _patch_recompute(self, names: Sequence[str]) -> None:
        """Checkpoint exactly the modules ``names`` (their forward wrapped; the others' restored)."""
        for name in self._recomputed:
            module = self.module.get_submodule(name)
            if "forward" in module.__dict__:
                del module.forward  # back to the class's forward
        for name in names:
            module = self.module.get_submodule(name)
            module.forward = functools.partial(_checkpointed, type(module).forward.__get__(module))  # type: ignore[method-assign]
        self._recomputed = tuple(names)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        """The submodule holding the parameter or buffer ``name``, and its attribute name there."""
        mod_name, _, attr = name.rpartition(".")
        return (self.module.get_submodule(mod_name) if mod_name else self.module), attr

    def _inputs(self, inputs: Sequence[Any]) -> list[Any]:
        if len(inputs) != len(self.input_sbp):
            raise ValueError(f"step() got {len(inputs)} inputs; the model was compiled with {len(self.input_sbp)}")
        out = []
        for i, (x, sbp) in enumerate(zip(inputs, self.input_sbp)):
            if isinstance(x, GlobalTensor):
                out.append(x if x.mesh == self.mesh and x.sbp == sbp else x.redistribute(sbp, mesh=self.mesh))
            elif isinstance(x, torch.Tensor) and P not in sbp:
                # the full batch, the same on every rank (the API's promise): each rank slices its shard on the host, no
                # messages, and copies only that to its device (through a pinned buffer: runtime/staging.py)
                piece = take_local(x.detach(), sbp, self.mesh.shape, self.mesh.coord_of(world()[0]))
                out.append(wrap(self.staging.to_device(i, piece, self.mesh.device), self.mesh, sbp, x.shape))
            elif isinstance(x, torch.Tensor):
                out.append(distribute(x, self.mesh, sbp))
            else:
                out.append(x)
        return out

    def step(self, *inputs: Any, trace: str | None = None) -> float:
        """Forward, backward (gradients synchronised as they appear), clipping, optimizer update; with
        ``trace`` (static programs), rank 0 writes the step's timeline there (compute, all-reduce and
        optimizer actors per rank)."""
        if world()[0] not in self.mesh:
            return float("nan")  # no part of the model lives here and no data passes through
        self.module.train()
        if self.static:
            return self._static_step(self._inputs(inputs), trace)
        if trace is not None:
            raise ValueError("trace= needs the static program (pm.static = True); eager steps have no actors")
        if self.cuda_graphs:
            raise ValueError("cuda_graphs replay the static program; set pm.static = True or pm.cuda_graphs = False")
        with contextlib.ExitStack() as stack:
            if self.record is None:  # the first step is recorded for explain()
                self.record = stack.enter_context(recording())
            return self._step(inputs)

    def program(self, inputs: Sequence[Any]) -> Program:
        """This rank's program for inputs laid out as ``inputs`` (GlobalTensors), lowered on first use."""
        key = _signature(inputs)
        if key not in self.programs:
            joint = trace_step(self.module, inputs, self.mesh.device_type)
            buffers = [b for _, b in self.module.named_buffers()]
            sbps: list[NdSbp | None] = [p.sbp for p in self.params]
            sbps += [b.sbp for b in buffers if isinstance(b, GlobalTensor)]
            sbps += [x.sbp if isinstance(x, GlobalTensor) else None for x in inputs]
            program = lower(
                joint,
                self.mesh,
                world()[0],
                sbps,
                self.bucket_bytes,
                self.zero_axis,
                self.grad_sbps,
                gathered=self.gathered,
                arena=self.arena,
                values=self._plan.values,
            )
            if self.inductor:
                check_inductor(self.zero)
                program.run = compile_program(program.run)
            self.programs[key] = program
        return self.programs[key]

    def memory(self, *inputs: Any) -> MemoryReport:
        """Predicted memory of a step on this rank, with every rank's peak (collective over the job).

        ``inputs`` default to the example inputs the model was compiled with; nothing runs but lowering.
        """
        rank = world()[0]
        if rank in self.mesh:
            gins = self._inputs(inputs or self.example_inputs)
            program = self.program(gins)
            assert program.memory is not None
            state, temp, note = optimizer_bytes(self.optimizer)
            persistent = {
                "parameters": unique_bytes(p._local for p in self.params),
                "buffers": unique_bytes(b._local for b in self.module.buffers() if isinstance(b, GlobalTensor)),
                "optimizer state": state,
                "inputs": unique_bytes(x._local for x in gins if isinstance(x, GlobalTensor)),
            }
            update = program.memory.gradients + temp + program.memory.arena  # the arena stays allocated
            if self.updates != "after" and self.max_grad_norm is None and program.release_lines:
                # each unit is updated where the program releases it, on top of what is alive there
                update = max(
                    program.memory.live[line]
                    + update_temporaries(self.optimizer, [self.local_params[program.grad_of[k]] for k in unit.grads])
                    for unit, line in zip(program.units, program.release_lines)
                )
                note += "; each gradient unit updated during backward, where it is released"
            if any(sl is not None for sl in self.slices):  # ZeRO-1/2: the updated pieces are all-gathered
                largest = max(p._local.nbytes for p, sl in zip(self.params, self.slices) if sl is not None)
                staging = largest if self.mesh.device_type == "cpu" else 0  # gloo stages the output too
                update = max(update, program.memory.gradients + largest + staging + program.memory.arena)
            if self.cuda_graphs or self.inductor:  # the plan is the op-by-op program's
                note += (
                    "; not modelled: "
                    + ("the CUDA graph's private pool" if self.cuda_graphs else "Inductor's own buffers")
                    + " (how far above this on one H100: BENCHMARKS.md, One GPU; not measured on ranks)"
                )
            report = MemoryReport(rank, persistent, program.memory, update, note)
        else:
            report = MemoryReport(rank, {}, ProgramMemory(0, [], 0, ""), 0, "no part of the model on this rank")
        return with_every_peak(report)

    def _static_step(self, inputs: Sequence[Any], trace: str | None = None) -> float:
        program = self.program(inputs)
        if self.record is None:
            self.record = program.record
        if self.cuda_graphs:
            return self._graphed_step(program, inputs, trace)
        for lp in self.local_params:
            lp.grad = None  # last step's gradients go before this step's activations arrive
        args = [p._local for p in self.params]
        args += [b._local for _, b in self.module.named_buffers() if isinstance(b, GlobalTensor)]
        args += [x._local if isinstance(x, GlobalTensor) else x for x in inputs]
        run = program.run if program.ran else program.checked  # the first run checks local shapes
        actors = None
        if self.updates != "after":
            actors = UpdateActors(
                functools.partial(self._reduce_unit, program),
                functools.partial(self._update_unit, program),
                len(program.units),
                world()[0],
                "threads" if self.updates == "actors" else self.updates,
                functools.partial(_collective_done, program),
            )
        marks: list[int] = []  # "after": when backward ended, for the trace

        def mark(unit: int | None, payload: Any) -> None:
            if unit is None:
                marks.append(time.time_ns())

        start = time.time_ns()
        try:
            with torch.no_grad():
                if actors is None and self.inductor and trace is None:  # nothing to release: fewer breaks
                    loss, grads = run(args)
                else:
                    loss, grads = run(args, actors.ready if actors is not None else mark)
        except BaseException:
            if actors is not None:
                actors.close()
            raise
        compute_end = time.time_ns()
        if actors is not None:
            actors.finish()
        program.ran = True
        for i, g in zip(program.grad_of, grads):
            self.local_params[i].grad = self._piece(i, g)
        self._update(stepped=self.updates != "after" and self.max_grad_norm is None)
        if trace is not None:
            end = (actors.backward_end_ns if actors is not None else marks[0] if marks else None) or compute_end
            mine = [Event(world()[0], "compute", "forward + backward", start, end)]
            mine += actors.events if actors is not None else []
            if compute_end > end:
                mine.append(Event(world()[0], "compute", "wait for all-reduce", end, compute_end))
            self._gather_trace(mine, trace)
        return float(loss.item())

    def _graphed_step(self, program: Program, inputs: Sequence[Any], trace: str | None) -> float:
        """The step replayed as this program's CUDA graph, captured after warm-up (runtime/cuda_graph.py)."""
        check_graphable(self.mesh, self.zero)
        start = time.time_ns()
        key = _signature(inputs)
        graphed = self.graphs.get(key)
        if graphed is None or graphed.owner is not program:  # new, or the programs were lowered anew
            body = functools.partial(self._graph_body, program)
            graphed = self.graphs[key] = GraphedStep(body, safe=not self.inductor, owner=program)
        fixed = [p._local for p in self.params]
        fixed += [b._local for _, b in self.module.named_buffers() if isinstance(b, GlobalTensor)]
        fed = [x._local if isinstance(x, GlobalTensor) else x for x in inputs]
        # what the graph reads by address or bakes in: tensors, optimizer state and settings, the clip norm
        state = (fingerprint(fixed, self.optimizer), id(self.optimizer), self.max_grad_norm)
        if state != graphed.key:  # new or replaced optimizer state may need its step counts on the device
            self.graph_update = make_capturable(self.optimizer)
            state = (fingerprint(fixed, self.optimizer), *state[1:])
        with torch.no_grad():
            loss, grads = graphed(fixed, fed, state)
        for i, g in grads:  # this graph's gradients (another graph, or zero_grad, may have set others)
            self.local_params[i].grad = g
        if not self.graph_update:  # an update the graph could not hold runs after it, on its gradients
            self.optimizer.step()
        self.steps += 1
        value = float(loss.item())
        if trace is not None:
            what = {"eager": "step (warm-up, op by op)", "capture": "step (captured, then replayed)"}
            name = what.get(graphed.last, "step (CUDA graph replay)")
            self._gather_trace([Event(world()[0], "compute", name, start, time.time_ns())], trace)
        return value

    def _graph_body(self, program: Program, args: list[Any]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """A step's device work, with no host reads, as the graph captures it: forward and backward,
        gradients handed to the optimizer, clipping, and the update where the optimizer can be captured;
        returns the loss and each parameter's gradient (the graph's outputs)."""
        for lp in self.local_params:
            lp.grad = None  # the last step's gradients go before this step's activations arrive
        run = program.run if program.ran else program.checked
        loss, grads = run(args)
        program.ran = True
        out = list(zip(program.grad_of, grads))
        for i, g in out:
            self.local_params[i].grad = g
        if self.max_grad_norm is not None:  # one device: torch's own clipping, which reads nothing back
            torch.nn.utils.clip_grad_norm_(self.local_params, self.max_grad_norm)
        if self.graph_update:
            self.optimizer.step()
        return loss, out

    def _piece(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s gradient as its optimizer sees it: under ZeRO-1 this rank's piece of it (under
        ZeRO-2 the program returns the piece already)."""
        sl = self.slices[i]
        return grad[sl] if sl is not None and self.grad_sbps[i] is None else grad

    def _reduce_unit(self, program: Program, unit: int, payload: Any) -> list[torch.Tensor]:
        """The all-reduce actor's task: unit ``unit``'s synchronised gradients."""
        return wait_bucket(payload) if program.units[unit].bucket else list(payload)

    def _update_unit(self, program: Program, unit: int, grads: Sequence[torch.Tensor]) -> None:
        """The optimizer actor's task: step just this unit's parameters (torch optimizers skip parameters
        without a gradient, so one optimizer keeps all the state); with clipping, only hold the gradients."""
        mine = []
        for k, g in zip(program.units[unit].grads, grads):
            lp = self.local_params[program.grad_of[k]]
            lp.grad = self._piece(program.grad_of[k], g)
            mine.append(lp)
        if self.max_grad_norm is not None:
            return  # updates wait for the global norm (as clip_grad_norm_); the all-reduces still overlapped backward
        self.optimizer.step()
        for lp in mine:
            lp.grad = None  # the next unit's step must not update these again

    def _gather_trace(self, mine: list[Event], path: str) -> None:
        everyone: list[Any] = [None] * self.mesh.size
        torch.distributed.all_gather_object(everyone, mine, group=group_for(self.mesh.ranks).group)
        self.events = [e for rank_events in everyone for e in rank_events]
        if world()[0] == self.mesh.ranks[0]:
            tracing.write(self.events, path)

    def _update(self, stepped: bool = False) -> None:
        """Clip and step the optimizer on the local pieces (unless the update actors ``stepped`` already)
        and, under ZeRO-1/2, all-gather the updated pieces."""
        if not stepped:
            if self.max_grad_norm is not None:
                clip_grad_norm(self.opt_sbps, self.local_params, self.mesh, self.max_grad_norm)
            self.optimizer.step()
        for p, lp, z, sl in zip(self.params, self.local_params, self.opt_sbps, self.slices):
            if sl is not None:
                with torch.no_grad():
                    p._local.copy_(box(wrap(lp.detach(), self.mesh, z, p.shape), self.mesh, p.sbp)._local)
        self.steps += 1

    def _step(self, inputs: Sequence[Any]) -> float:
        with implicit_broadcast():
            loss = self.module(*self._inputs(inputs))
        if not isinstance(loss, GlobalTensor) or loss.dim() != 0:
            raise ValueError(f"the model's forward must return a scalar loss, got {type(loss).__name__}")
        logical = loss.full()  # one logical loss: its gradient is B, never summed over ranks
        for p, lp in zip(self.params, self.local_params):
            p.grad = lp.grad = None
        with implicit_broadcast(), bucketed(GradSync(self.bucket_bytes)) as sync:
            logical.backward()
            sync.finish()
        for p, lp, sl in zip(self.params, self.local_params, self.slices):
            g = p.grad._local if isinstance(p.grad, GlobalTensor) else None
            lp.grad = g[sl] if g is not None and sl is not None else g
        self._update()
        return float(logical.item())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors named as in ``model.state_dict()``, equal on every rank of the mesh."""
        return {
            k: (v.full() if isinstance(v, GlobalTensor) else v).detach() for k, v in self.module.state_dict().items()
        }

    # -- checkpoints ------------------------------------------------------------------------------------
    def _model_tensors(self) -> dict[str, GlobalTensor]:
        """Parameters and buffers by checkpoint name, ``model.<name>``."""
        return {"model." + n: t for n, t in [*self.module.named_parameters(), *self.module.named_buffers()]}  # type: ignore[misc]

    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        """Model tensors as ``model.<name>``, optimizer tensors as ``optim.<param>.<key>``, the rest as meta."""
        tensors = self._model_tensors()
        names = [n for n, _ in self.module.named_parameters()]
        sd = self.optimizer.state_dict()
        scalars: dict[str, float] = {}
        for i, (name, p) in enumerate(zip(names, self.params)):
            for key, value in sd["state"].get(i, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    tensors[f"optim.{name}.{key}"] = wrap(value, self.mesh, self.opt_sbps[i], p.shape)
                else:
                    scalars[f"{i}.{key}"] = float(value)
        tied = set(self.module.state_dict()) - {n[len("model.") :] for n in tensors if n.startswith("model.")}
        owner = {id(t): n for n, t in self.module.named_parameters()}
        all_params = dict(self.module.named_parameters(remove_duplicate=False))
        aliases = {n: owner[id(all_params[n])] for n in tied if n in all_params}
        meta = {"step": self.steps, "param_groups": sd["param_groups"], "optim_scalars": scalars, "aliases": aliases}
        meta["rng"] = rng_states()
        return tensors, meta

    def load(self, directory: str) -> None:
        """Load a snapshot saved on any mesh with any strategy into this module's layouts (collective)."""
        self.wait_save()
        targets = self._model_tensors()
        # optimizer state: laid out like its parameter, read into fresh locals, then given to the optimizer
        params = {n: (i, p) for i, ((n, _), p) in enumerate(zip(self.module.named_parameters(), self.params))}
        state: dict[int, dict[str, Any]] = {}
        for full in read_index(directory)["tensors"]:
            if not full.startswith("optim."):
                continue
            pname, key = full[len("optim.") :].rsplit(".", 1)
            if pname not in params:
                raise CheckpointError(f"checkpoint {directory} holds optimizer state of {pname!r}, not in this model")
            i, p = params[pname]
            local = torch.empty_like(self.local_params[i].detach())
            targets[full] = wrap(local, self.mesh, self.opt_sbps[i], p.shape)
            state.setdefault(i, {})[key] = local
        meta = load_checkpoint(directory, targets)  # one pass: each shard file is verified and opened once
        for ik, value in meta["optim_scalars"].items():
            i, key = ik.split(".", 1)
            state.setdefault(int(i), {})[key] = torch.tensor(value)
        groups = meta["param_groups"]
        for saved, mine in zip(groups, self.optimizer.param_groups):
            if "capturable" in mine:  # how the update runs belongs to this module's device, not the snapshot's
                saved["capturable"] = mine["capturable"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.steps = int(meta["step"])
        restore_rng(meta.get("rng"))

    def explain(self) -> str:
        """Parameter layouts and inputs, for people."""
        lines = [f"ParallelModule: strategy {self.strategy!r} on {self.mesh}, {self.steps} step(s) run"]
        lines.append("inputs: " + ", ".join(format_sbp(s) for s in self.input_sbp))
        width = max((len(n) for n in self.layouts), default=4)
        for name, sbp in self.layouts.items():
            p = self.module.get_parameter(name)
            lines.append(f"  {name:<{width}}  {tuple(p.shape)!s:<14} {format_sbp(sbp)}")
        if self.record is not None:
            if self.programs:
                lines.append("step program (forward and backward lowered to local ops and collectives):")
            else:
                lines.append("first eager step (forward, backward, gradient sync, clipping, update):")
            lines.append(self.record.explain())
        return "\n".join(lines)


def _signature(inputs: Sequence[Any]) -> Any:
    """What a program is lowered for: each input's shape, dtype and layout (non-tensors by value)."""
    return tuple((tuple(x.shape), x.dtype, x.sbp) if isinstance(x, GlobalTensor) else x for x in inputs)


def check_graphable(mesh: Mesh, zero: int) -> None:
    """Raise unless a step on ``mesh`` can be replayed as one CUDA graph (one GPU, nothing to shard)."""
    if mesh.device_type != "cuda" or mesh.size != 1:
        raise ValueError(
            f"cuda_graphs=True replays a step on one GPU; {mesh} is not a one-device CUDA mesh: compile for "
            "sf.Mesh('cuda', (1,)) or leave cuda_graphs=False"
        )
    if zero:
        raise ValueError(f"cuda_graphs=True with zero={zero}: one device has nothing to shard; leave zero=0")


def check_inductor(zero: int) -> None:
    """Raise unless the programs can be compiled by Inductor (runtime/inductor.py)."""
    if zero == 3:
        raise ValueError(
            "inductor=True with zero=3: the prefetched parameter gathers make torch.compile recompile at every "
            "handle; use zero=1 or 2, or inductor=False"
        )


def _collective_done(program: Program, unit: int, payload: Any) -> bool:
    """Whether unit ``unit``'s gradients can be taken without waiting (its bucket's all-reduce completed)."""
    return not program.units[unit].bucket or bucket_done(payload)


def clip_grad_norm(sbps: Sequence[NdSbp], local_params: Sequence[nn.Parameter], mesh: Mesh, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over the logical gradients, computed on shards.

    Each shard's squared norm (one ``_foreach_norm`` over all of them) is summed over the mesh axes on which
    some gradient is split; a shard held by several ranks of those axes (``B`` there) counts once. Axes on
    which every gradient is ``B`` need no communication: every rank already has the same sum there.
    """
    pairs = [(sbp, lp.grad) for sbp, lp in zip(sbps, local_params) if lp.grad is not None]
    if not pairs:
        return 0.0
    sbps = [sbp for sbp, _ in pairs]
    axes = [a for a in range(mesh.ndim) if mesh.shape[a] > 1 and any(s[a] != B for s in sbps)]
    norms = torch.stack(torch._foreach_norm([g.detach() for _, g in pairs])).double()
    weights = [1.0 / math.prod(mesh.shape[a] for a in axes if s[a] == B) for s in sbps]
    total = (norms.square() * torch.tensor(weights, dtype=torch.float64, device=norms.device)).sum()
    rank = world()[0]
    for axis in axes:
        torch.distributed.all_reduce(total, group=group_for(mesh.axis_slice(axis, rank)).group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_([g for _, g in pairs], coef)
    return norm


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
