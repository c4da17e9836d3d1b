"""Evaluation during ``shardflow train``: the loss of the validation batches by ``pm.evaluate`` (forward only,
eval mode, every rank the same value) and, where the config names one, a metric of a model method's outputs.

A metric sees every validation batch's outputs at once, as AUC needs (a mean of per-batch AUCs is not the
AUC); accuracy is built in, any other is a function ``metric(outputs, batches) -> float`` named by import path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shardflow.runtime.runner import Runner
from shardflow.train.config import TrainConfig
from shardflow.train.imports import resolve

Metric = Callable[[list[Any], list[tuple[Any, ...]]], float]


def accuracy(outputs: list[Any], batches: list[tuple[Any, ...]]) -> float:
    """The share of samples (or tokens) whose largest output is the label, each batch's last element."""
    right = total = 0
    for out, batch in zip(outputs, batches):
        labels = batch[-1]
        right += int((out.argmax(-1) == labels).sum())
        total += labels.numel()
    return right / total


BUILTIN: dict[str, Metric] = {"accuracy": accuracy}


@dataclass(frozen=True)
class Evaluation:
    """One evaluation: the mean validation loss, and the metric's value (None: no metric named)."""

    loss: float
    metric: float | None


def metric_of(cfg: TrainConfig) -> Metric | None:
    """The metric the config names (None: none)."""
    if not cfg.metric:
        return None
    if cfg.metric in BUILTIN:
        return BUILTIN[cfg.metric]
    if ":" not in cfg.metric:
        raise ValueError(f"metric = {cfg.metric!r}: built in are {sorted(BUILTIN)}, or name 'package.module:function'")
    fn = resolve(cfg.metric, "metric")
    if not callable(fn):
        raise ValueError(f"metric = {cfg.metric!r} is not a function")
    return fn  # type: ignore[no-any-return]


def evaluate(pm: Runner, batches: Sequence[tuple[Any, ...]], metric: Metric | None, method: str) -> Evaluation:
    """The validation loss over ``batches`` (their mean: the batches are the same size) and ``metric`` of
    ``method``'s outputs (collective: every rank of the job calls it)."""
    losses = [float(pm.evaluate(*batch)) for batch in batches]
    value = None
    if metric is not None:
        # a method other than forward predicts: it takes the batch less its labels (its last element)
        outputs = [pm.evaluate(*(batch if method == "forward" else batch[:-1]), method=method) for batch in batches]
        value = float(metric(outputs, list(batches)))
    return Evaluation(sum(losses) / len(losses), value)


def described(e: Evaluation, name: str) -> str:
    """``loss 1.2345, accuracy 0.8125``."""
    return f"loss {e.loss:.4f}" + (f", {name.rpartition(':')[2]} {e.metric:.4f}" if e.metric is not None else "")
