"""A small convolutional classifier with BatchNorm: the reference model with buffers (running statistics).

In training mode BatchNorm normalises with the statistics of the batch it sees, so a data-parallel run
equals the serial one only if those statistics are taken over the global batch (synchronised BatchNorm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class CNNConfig:
    """Shape of ``SmallCNN``: inputs are (batch, in_channels, image_size, image_size)."""

    in_channels: int = 3
    """Channels of the input images."""
    image_size: int = 16
    """Height and width of the (square) input images; a multiple of 4 (two 2×2 max-pools)."""
    channels: tuple[int, int] = (16, 32)
    """Output channels of the first and second convolution."""
    num_classes: int = 10
    """Number of classes."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CNNConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % 4 != 0:
            raise ValueError(
                f"CNNConfig.image_size={self.image_size} must be a multiple of 4 (the two 2x2 max-pools halve it twice)"
            )
        ch = self.channels
        if not isinstance(ch, tuple) or len(ch) != 2 or any(not isinstance(c, int) or c < 1 for c in ch):
            raise ValueError(f"CNNConfig.channels must be a tuple of two positive ints, got {ch!r}")


class SmallCNN(nn.Module):
    """Two ``conv3x3 -> BatchNorm -> ReLU -> maxpool2`` stages and a Linear head; ``model(x, y)`` is the loss."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        c1, c2 = cfg.channels
        # The convolutions have no bias: the BatchNorm right after each subtracts any constant offset.
        self.conv1 = nn.Conv2d(cfg.in_channels, c1, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(c2 * (cfg.image_size // 4) ** 2, cfg.num_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.predict(x), y)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, num_classes) for images ``x``: what accuracy is measured on."""
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        return self.head(torch.flatten(x, 1))
