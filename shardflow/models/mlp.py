"""A multilayer perceptron classifier: the smallest reference model for data and tensor parallelism.

One ``nn.Sequential`` of Linear and activation layers, so parameters are ``net.0.weight``, ``net.2.weight``,
... and every Linear is a plain matmul a tensor-parallel plan can split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MLPConfig:
    """Widths of ``in_features -> hidden_sizes... -> num_classes``."""

    in_features: int
    """Width of one input row; inputs are (batch, in_features)."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Width of each hidden layer, in order; ``()`` gives a linear classifier."""
    num_classes: int
    """Number of classes (width of the last layer)."""
    activation: Literal["gelu", "relu"] = "gelu"
    """Nonlinearity after each hidden layer."""
    bias: bool = True
    """Biases in every Linear."""

    def __post_init__(self) -> None:
        for name in ("in_features", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLPConfig.{name} must be a positive int, got {value!r}")
        sizes = self.hidden_sizes
        if not isinstance(sizes, tuple) or any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in sizes):
            raise ValueError(f"MLPConfig.hidden_sizes must be a tuple of positive ints, got {sizes!r}")
        if self.activation not in ("gelu", "relu"):
            raise ValueError(f"MLPConfig.activation must be 'gelu' or 'relu', got {self.activation!r}")


class MLP(nn.Module):
    """``model(x, y)`` is the mean cross-entropy of classifying rows of ``x`` (batch, in_features) as ``y``."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = (cfg.in_features, *cfg.hidden_sizes)
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Linear(width_in, width_out, bias=cfg.bias),
                nn.GELU() if cfg.activation == "gelu" else nn.ReLU(),
            ]
        layers.append(nn.Linear(widths[-1], cfg.num_classes, bias=cfg.bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, num_classes) for rows of ``x``: what accuracy is measured on."""
        return self.net(x)
