"""Reference models (plain PyTorch, each ``model(*inputs)`` returns the loss) and download-free data for them.

The oracle for every parallel run: the same model trained on one device with plain PyTorch.
"""

from shardflow.models.cnn import CNNConfig, SmallCNN
from shardflow.models.criteo import CriteoShape, criteo_batch, dlrm_inputs
from shardflow.models.data import CHAR_VOCAB_SIZE, batches, char_corpus, random_classification
from shardflow.models.dlrm import DLRM, DLRMConfig
from shardflow.models.gpt import GPT, GPTConfig
from shardflow.models.mlp import MLP, MLPConfig

__all__ = [
    "CHAR_VOCAB_SIZE",
    "CNNConfig",
    "CriteoShape",
    "DLRM",
    "DLRMConfig",
    "GPT",
    "GPTConfig",
    "MLP",
    "MLPConfig",
    "SmallCNN",
    "batches",
    "char_corpus",
    "criteo_batch",
    "dlrm_inputs",
    "random_classification",
]
