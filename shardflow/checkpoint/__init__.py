"""Sharded, resharding checkpoints: safetensors shards plus a JSON index; no pickle anywhere."""

from shardflow.checkpoint.consolidate import consolidate
from shardflow.checkpoint.store import FORMAT_VERSION, load, save

__all__ = ["FORMAT_VERSION", "consolidate", "load", "save"]
