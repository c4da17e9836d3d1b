"""Plans as values: ``ParallelPlan`` (record.py) and its JSON (schema.py); no process groups, no model."""

from shardflow.plan.record import (
    Execution,
    Frozen,
    MeshSpec,
    ParallelPlan,
    ParamPlan,
    PipelinePlan,
    PlanError,
    check,
    check_model,
    default_updates,
)

__all__ = [
    "Execution",
    "Frozen",
    "MeshSpec",
    "ParallelPlan",
    "ParamPlan",
    "PipelinePlan",
    "PlanError",
    "check",
    "check_model",
    "default_updates",
]
