"""GlobalTensor for eager use: a local shard plus mesh, nd-SBP and global shape."""

from shardflow.tensor import dispatch as _dispatch  # noqa: F401  (registers the eager op rules)
from shardflow.tensor.api import distribute, from_local
from shardflow.tensor.global_tensor import GlobalTensor

__all__ = ["GlobalTensor", "distribute", "from_local"]
