"""Per-op layout rules (pure): which SBP signatures each ATen op accepts, and how to pick one."""

from shardflow.ops import rules as _rules  # noqa: F401  (registers every rule module)
from shardflow.ops.registry import (
    INSIDE,
    LOCALS,
    PREPARED,
    RULES,
    WORKSPACE,
    InnerBox,
    Inside,
    LocalContext,
    OpCall,
    Sig,
    TensorMeta,
    inside,
    local,
    prepared,
    rule,
    workspace,
    writes_any,
    writes_arg,
)
from shardflow.ops.select import NoRuleError, choose

__all__ = [
    "INSIDE",
    "LOCALS",
    "PREPARED",
    "RULES",
    "WORKSPACE",
    "InnerBox",
    "Inside",
    "LocalContext",
    "NoRuleError",
    "OpCall",
    "Sig",
    "TensorMeta",
    "choose",
    "inside",
    "local",
    "prepared",
    "workspace",
    "rule",
    "writes_any",
    "writes_arg",
]
