"""``ParallelModule``: a model laid over a mesh by a ``ParallelPlan``, trained step by step.

Each step runs this rank's lowered program (``graph/lower.py``, one per input signature), and the optimizer
steps plain local shards: a parameter, its gradient and its optimizer state share one layout, so torch's
optimizers need no per-op dispatch. The step's variants live beside it: ``static_step.py`` (update actors),
``graphed_step.py`` (one GPU, CUDA graph), and ``static = False`` runs op by op on GlobalTensors (eager).
ZeRO is read from the plan's layouts, never decided here (``graph/transforms/zero.py`` decides).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils import _pytree as pytree

from shardflow.checkpoint.index import CheckpointError
from shardflow.comm.init import world
from shardflow.graph.evaluate import EvalProgram, lower_eval, trace_method
from shardflow.graph.flops import model_flops
from shardflow.graph.graphed_step import graphed_step
from shardflow.graph.lower import Joint, Program, lower, trace_step
from shardflow.graph.optimizer_pieces import optimizer_pieces
from shardflow.graph.parallel_memory import parallel_memory
from shardflow.graph.static_step import program_args, signature, static_step
from shardflow.ops.flop_count import Flops
from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, NdSbp, P, _Partial, format_sbp
from shardflow.placement.shard import take_local
from shardflow.plan import MeshSpec, ParallelPlan, PlanError, check_model
from shardflow.plan.knobs import Fixed, Knob, logged
from shardflow.runtime.clip import clip_grad_norm
from shardflow.runtime.cuda_graph import GraphedStep, check_graphable
from shardflow.runtime.inductor import check_inductor, compile_program
from shardflow.runtime.memory import MemoryReport
from shardflow.runtime.runner import OptimizerFactory, Runner
from shardflow.runtime.staging import Staging
from shardflow.runtime.trace import Event
from shardflow.tensor.api import distribute
from shardflow.tensor.dispatch import implicit_broadcast
from shardflow.tensor.global_tensor import GlobalTensor, box, wrap
from shardflow.tensor.grad_sync import GradSync, bucketed
from shardflow.tensor.trace import Record, recording


class ParallelModule(Runner):
    """A model laid over a mesh by a ``ParallelPlan``: ``step(*inputs)`` trains one step,
    ``full_state_dict()`` reads it back, ``plan`` is the plan (its options can be changed: ``Knob``)."""

    # the plan's options, changeable after compiling: setting one re-plans (plan/knobs.py). ``static``:
    # lowered programs, or op by op on GlobalTensors (eager: any input shape without lowering; the reference
    # the lowering is tested against). ``updates``: where each gradient unit's optimizer update runs
    # (runtime/updates.py): "actors" (threads: GPUs, where the compute thread only launches kernels), "loop"
    # (on the compute thread at release points once the unit's collective completed: CPUs, one core a rank),
    # "inline" (at the release point, waiting: deterministic), "after" (once backward and every all-reduce
    # are over, as plain DDP; the one-device default: there is nothing to hide).
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
        self.module = _laid_out(copy.deepcopy(model), mesh, self.layouts)  # the user's model stays as it was
        # NOTE: the optimizer steps on the shards. A parameter, its gradient (after synchronisation) and its
        # optimizer state share one layout and updates are element-wise, so plain torch optimizers run on
        # plain local tensors that share storage with the GlobalTensors: no per-op dispatch in the update.
        self.params: list[GlobalTensor] = list(self.module.parameters())  # type: ignore[arg-type]
        self.param_index = {n: i for i, (n, _) in enumerate(self.module.named_parameters())}
        entries = [plan.params[n] for n, _ in self.module.named_parameters()]
        # ZeRO-3: stored split, computed gathered (the lowering gathers them for each use)
        self.gathered = frozenset(i for i, e in enumerate(entries) if e.compute != e.sbp)
        pieces = optimizer_pieces(self.params, entries, mesh)  # ZeRO-1/2: a piece of each (optimizer_pieces.py)
        self.opt_sbps: list[NdSbp] = [x.sbp for x in pieces]
        self.slices: list[tuple[slice, ...] | None] = [x.slice for x in pieces]
        self.grad_sbps: list[NdSbp | None] = [x.grad_sbp for x in pieces]
        self.local_params = [
            nn.Parameter(p._local[sl] if sl is not None else p._local, requires_grad=p.requires_grad)
            for p, sl in zip(self.params, self.slices)
        ]
        self.optimizer = optimizer(self.local_params)
        self.steps = 0
        self.record: Record | None = None
        self.example_inputs: tuple[Any, ...] = ()
        self.programs: dict[Any, Program] = {}  # this rank's programs per input signature, lowered on first use
        self.joints: dict[Any, Joint] | None = None  # traced steps shared with other modules (graph/estimate.py)
        self.eval_programs: dict[Any, EvalProgram] = {}  # per method and input signature (graph/evaluate.py)
        self.staging = Staging()  # pinned host buffers the inputs' shards are copied to the device through
        self._recomputed: tuple[str, ...] = ()  # modules whose forward is patched to recompute in backward
        self.events: list[Event] = []  # every rank's events of the last traced step
        self.input_grads: list[torch.Tensor] = []  # the last step's gradients of the inputs ``_trace`` asks for
        # one device: each program's step (forward, backward, clipping, update) captured as a CUDA graph
        # after warm-up and replayed (runtime/cuda_graph.py)
        self.graphs: dict[Any, GraphedStep] = {}
        self.graph_update = True  # whether the optimizer's update is captured too (else run after replay)
        self._patch_recompute(plan.recompute)

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
        self.eval_programs.clear()
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

    def _inputs(self, inputs: Sequence[Any], sbps: Sequence[NdSbp] | None = None) -> list[Any]:
        if sbps is None and len(inputs) != len(self.input_sbp):
            raise ValueError(f"step() got {len(inputs)} inputs; the model was compiled with {len(self.input_sbp)}")
        out = []
        for i, (x, sbp) in enumerate(zip(inputs, self.input_sbp if sbps is None else sbps)):
            if isinstance(x, GlobalTensor):
                out.append(x if x.mesh == self.mesh and x.sbp == sbp else x.redistribute(sbp, mesh=self.mesh))
            elif isinstance(x, torch.Tensor) and P not in sbp:
                # the full batch, the same on every rank (the API's promise): each rank slices its shard on the host, no
                # messages, and copies only that to its device (through a pinned buffer: runtime/staging.py)
                piece = take_local(x.detach(), sbp, self.mesh.shape, self.mesh.coord_of(world()[0]))
                # (a virtual mesh's piece: a storage of its own, as the staged copy is)
                piece = piece.clone() if self.mesh.virtual else self.staging.to_device(i, piece, self.mesh.device)
                out.append(wrap(piece, self.mesh, sbp, x.shape))
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
            gins = self._inputs(inputs)
            program = self.program(gins)
            if self.record is None:
                self.record = program.record
            if self.cuda_graphs:
                return graphed_step(self, program, gins, trace)
            return static_step(self, program, gins, trace)
        if trace is not None:
            raise ValueError("trace= needs the static program (pm.static = True); eager steps have no actors")
        if self.cuda_graphs:
            raise ValueError("cuda_graphs replay the static program; set pm.static = True or pm.cuda_graphs = False")
        with contextlib.ExitStack() as stack:
            if self.record is None:  # the first step is recorded for explain()
                self.record = stack.enter_context(recording())
            return self._step(inputs)

    def evaluate(self, *inputs: Any, method: str = "forward") -> Any:
        """The model's ``method`` on the global batch ``inputs``, forward only (no gradient, no update, the
        model in eval mode), its tensors the full values on every rank of the mesh (None outside it)."""
        if not self.inside:
            return None
        if not callable(getattr(self.module, method, None)):
            raise ValueError(f"evaluate(method={method!r}): {type(self.module).__name__} has no such method")
        gins = self._inputs(inputs, self._eval_layouts(inputs))
        was = self.module.training
        self.module.eval()
        try:
            if not self.static:  # op by op on GlobalTensors
                with torch.no_grad(), implicit_broadcast():
                    out = getattr(self.module, method)(*gins)
                return pytree.tree_map(lambda t: t.full() if isinstance(t, GlobalTensor) else t, out)
            key = (method, signature(gins))
            if key not in self.eval_programs:
                traced = trace_method(self.module, method, gins, self.mesh.device_type)
                sbps = self._sbps(gins)
                self.eval_programs[key] = lower_eval(
                    traced, self.mesh, world()[0], sbps, self.zero_axis, self._plan.values, self.gathered
                )
            fixed, fed = program_args(self, gins)
            return self.eval_programs[key](fixed + fed)
        finally:
            self.module.train(was)

    def _eval_layouts(self, inputs: Sequence[Any]) -> tuple[NdSbp, ...]:
        """The step's input layouts for the step's inputs; for another method's, the layout the plan's inputs
        share (each split by samples) for every tensor with a batch dim (replicated where they differ)."""
        if len(inputs) == len(self.input_sbp):
            return self.input_sbp
        replicated = (B,) * self.mesh.ndim
        batch = self.input_sbp[0] if len(set(self.input_sbp)) == 1 else replicated
        return tuple(batch if isinstance(x, torch.Tensor) and x.dim() else replicated for x in inputs)

    def _sbps(self, inputs: Sequence[Any]) -> list[NdSbp | None]:
        """One layout per placeholder of a traced program: parameters, buffers, inputs (None: not a tensor)."""
        sbps: list[NdSbp | None] = [p.sbp for p in self.params]
        sbps += [b.sbp for _, b in self.module.named_buffers() if isinstance(b, GlobalTensor)]
        return sbps + [x.sbp if isinstance(x, GlobalTensor) else None for x in inputs]

    def program(self, inputs: Sequence[Any]) -> Program:
        """This rank's program for inputs laid out as ``inputs`` (GlobalTensors), lowered on first use."""
        key = signature(inputs)
        if key not in self.programs:
            joint = self._trace(inputs)
            program = lower(
                joint,
                self.mesh,
                world()[0],
                self._sbps(inputs),
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

    def _trace(self, inputs: Sequence[Any]) -> Joint:
        """The traced step for ``inputs``: it depends on global shapes and the recomputed modules, not on
        layouts, so a cost model pricing many plans of one model traces each once (``joints``)."""
        device = self.mesh.device_type
        if self.mesh.virtual and device == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # a GPU plan priced without a GPU: traced with the CPU's attention kernel
        if self.joints is None:
            return trace_step(self.module, inputs, device)
        shapes = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in inputs)
        key = (shapes, self._recomputed, device)
        if key not in self.joints:
            self.joints[key] = trace_step(self.module, inputs, device)
        return self.joints[key]

    def flops(self, *inputs: Any) -> Flops:
        inputs = inputs or self.example_inputs
        if not self.inside:
            return model_flops(self.module, inputs, self.mesh.device_type).with_rank(Flops())
        flops = self.program(self._inputs(inputs)).flops
        assert flops is not None
        return flops

    def _memory(self, inputs: Sequence[Any]) -> MemoryReport:
        """This rank's predicted memory (``graph/parallel_memory.py``)."""
        return parallel_memory(self, inputs)

    def _piece(self, i: int, grad: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s gradient as its optimizer sees it: under ZeRO-1 this rank's piece of it (under
        ZeRO-2 the program returns the piece already)."""
        sl = self.slices[i]
        return grad[sl] if sl is not None and self.grad_sbps[i] is None else grad

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

    # -- snapshots (the format: runtime/runner.py) -------------------------------------------------------
    def _model_targets(self) -> dict[str, GlobalTensor]:
        """Parameters and buffers by checkpoint name, ``model.<name>``."""
        return {"model." + n: t for n, t in [*self.module.named_parameters(), *self.module.named_buffers()]}  # type: ignore[misc]

    def _named_state(self) -> tuple[dict[str, GlobalTensor], dict[str, Any]]:
        """Model tensors as ``model.<name>``, optimizer tensors as ``optim.<param>.<key>``, the rest as meta."""
        tensors = self._model_targets()
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
        return tensors, self._snapshot_meta(sd["param_groups"], scalars, aliases)

    def _optim_target(self, name: str, directory: str) -> tuple[int, torch.Tensor, GlobalTensor]:
        i = self.param_index.get(name)
        if i is None:
            raise CheckpointError(f"checkpoint {directory} holds optimizer state of {name!r}, not in this model")
        piece = torch.empty_like(self.local_params[i].detach())
        return i, piece, wrap(piece, self.mesh, self.opt_sbps[i], self.params[i].shape)

    def _load_optimizer(self, state: dict[int, dict[str, Any]], groups: list[dict[str, Any]], directory: str) -> None:
        for saved, mine in zip(groups, self.optimizer.param_groups):
            if "capturable" in mine:  # how the update runs belongs to this module's device, not the snapshot's
                saved["capturable"] = mine["capturable"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

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


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _laid_out(module: nn.Module, mesh: Mesh, layouts: Mapping[str, NdSbp]) -> nn.Module:
    """``module`` with its parameters distributed over ``mesh`` as ``layouts`` says and its buffers
    replicated; tied parameters (GPT's wte / lm_head) stay one parameter. On a virtual mesh (the cost
    model's, a meta-device model) each tensor is sliced to this rank's shard: no messages."""

    def place(t: torch.Tensor, sbp: NdSbp) -> GlobalTensor:
        if not mesh.virtual:
            return distribute(t, mesh, sbp)
        local = take_local(
            t, tuple(B if isinstance(p, _Partial) else p for p in sbp), mesh.shape, mesh.coord_of(world()[0])
        )
        return wrap(local.clone(), mesh, sbp, t.shape)  # a storage of its own, as a distributed shard has

    def owner(name: str) -> tuple[nn.Module, str]:
        mod_name, _, attr = name.rpartition(".")
        return (module.get_submodule(mod_name) if mod_name else module), attr

    laid: dict[int, nn.Parameter] = {}
    for name, p in list(module.named_parameters(remove_duplicate=False)):
        if id(p) not in laid:
            laid[id(p)] = nn.Parameter(place(p.detach(), layouts[name]), requires_grad=p.requires_grad)
        setattr(*owner(name), laid[id(p)])
    for name, buf in list(module.named_buffers()):
        mod, attr = owner(name)
        mod.register_buffer(attr, place(buf, (B,) * mesh.ndim))
    return module
