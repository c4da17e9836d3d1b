"""Boxing: plan and run the conversion of a tensor between any two layouts, on one mesh or across meshes."""

from shardflow.boxing.cost import DEFAULT_COST, CostModel
from shardflow.boxing.plan import Plan, Step, Transfer, estimate_seconds, plan_boxing
from shardflow.boxing.run import (
    bound_plan,
    can_start,
    empty_local,
    finish_plan,
    reduce_scatter_args,
    run_plan,
    start_plan,
)

__all__ = [
    "DEFAULT_COST",
    "CostModel",
    "Plan",
    "Step",
    "Transfer",
    "bound_plan",
    "can_start",
    "empty_local",
    "finish_plan",
    "estimate_seconds",
    "plan_boxing",
    "reduce_scatter_args",
    "run_plan",
    "start_plan",
]
