"""Evaluation during ``shardflow train``: the loss of the validation batches by ``pm.evaluate`` (forward only,
eval mode, every rank the same value) and, where the config names one, a metric of a model method's outputs.

A metric named by import path, ``metric(outputs, batches) -> float``, sees every validation batch's outputs at
once, as AUC needs (a mean of per-batch AUCs is not the AUC). The built-in accuracy needs only counts, so it
keeps counts, not the outputs (an LM's logits over many batches would be batch x seq x vocab each); the built-in
AUC keeps one score and one label a sample, and ranks them all at the end (``train/metrics.py``, exact).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardflow.runtime.runner import Runner
from shardflow.train.config import TrainConfig
from shardflow.train.imports import resolve
from shardflow.train.metrics import auc

Batch = tuple[Any, ...]


class Metric(abc.ABC):
    """Fed each validation batch's outputs in turn, then asked for its value."""

    @abc.abstractmethod
    def update(self, output: Any, batch: Batch) -> None: ...

    @abc.abstractmethod
    def compute(self) -> float: ...


class Accuracy(Metric):
    """The share of samples (or tokens) whose largest output is the label, each batch's last element."""

    def __init__(self) -> None:
        self.right = self.total = 0

    def update(self, output: Any, batch: Batch) -> None:
        labels = batch[-1]
        if output.shape[:-1] != labels.shape:
            raise ValueError(
                f"accuracy compares the argmax of outputs {tuple(output.shape)} over their last dim with labels "
                f"{tuple(labels.shape)} (the batch's last element): metric_method must return scores per class"
            )
        self.right += int((output.argmax(-1) == labels).sum())
        self.total += labels.numel()

    def compute(self) -> float:
        return self.right / self.total


class AUC(Metric):
    """ROC AUC of click scores (one a sample: probabilities or logits) against the 0/1 labels, each batch's last
    element, over every validation batch at once."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, output: Any, batch: Batch) -> None:
        labels = batch[-1]
        if not isinstance(output, torch.Tensor) or output.numel() != labels.numel():
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(
                f"auc ranks one score a sample: metric_method returned {shape} for {labels.numel()} labels (the "
                "batch's last element); name a method that returns click scores, like DLRM's predict"
            )
        self.scores.append(output.detach().reshape(-1).float())
        self.labels.append(labels.reshape(-1))

    def compute(self) -> float:
        return auc(torch.cat(self.scores), torch.cat(self.labels))


class AllOutputs(Metric):
    """A user's ``metric(outputs, batches)``, called once with everything."""

    def __init__(self, fn: Callable[[list[Any], list[Batch]], float]) -> None:
        self.fn = fn
        self.outputs: list[Any] = []
        self.batches: list[Batch] = []

    def update(self, output: Any, batch: Batch) -> None:
        self.outputs.append(output)
        self.batches.append(batch)

    def compute(self) -> float:
        return float(self.fn(self.outputs, self.batches))


def metric_of(cfg: TrainConfig) -> Callable[[], Metric] | None:
    """A maker of the metric the config names, a fresh one per evaluation (None: no metric)."""
    if not cfg.metric:
        return None
    if cfg.metric == "accuracy":
        return Accuracy
    if cfg.metric == "auc":
        return AUC
    if ":" not in cfg.metric:
        raise ValueError(
            f"metric = {cfg.metric!r}: 'accuracy' and 'auc' are built in, or name 'package.module:function'"
        )
    fn = resolve(cfg.metric, "metric")
    if not callable(fn):
        raise ValueError(f"metric = {cfg.metric!r} is not a function")
    return lambda: AllOutputs(fn)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: the mean validation loss, and the metric's value (None: no metric named)."""

    loss: float
    metric: float | None

    def summary(self, name: str) -> str:
        """``loss 1.2345, accuracy 0.8125``."""
        named = f", {name.rpartition(':')[2]} {self.metric:.4f}" if self.metric is not None else ""
        return f"loss {self.loss:.4f}{named}"


def validate(pm: Runner, batches: Sequence[Batch], metric: Callable[[], Metric] | None, method: str) -> Evaluation:
    """The validation loss over ``batches`` (their mean: the batches are the same size) and the metric of
    ``method``'s outputs (collective: every rank of the job calls it)."""
    if not pm.inside:  # no part of the model here: nothing to evaluate (as a step returns nan)
        return Evaluation(math.nan, None)
    measured = metric() if metric is not None else None
    losses = []
    for batch in batches:
        loss = pm.evaluate(*batch)
        losses.append(float(loss))
        if measured is not None:
            # a method other than forward predicts: it takes the batch less its labels (its last element)
            out = loss if method == "forward" else pm.evaluate(*batch[:-1], method=method)
            measured.update(out, batch)
    return Evaluation(sum(losses) / len(losses), measured.compute() if measured is not None else None)
