"""Per-op layout rules (pure): which SBP signatures each ATen op accepts, and how to pick one."""

from shardflow.ops import rules as _rules  # noqa: F401  (registers every rule module)
from shardflow.ops.registry import (
    LOCALS,
    PREPARED,
    RULES,
    WORKSPACE,
    LocalContext,
    OpCall,
    Sig,
    TensorMeta,
    local,
    prepared,
    rule,
    workspace,
    writes_arg,
)
from shardflow.ops.select import NoRuleError, choose

__all__ = [
    "LOCALS",
    "PREPARED",
    "RULES",
    "WORKSPACE",
    "LocalContext",
    "NoRuleError",
    "OpCall",
    "Sig",
    "TensorMeta",
    "choose",
    "local",
    "prepared",
    "workspace",
    "rule",
    "writes_arg",
]
