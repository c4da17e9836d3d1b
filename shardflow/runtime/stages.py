"""Cut a model into pipeline stages at module boundaries, and find balanced cut points when none are given.

The cut is torch.distributed.pipelining's front end (``pipeline(model, mb_args, split_spec)``): it traces the
forward with ``torch.export`` and outlines each stage as a module that keeps the original module tree and
parameter names, so stage parameters map back to ``model.state_dict()`` names. The submodules run the traced
ATen ops, not the model's Python: a tensor hook that forward registers, or a module's backward hook, would
silently never run, so a model with either is refused (the hooks are watched for while export traces forward);
so is one calling a custom ``autograd.Function``, whose backward the cut drops (``torch.library`` ops keep
theirs; ``Function.apply`` is watched during the cut).
Its wiring (which user inputs and which outputs of the stage before feed each stage) is read from the split
graph here. The outlined submodules would interpret their graphs node by node (``torch.fx.Interpreter``,
torch's default for them); they are set to run the graph's generated Python code instead: the same ops for
less host time per op, which is what a launch-bound accelerator stage pays (``benchmarks/stage_code.py``,
BENCHMARKS.md). A parameter used by several stages (GPT's tied ``wte``/``lm_head``) arrives as one copy per
stage; the runtime sums those copies' gradients (``Split.tied``), which torch's own runtime leaves to the
user.

Without cut points, the candidates are the children of the model's longest ``ModuleList``/``Sequential``
(a transformer's blocks, an MLP's layers); the forward runs once on the example micro-batch with every op's
FLOPs counted by shardflow's formulas (``ops/flops/``, the count ``pm.flops()`` reports), the running count
read as each candidate starts, and the cuts that minimise the slowest stage's time is chosen: its FLOPs over
its number of ranks, which share its micro-batches (the cost model for equal-speed devices).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from shardflow.ops.flops import op_flops
from shardflow.runtime.capture_errors import explained

Source = tuple[str, int]  # ("input", i): the step's i-th input; ("prev", j): output j of the stage before


@dataclass
class Split:
    """A model cut into stages: ``modules[s]`` runs stage ``s`` on ``wiring[s]``."""

    modules: list[nn.Module]
    wiring: list[list[Source]]
    outputs: list[int]  # number of tensors each stage returns (the last returns the loss)
    names: list[dict[str, nn.Parameter]]  # each stage's parameters by their name in model.state_dict()
    tied: dict[str, tuple[int, ...]]  # parameter name -> the stages holding a copy (when more than one)
    split_points: list[str]


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones have several) -> the name ``named_parameters()`` lists."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def run_generated_code(module: nn.Module) -> None:
    """Have torch.export's outlined submodules run their graph's generated code, not ``fx.Interpreter``.

    NOTE: the code is generated when torch finalizes the module; a later edit of a stage's graph would need
    ``finalize()`` again (nothing here edits them)."""
    from torch.export.unflatten import InterpreterModule

    for sub in module.modules():
        if isinstance(sub, InterpreterModule) and hasattr(sub, "_run_with_interpreter"):
            sub._run_with_interpreter = False


def split_model(model: nn.Module, micro_batch: Sequence[Any], split_points: Sequence[str]) -> Split:
    """Cut a copy of ``model`` before each module named in ``split_points`` (``len + 1`` stages)."""
    from torch.distributed.pipelining import SplitPoint, pipeline

    known = dict(model.named_modules())
    for point in split_points:
        if point not in known or point == "":
            raise ValueError(
                f"split point {point!r} is not a submodule of {type(model).__name__}; "
                f"name one of its modules, e.g. {[n for n in known if n][:6]}"
            )
    if len(set(split_points)) != len(split_points):
        raise ValueError(f"split points must be distinct, got {list(split_points)}")
    _refuse_batch_norm(model)
    names = canonical_names(model)
    work = copy.deepcopy(model)
    if not split_points:
        return Split([work], [[("input", i) for i in range(len(micro_batch))]], [1], [_params(work, names)], {}, [])
    _refuse_backward_hooks(model)
    spec = {point: SplitPoint.BEGINNING for point in split_points}
    watch = _HookWatch()  # the traced stages would silently drop tensor hooks that forward registers
    functions = _FunctionWatch()  # and custom autograd Functions' backward

    cut = f"cutting {type(model).__name__} at {list(split_points)} with torch.export"
    hint = "pick split points at module calls of forward (e.g. transformer blocks)"
    with explained(work, cut, hint), watch, functions:
        pipe = pipeline(work, mb_args=tuple(micro_batch), split_spec=spec)
    if watch.seen:
        raise ValueError(
            f"{type(model).__name__} registers tensor hooks in forward (register_hook or retain_grad): the "
            "stages of a pipeline (cut by torch.export) would not run them, and its gradients would differ; "
            "remove them, or train without pipeline="
        )
    if functions.seen:
        reentrant = any(c.endswith("CheckpointFunction") for c in functions.seen)
        raise ValueError(
            f"{type(model).__name__} calls custom autograd.Functions {sorted(set(functions.seen))[:4]}: the stages "
            "of a pipeline (cut by torch.export) keep their forward's ops but not their backward, so gradients "
            "would differ; register each as a torch.library custom op with register_autograd (which the cut "
            "keeps)" + (", checkpoint with use_reentrant=False" if reentrant else "") + ", or train without pipeline="
        )
    if pipe.num_stages != len(split_points) + 1:
        raise ValueError(
            f"cutting at {list(split_points)} gave {pipe.num_stages} stages, not {len(split_points) + 1}: "
            "give split points in execution order, each a module that forward calls once"
        )
    modules = [pipe.get_stage_module(s) for s in range(pipe.num_stages)]
    for module in modules:
        run_generated_code(module)
    wiring, outputs = _wiring(pipe.split_gm.graph, pipe.num_stages)
    _adopt_unreached(work, modules, names)
    params = [_params(m, names) for m in modules]
    holders: dict[str, list[int]] = {}
    for s, ps in enumerate(params):
        for name in ps:
            holders.setdefault(name, []).append(s)
    tied = {name: tuple(stages) for name, stages in holders.items() if len(stages) > 1}
    return Split(modules, wiring, outputs, params, tied, list(split_points))


def _adopt_unreached(work: nn.Module, modules: list[nn.Module], names: dict[str, str]) -> None:
    """Parameters and saved buffers that forward never reaches are in no outlined stage: the first stage
    adopts them under their own names, so they are saved, loaded and handed to its optimizer; like plain
    PyTorch's, such a parameter gets no gradient and no update."""
    reached = {names.get(n, n) for m in modules for n, _ in m.named_parameters(remove_duplicate=False)}
    reached |= {n for m in modules for n, _ in m.named_buffers(remove_duplicate=False)}
    saved = work.state_dict(keep_vars=True)
    for name, p in work.named_parameters():
        if name not in reached:
            _attach(modules[0], name, p)
    for name, buf in work.named_buffers():
        if name not in reached and name in saved:
            _attach(modules[0], name, buf)


def _attach(module: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = module
    for part in path.split(".") if path else []:
        if not isinstance(getattr(owner, part, None), nn.Module):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Parameter):
        owner.register_parameter(attr, value)
    else:
        owner.register_buffer(attr, value)


def _refuse_batch_norm(model: nn.Module) -> None:
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has BatchNorm: under a pipeline it would normalise each micro-batch "
            "alone, which is not the serial model; use strategy='dp' without a pipeline"
        )


class _HookWatch(TorchFunctionMode):
    """Watches a forward for tensor hooks (``register_hook``, ``retain_grad``); ``seen`` is True if it
    registered one (autograd offers no way to list a node's hooks afterwards)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _HOOKS:
            self.seen = True
        return func(*args, **(kwargs or {}))


_HOOKS = (torch.Tensor.register_hook, torch.Tensor.retain_grad)


class _FunctionWatch:
    """Records the custom ``autograd.Function``s a forward calls while torch.export traces it: its cut keeps
    their forward's ops, not their backward (a straight-through estimator would train with rounding's zero
    derivative, silently). No mode or hook sees ``Function.apply``, so it is wrapped for the duration of the
    cut. torch.library ops' generated Functions are not recorded: the cut keeps those ops whole."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self) -> _FunctionWatch:
        from torch.autograd.function import Function

        from shardflow.runtime.split_backward import library_function

        self._original = Function.__dict__["apply"]
        original, seen = self._original.__func__, self.seen

        def apply(cls: Any, *args: Any, **kwargs: Any) -> Any:
            if not library_function(cls):
                seen.append(f"{cls.__module__}.{cls.__qualname__}")
            return original(cls, *args, **kwargs)

        Function.apply = classmethod(apply)  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        from torch.autograd.function import Function

        Function.apply = self._original  # type: ignore[method-assign]


def _refuse_backward_hooks(model: nn.Module) -> None:
    """torch.export's stages run the traced ATen ops: a module's backward hook would never run in them."""
    hooked = [name or "(the model)" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if hooked:
        raise ValueError(
            f"{type(model).__name__}: modules {hooked[:4]} have backward hooks, which the stages of a pipeline "
            "(cut by torch.export) would not run; remove them, or train without pipeline="
        )


def _params(module: nn.Module, names: dict[str, str]) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for name, p in module.named_parameters():
        out.setdefault(names.get(name, name), p)
    return out


def _wiring(graph: fx.Graph, stages: int) -> tuple[list[list[Source]], list[int]]:
    """Read each stage's inputs from the split graph: user inputs, or outputs of the stage just before."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    calls = [n for n in graph.nodes if n.op == "call_module"]
    stage_of = {n: s for s, n in enumerate(calls)}
    outputs = [1] * stages
    wiring: list[list[Source]] = []
    for s, call in enumerate(calls):
        sources: list[Source] = []
        for arg in call.args:
            if not isinstance(arg, fx.Node):
                raise ValueError(f"stage {s} takes a constant input {arg!r}; cut the model elsewhere")
            if arg in inputs:
                sources.append(("input", inputs.index(arg)))
                continue
            producer, index = arg, 0
            if arg.op == "call_function" and arg.args and isinstance(arg.args[0], fx.Node):
                # a getitem of a stage returning several tensors
                producer, index = arg.args[0], int(arg.args[1])  # type: ignore[arg-type]
                outputs[stage_of[producer]] = max(outputs[stage_of[producer]], index + 1)
            if stage_of.get(producer) != s - 1:
                raise ValueError(
                    f"stage {s} uses an output of stage {stage_of.get(producer)}, not of the stage just before: "
                    "pick split points so that values cross one boundary at a time"
                )
            sources.append(("prev", index))
        wiring.append(sources)
    return wiring, outputs


def blocks(model: nn.Module) -> list[str]:
    """Names of the children of the model's longest ModuleList/Sequential (a transformer's blocks, an MLP's
    layers): where pipelines cut and what activation recompute wraps; empty when there is none."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    if not lists:
        return []
    prefix, seq = max(lists, key=lambda item: len(item[1]))
    return [f"{prefix}.{n}" if prefix else n for n, _ in seq.named_children()]


def balanced_split_points(
    model: nn.Module, micro_batch: Sequence[Any], stages: int, capacity: Sequence[int] | None = None
) -> list[str]:
    """Cut points before children of the longest ModuleList/Sequential that minimise the slowest stage's time:
    its FLOPs over its ``capacity`` (the ranks sharing its micro-batches; default 1 each)."""
    _refuse_batch_norm(model)
    if stages == 1:
        return []
    children = blocks(model)
    if not children:
        raise ValueError(
            f"{type(model).__name__} has no ModuleList or Sequential to cut into {stages} stages; "
            "pass Pipeline(split_points=[...]) naming the modules each stage starts with"
        )
    prefix = children[0].rpartition(".")[0]
    if len(children) < stages:
        raise ValueError(
            f"{prefix or type(model).__name__} has {len(children)} children, too few for {stages} stages; "
            "use fewer stages or pass split_points"
        )
    share = [float(c) for c in capacity] if capacity is not None else [1.0] * stages
    if len(share) != stages or min(share) <= 0:
        raise ValueError(f"capacity needs one positive number per stage ({stages}), got {capacity}")
    starts, total = _flops_before(model, micro_batch, children)
    best: tuple[float, tuple[int, ...]] | None = None
    usable = [i for i in range(1, len(children)) if starts[i] is not None]
    for cut in itertools.combinations(usable, stages - 1):
        edges = [0.0, *(float(starts[i]) for i in cut), float(total)]  # type: ignore[arg-type]
        worst = max((b - a) / c for a, b, c in zip(edges[:-1], edges[1:], share))
        if best is None or worst < best[0]:
            best = (worst, cut)
    if best is None:
        raise ValueError(f"found no cut of {prefix} into {stages} stages; pass split_points")
    return [children[i] for i in best[1]]


class _Counter(TorchDispatchMode):
    """Adds up the FLOPs of every ATen op that runs, by shardflow's formulas (``ops/flops/``). Higher-order
    ops (``cond``) run through it uncounted: their inner ops do not reach this mode."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        flops = op_flops(func, args, kwargs or {}, [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)])
        self.total += flops.total if flops is not None else 0
        return out


def _flops_before(model: nn.Module, micro_batch: Sequence[Any], children: list[str]) -> tuple[list[int | None], int]:
    """The forward's FLOPs run before each of ``children`` starts (None: it never runs), and in all."""
    counter = _Counter()
    starts: list[int | None] = [None] * len(children)
    handles = []
    for i, name in enumerate(children):

        def pre(_m: nn.Module, _a: Any, i: int = i) -> None:
            if starts[i] is None:
                starts[i] = counter.total

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), counter:
            model(*micro_batch)
    finally:
        for h in handles:
            h.remove()
    return starts, counter.total
