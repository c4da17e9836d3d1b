"""Reference models (plain PyTorch, each ``model(*inputs)`` returns the loss) and download-free data for them.

The oracle for every parallel run: the same model trained on one device with plain PyTorch.
"""

from shardflow.models.cnn import CNNConfig, SmallCNN
from shardflow.models.data import CHAR_VOCAB_SIZE, batches, char_corpus, random_classification
from shardflow.models.gpt import GPT, GPTConfig
from shardflow.models.mlp import MLP, MLPConfig

__all__ = [
    "CHAR_VOCAB_SIZE",
    "CNNConfig",
    "GPT",
    "GPTConfig",
    "MLP",
    "MLPConfig",
    "SmallCNN",
    "batches",
    "char_corpus",
    "random_classification",
]
