"""``shardflow train``: train a model from a TOML config, with snapshots, resume and logging."""

from shardflow.train.config import TrainConfig, load_config
from shardflow.train.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
