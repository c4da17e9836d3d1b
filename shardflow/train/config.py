"""Training configuration: dataclasses, filled from a TOML file, then from ``--key value`` flags.

Why dataclasses and ``tomllib``: both are standard library (before Python 3.11, ``tomli``, the same
parser); the dataclass is the schema (field names, types, defaults, docs), and an unknown key or a value
of the wrong type is an error that names the key, instead of a silent default. Nested tables map to
nested dataclasses (``[model]``), and a flag names a nested key with a dot (``--model.n_layer 4``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shardflow.plan import ParallelPlan, PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    """The GPT trained on Python's own standard-library source, one token per byte."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32


@dataclass
class TrainConfig:
    """Everything one training run needs; see examples/gpt.toml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: list[int] = field(default_factory=lambda: [2])
    """Mesh shape; the job has as many ranks as the product."""
    axes: list[str] = field(default_factory=lambda: ["dp"])
    """Mesh axis names ("dp", "tp", "pp"); a "pp" axis pipelines the model (stages data parallel inside)."""
    strategy: str = "dp"
    zero: int = 0
    micro_batches: int = 4
    """Micro-batches per step when the mesh has a "pp" axis."""
    schedule: str = "1f1b"
    """Pipeline schedule when the mesh has a "pp" axis: "1f1b" or "gpipe"."""
    batch_size: int = 8
    """Sequences per step (the global batch)."""
    steps: int = 20
    """Train until this many steps are done (a resumed run counts the steps before it)."""
    lr: float = 3e-3
    max_grad_norm: float = 1.0
    seed: int = 0
    """Seeds the model's initial weights and the data order (batch i is a function of seed and i)."""
    run_dir: str = "runs/gpt"
    """Snapshots go to run_dir/stepNNNNNNNN; shardflow prunes only those."""
    snapshot_every: int = 10
    keep_last: int = 2
    """Snapshots kept in run_dir (older ones are deleted once a newer one is complete)."""
    resume: str = "auto"
    """"auto": continue from the newest complete snapshot in run_dir, if any; "never"; or a snapshot path."""
    log_every: int = 1
    memory_limit: str = ""
    """Refuse a plan that would not fit, e.g. "4GiB" (empty: no limit)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device, to report MFU (0: report FLOP/s only)."""
    plan: str = ""
    """A plan written by ``shardflow plan CONFIG --save FILE`` (JSON) to train with: it wins over mesh, axes,
    strategy, zero, micro_batches, schedule and max_grad_norm, and its mesh sets the job's ranks (empty: the
    plan is built from those keys)."""
    save: str = ""
    """``shardflow plan`` only: write the plan there as JSON (whole, then moved into place)."""
    trace: str = ""
    """Write the timeline of the run's last step here (Chrome/Perfetto JSON, every rank's tracks) and draw it
    as a PNG beside it (empty: no trace)."""


def _convert(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a table, got {value!r}")
        return _fill(kind, value, key + ".")
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        return [_convert(v, item, key) for v in value]
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind is int and isinstance(value, float):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r} must be {kind.__name__}, got {value!r}") from None


def _fill(cls: Any, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys: {sorted(prefix + n for n in names)}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in table.items()})


def read_plan(path: str) -> ParallelPlan:
    """The plan saved at ``path``; a missing or malformed file is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(
            f"plan {path!r} cannot be read ({e.strerror}); write one with: shardflow plan CONFIG --save {path}"
        ) from None
    try:
        return ParallelPlan.from_json(text)
    except PlanError as e:
        raise PlanError(f"plan {path!r}: {e}") from None


def job_ranks(cfg: TrainConfig) -> int:
    """How many ranks the job needs: enough for the plan's mesh (its highest rank + 1), or the config's."""
    return max(read_plan(cfg.plan).mesh.ranks) + 1 if cfg.plan else math.prod(cfg.mesh)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from the TOML file at ``path`` (None: defaults) and ``--key value`` pairs."""
    table: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    items = list(overrides)
    if len(items) % 2:
        raise ValueError(f"flags come in pairs '--key value'; {items[-1]!r} has no value")
    for flag, value in zip(items[::2], items[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected a flag '--key', got {flag!r}")
        *parents, leaf = flag[2:].replace("-", "_").split(".")
        node = table
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = _fill(TrainConfig, table)
    if len(cfg.mesh) != len(cfg.axes):
        raise ValueError(f"mesh {cfg.mesh} and axes {cfg.axes} must have the same length")
    if not cfg.plan and "pp" in cfg.axes and (cfg.strategy != "dp" or cfg.zero or "tp" in cfg.axes):
        raise ValueError(
            f"a 'pp' axis pipelines the model with data parallel stages: use strategy 'dp', zero 0 and no 'tp' "
            f"axis (got strategy {cfg.strategy!r}, zero {cfg.zero}, axes {cfg.axes})"
        )
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.snapshot_every < 1 or cfg.keep_last < 1:
        raise ValueError("steps, batch_size, snapshot_every and keep_last must be positive")
    return cfg
