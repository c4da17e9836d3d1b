"""A model and a dataset of one's own, trained by ``shardflow train examples/spirals.toml`` (run from the
repository's root: the config names them by import path, ``examples.spirals:...``).

Points on three interleaved spiral arms, labelled by arm: a small classification problem that a linear model
cannot solve and a small network learns in a few hundred steps. Nothing here knows about shardflow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


class SpiralNet(nn.Module):
    """``forward(x, y)``: the loss of classifying points ``x`` (batch, 2) as arms ``y``; ``predict(x)``: logits."""

    def __init__(self, hidden: int = 64, arms: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(hidden, arms)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.predict(x), y)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Spirals(Dataset):
    """``n`` points on ``arms`` spiral arms with Gaussian noise, the same for the same ``seed``."""

    def __init__(self, n: int, arms: int, noise: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, arms, (n,), generator=gen)
        radius = torch.rand(n, generator=gen)
        angle = self.labels * (2 * math.pi / arms) + 3 * math.pi * radius
        points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        self.points = points + noise * torch.randn(n, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i], self.labels[i]


def build(hidden: int = 64, arms: int = 3) -> nn.Module:
    """The model, as ``[model] function`` names it; ``[model.args]`` are these keywords."""
    return SpiralNet(hidden, arms)


def points(split: str, n: int = 3000, arms: int = 3, noise: float = 0.03) -> Dataset:
    """The dataset of ``split`` ("train" or "validation": other points of the same arms)."""
    return Spirals(n if split == "train" else n // 5, arms, noise, seed=0 if split == "train" else 1)
