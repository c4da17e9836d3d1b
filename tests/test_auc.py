"""``auc`` is scikit-learn's ``roc_auc_score`` to float64 precision, ties included, and refuses bad input."""

from __future__ import annotations

import pytest
import torch
from sklearn import metrics as sklearn_metrics  # a dev dependency: the oracle

from shardflow.train.metrics import auc


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(1000, generator=gen) < 0.3).float()
    noisy = y + torch.randn(1000, generator=gen)
    return [
        ("perfect", torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1])),
        ("inverted", torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([0, 0, 1, 1])),
        ("all tied", torch.full((6,), 0.5), torch.tensor([0, 1, 0, 1, 1, 0])),
        ("some ties", torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.1]), torch.tensor([0, 0, 1, 1, 1, 0, 1])),
        ("noisy", noisy, y),
        ("rounded (many ties)", noisy.round(decimals=1), y),
        ("logits, bool labels", torch.randn(500, generator=gen) * 5, torch.rand(500, generator=gen) < 0.1),
    ]


@pytest.mark.parametrize("name,scores,labels", _cases(), ids=[c[0] for c in _cases()])
def test_auc_matches_sklearn(name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    expected = sklearn_metrics.roc_auc_score(labels.numpy().astype(int), scores.numpy())
    assert auc(scores, labels) == pytest.approx(expected, rel=0, abs=1e-12)


def test_auc_takes_sequences_and_column_shapes() -> None:
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc(torch.tensor([[0.1], [0.4], [0.35], [0.8]]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)


def test_auc_errors_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        auc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="labels of 0 or 1, got \\[2.0\\]"):
        auc([0.1, 0.2, 0.3], [0, 1, 2])
    with pytest.raises(ValueError, match="needs both classes, got 0 positives and 3 negatives"):
        auc([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(ValueError, match="1 NaN scores"):
        auc([0.1, float("nan"), 0.3], [0, 1, 0])
