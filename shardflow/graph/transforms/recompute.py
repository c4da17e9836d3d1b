"""Recompute: which modules' activations are dropped after forward and recomputed in backward.

``True`` picks every block (the children of the longest ModuleList/Sequential, where pipelines cut too);
a list of globs picks modules by name, each glob checked on its own. ``"auto"`` is a search over this
entry by predicted memory, which needs programs: ``sf.compile`` runs it (graph/compile.py).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from shardflow.plan import ParallelPlan, PlanError
from shardflow.runtime.stages import blocks


def apply_recompute(plan: ParallelPlan, model: nn.Module, recompute: bool | Sequence[str]) -> ParallelPlan:
    """``plan`` recomputing the modules ``recompute`` names (False: none)."""
    return plan.replace(recompute=tuple(recompute_targets(model, recompute)) if recompute else ())


def recompute_targets(model: nn.Module, recompute: bool | str | Sequence[str]) -> list[str]:
    """``True``: every block (children of the longest ModuleList/Sequential); or module-name globs."""
    names = [n for n, _ in model.named_modules() if n]
    if recompute is True:
        targets = blocks(model)
        if not targets:
            raise PlanError(f"recompute=True found no ModuleList or Sequential in {type(model).__name__}: name modules")
        return targets
    if isinstance(recompute, (str, bool)) or not all(isinstance(g, str) for g in recompute):
        raise PlanError(f"recompute must be True, 'auto' or a list of module-name globs, got {recompute!r}")
    globs = list(recompute)
    targets = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not targets:
        raise PlanError(f"recompute globs {globs} match no module of {type(model).__name__} (e.g. {names[:4]})")
    # each glob on its own, as hints are checked: a misspelt one beside others that match would go unnoticed
    for g in globs:
        if not any(fnmatch.fnmatchcase(n, g) for n in names):
            raise PlanError(f"recompute glob {g!r} matches no module of {type(model).__name__} (e.g. {names[:4]})")
    return targets
