"""``shardflow train``: train a model from a TOML config, with snapshots, resume and logging: the built-in GPT on
text, the built-in DLRM on click logs (its tables sparse, AUC on held-out clicks), or a model and data of one's own."""

from shardflow.train.config import TrainConfig, load_config
from shardflow.train.loop import train

__all__ = ["TrainConfig", "load_config", "train"]
