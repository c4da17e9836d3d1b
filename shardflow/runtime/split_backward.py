"""A stage's backward in two passes: the gradients of its inputs first, then those of its parameters.

Why: in a pipeline the stage before waits only for the gradients of what it sent; parameter gradients are
needed at the optimizer step. Computing the input gradients first and sending them before the weight
gradients (the B/W split of zero-bubble pipeline schedules, Qi et al. 2023) takes each boundary's
weight-gradient time off the critical path, in the same 1F1B or GPipe order. torch.distributed.pipelining
splits the backward only in its zero-bubble schedules; its GPipe and 1F1B send after the whole backward.

How: the micro-batch's autograd graph is walked once. The nodes from which a stage input is reachable (the
input side) run in pass 1, ``autograd.grad`` to the inputs, where each node computes only the gradients that
lead there; a prehook on every input-side node with an edge leaving the input side (a "boundary": ``addmm``'s
node, whose weight edge leaves) records the gradient it received. Pass 2 resumes from those records, one
``autograd.backward`` per boundary from its ``GradientEdge`` with ``inputs=`` the parameters only it reaches,
so no node runs twice except the boundaries themselves (for the other edges) and gradients accumulate into
``.grad``, post-accumulate hooks included, as in one backward. Where the split could compute or count
something twice, or fail (a custom autograd Function anywhere in the graph, a reentrant checkpoint among them;
a parameter reached from two boundaries) it is not made: ``plan`` returns None and the caller runs one
ordinary backward. ``torch.library`` custom ops (fused kernels registered with a backward formula) split: each
runs its backward once. One at a boundary (with a weight edge) computes its weight gradient in pass 1 (a
custom op computes every gradient it was built to), so it gains nothing there; pass 2 resumes from the
gradients it gave the weight side. A non-reentrant checkpoint splits like any other graph. A tensor hook on a
boundary's output would run in both passes (applied twice to what the weights' pass reads), and autograd
cannot list them: callers split only graphs that hold none. Pipeline stages are torch.export graphs, which
hold none (``stages.py`` refuses a model whose forward registers one: the cut would drop it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node


@dataclass
class SplitBackward:
    """One micro-batch's backward, planned: ``inputs_first`` then ``weights``."""

    roots: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    inputs: list[torch.Tensor]
    boundaries: list[Node]  # input-side nodes with edges leaving the input side
    leaving: list[list[int]]  # per boundary: which of its edges (``next_functions``) leave the input side
    reaches: list[list[torch.Tensor]]  # per boundary: the leaves only it reaches off the input side
    outside: list[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]]  # roots off the input side
    recorded: dict[Node, tuple[Any, ...]] = field(default_factory=dict)

    def inputs_first(self) -> list[torch.Tensor | None]:
        """Pass 1: the inputs' gradients (None for an input the roots do not reach)."""
        handles = [
            n.register_hook(_gave(self.recorded, n, leave))
            if library_op(n)
            else n.register_prehook(_got(self.recorded, n))
            for n, leave in zip(self.boundaries, self.leaving)
        ]
        try:
            off = {id(r) for r, _, _ in self.outside}
            on_side = [(r, g) for r, g in zip(self.roots, self.grads) if id(r) not in off]
            return list(
                torch.autograd.grad(
                    [r for r, _ in on_side],
                    self.inputs,
                    [g for _, g in on_side],
                    retain_graph=True,
                    allow_unused=True,
                )
            )
        finally:
            for h in handles:
                h.remove()

    def weights(self) -> None:
        """Pass 2: every parameter's gradient accumulated, from the gradients pass 1 left at the boundaries."""
        for node, leaving, leaves in zip(self.boundaries, self.leaving, self.reaches):
            got = self.recorded.pop(node, None)
            if got is None or not leaves:
                continue
            if library_op(node):
                # a custom op's backward computes all its gradients (its ``needs_input_grad`` was fixed in
                # forward) and ran whole in pass 1: resume from what it gave the edges that leave the input
                # side, rather than run it (and whatever its backward does) a second time
                kept = []
                for i in leaving:
                    child, nr = node.next_functions[i]
                    if child is not None and got[i] is not None:
                        kept.append((GradientEdge(child, nr), got[i]))
            else:  # a built-in node computed only its inputs' gradients in pass 1: run it from what it received
                kept = [(GradientEdge(node, i), g) for i, g in enumerate(got) if g is not None]
            if kept:
                torch.autograd.backward([e for e, _ in kept], [g for _, g in kept], inputs=leaves)
        for root, grad, leaves in self.outside:
            if leaves:
                torch.autograd.backward([root], [grad] if grad is not None else None, inputs=leaves)
        # pass 1 retained the graph: let it go (and the activations only pass 1 read) with the last reference
        self.recorded.clear()
        self.roots, self.grads, self.inputs, self.outside = [], [], [], []
        self.boundaries, self.leaving, self.reaches = [], [], []


def plan(
    roots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], inputs: Sequence[torch.Tensor]
) -> SplitBackward | None:
    """The two passes of ``backward(roots, grads)`` for ``inputs`` (leaves requiring grad), or None where a
    split would compute or count something twice, or has nothing to gain (no input, no root)."""
    start = [r.grad_fn for r in roots]
    if not inputs or not roots or any(fn is None for fn in start):
        return None
    targets: set[Node] = set()
    for x in inputs:
        acc = _accumulator(x)
        if acc is None:
            return None
        targets.add(acc)
    # every node the roots reach, and who points at it
    parents: dict[Node, list[Node]] = {}
    order: list[Node] = []
    stack: list[Node] = [fn for fn in start if fn is not None]
    seen: set[Node] = set(stack)
    while stack:
        node = stack.pop()
        if isinstance(node, BackwardCFunction) and not library_op(node):
            # a custom Function's backward may have effects that must happen once, and may refuse
            # ``autograd.grad`` (a reentrant checkpoint runs its own backward inside): one ordinary backward
            return None
        order.append(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    # the input side: nodes from which an input's accumulator is reachable
    side: set[Node] = {t for t in targets if t in seen}
    stack = list(side)
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if parent not in side:
                side.add(parent)
                stack.append(parent)
    owner: dict[Node, int] = {}  # leaf accumulator -> the one group that reaches it

    def leaves_below(first: list[Node], group: int) -> list[torch.Tensor] | None:
        found: list[torch.Tensor] = []
        todo, visited = list(first), set(first)
        while todo:
            node = todo.pop()
            children = [c for c, _ in node.next_functions if c is not None]
            if not children and hasattr(node, "variable"):
                if owner.setdefault(node, group) != group:
                    return None  # reached from two places: pass 2 would count it twice
                found.append(node.variable)
            for c in children:
                if c not in visited:
                    visited.add(c)
                    todo.append(c)
        return found

    boundaries: list[Node] = []
    leaving: list[list[int]] = []
    reaches: list[list[torch.Tensor]] = []
    for node in order:
        if node not in side or node in targets:
            continue
        off = [(i, c) for i, (c, _) in enumerate(node.next_functions) if c is not None and c not in side]
        if not off:
            continue
        leave = [i for i, _ in off]
        leaves = leaves_below([c for _, c in off], len(boundaries))
        if leaves is None:
            return None
        boundaries.append(node)
        leaving.append(leave)
        reaches.append(leaves)
    outside: list[tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]] = []
    for root, grad in zip(roots, grads):
        if root.grad_fn in side:
            continue
        assert root.grad_fn is not None
        leaves = leaves_below([root.grad_fn], -1 - len(outside))
        if leaves is None:
            return None
        outside.append((root, grad, leaves))
    if len(outside) == len(roots):
        return None  # no root reaches an input: one ordinary backward
    return SplitBackward(list(roots), list(grads), list(inputs), boundaries, leaving, reaches, outside)


def library_function(cls: type) -> bool:
    """Whether an ``autograd.Function`` class is the one torch.library generates for a custom op's
    ``register_autograd`` (recognised by the module torch makes it in)."""
    return getattr(cls, "__module__", "") == "torch._library.autograd"


def library_op(node: Node) -> bool:
    """Whether ``node`` is the backward of a ``torch.library`` custom op (``register_autograd``): the op's
    registered formula over its saved values and incoming gradient, which runs once in either pass (at a
    boundary, in pass 1, and pass 2 resumes below it). Recognised by the module torch generates its Function
    in; any other Function counts as custom (it may run its own backward, as a reentrant checkpoint does)."""
    cls = getattr(node, "_forward_cls", None)
    return cls is not None and library_function(cls)


def held_between_passes(joint: Any) -> int:
    """Bytes a backward split in two passes holds between them beyond what one backward holds, counted on
    the stage's traced forward and backward (``graph/joint.Joint``): the gradients the input pass makes
    and the weights' pass reads (``addmm``'s incoming gradient per linear layer, a layer norm's), each
    storage once. Activations are not counted: the forward's, held until the backward in either case."""
    graph: fx.Graph = joint.graph.graph
    output = next(n for n in graph.nodes if n.op == "output")
    results = [r for r in output.args[0] if isinstance(r, fx.Node)]  # type: ignore[union-attr]
    n_values, n_grads = joint.n_values, len(joint.grad_of)
    weights, inputs = results[n_values : n_values + n_grads], results[n_values + n_grads :]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    arriving = placeholders[len(placeholders) - joint.n_grads_in :] if joint.n_grads_in else []

    def closure(roots: list[fx.Node], step: Any) -> set[fx.Node]:
        found, todo = set(roots), list(roots)
        while todo:
            for n in step(todo.pop()):
                if n not in found:
                    found.add(n)
                    todo.append(n)
        return found

    input_side = closure(inputs, lambda n: n.all_input_nodes)
    weight_side = closure(weights, lambda n: n.all_input_nodes) - input_side
    gradients = closure(arriving, lambda n: n.users) - set(arriving)  # the backward's values, not saved ones

    def read_by_weights(n: fx.Node) -> bool:  # directly, or by a multi-output op (layer norm's backward)
        # one of whose items (a getitem) the weights' pass reads
        return any(
            u in weight_side or (not isinstance(u.meta.get("val"), torch.Tensor) and weight_side & set(u.users))
            for u in n.users
        )

    held: dict[fx.Node, int] = {}
    for n in input_side & gradients:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or not read_by_weights(n):
            continue
        base = n
        while getattr(base.target, "is_view", False) and base.args and isinstance(base.args[0], fx.Node):
            base = base.args[0]  # a view holds its base's storage
        if base in gradients:
            held[base] = val.untyped_storage().nbytes() if base is n else _nbytes(base)
    return sum(held.values())


def _nbytes(n: fx.Node) -> int:
    val = n.meta.get("val")
    return val.untyped_storage().nbytes() if isinstance(val, torch.Tensor) else 0


def _got(into: dict[Node, tuple[Any, ...]], node: Node) -> Any:
    """A prehook recording the gradients ``node`` receives."""

    def hook(grad_outputs: tuple[Any, ...]) -> None:
        into[node] = tuple(grad_outputs)

    return hook


def _gave(into: dict[Node, tuple[Any, ...]], node: Node, leaving: list[int]) -> Any:
    """A hook recording the gradients ``node`` computed for its edges in ``leaving`` (None for the others:
    pass 1 has used them, and holding them to pass 2 would keep an activation-sized tensor alive)."""
    keep = set(leaving)

    def hook(grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]) -> None:
        into[node] = tuple(g if i in keep else None for i, g in enumerate(grad_inputs))

    return hook


def _accumulator(t: torch.Tensor) -> Node | None:
    """A leaf's gradient accumulator (made on demand by a throwaway view, as autograd makes it lazily)."""
    if t.grad_fn is not None or not t.requires_grad:
        return None
    fn = t.view_as(t).grad_fn
    return None if fn is None else fn.next_functions[0][0]
