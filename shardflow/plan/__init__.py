"""Plans as values: ``ParallelPlan`` (record.py), what makes one runnable (check.py), its JSON (schema.py) and
its options as attributes of a compiled module (knobs.py); no process groups, no model."""

from shardflow.plan.check import PlanError, check, check_model, layout_misfit
from shardflow.plan.record import (
    SCHEDULES,
    STRATEGIES,
    Execution,
    Frozen,
    MeshSpec,
    ParallelPlan,
    ParamPlan,
    PipelinePlan,
    TablePlan,
    default_updates,
)

__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "Execution",
    "Frozen",
    "MeshSpec",
    "ParallelPlan",
    "ParamPlan",
    "PipelinePlan",
    "TablePlan",
    "PlanError",
    "check",
    "check_model",
    "default_updates",
    "layout_misfit",
]
