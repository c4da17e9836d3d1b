"""Evaluation metrics computed exactly on one process from gathered scores (click models report ROC AUC).

AUC is the Mann-Whitney U statistic with average ranks for ties, in float64: exact, unlike binned AUCs
(Keras' 200 thresholds), so two runs of a model can be compared to the last digit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def auc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[float]) -> float:
    """The area under the ROC curve of ``scores`` (higher means positive) against 0/1 ``labels``.

    Equals the probability that a random positive scores above a random negative, ties counting one half
    (scikit-learn's ``roc_auc_score``). Any shapes with the same number of elements; scores may be logits or
    probabilities alike, since only their order matters.
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(labels).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if s.numel() != y.numel():
        raise ValueError(f"auc got {s.numel()} scores but {y.numel()} labels: pass one label per score")
    if torch.isnan(s).any():
        raise ValueError(f"auc got {int(torch.isnan(s).sum())} NaN scores: NaNs have no order, drop or fix them")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(
            f"auc needs labels of 0 or 1, got {y[bad][:5].tolist()} among them: threshold or map them to 0/1"
        )
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"auc needs both classes, got {n_pos} positives and {n_neg} negatives: AUC is undefined for one "
            "class, so evaluate on a larger or stratified sample"
        )
    # average ranks (1-based): a group of tied scores shares the mean of the ranks it spans
    values, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum = mean_rank[inverse][y == 1].sum().item()
    u = rank_sum - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
