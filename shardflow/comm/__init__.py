"""Process groups per mesh axis slice and collectives on them (torch.distributed: gloo / NCCL)."""

from shardflow.comm.groups import GroupHandle, group_for
from shardflow.comm.init import DEFAULT_TIMEOUT, init, world

__all__ = ["DEFAULT_TIMEOUT", "GroupHandle", "group_for", "init", "world"]
