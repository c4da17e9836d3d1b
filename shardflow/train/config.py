"""Training configuration: dataclasses, filled from a TOML file, then from ``--key value`` flags.

Why dataclasses and ``tomllib``: both are standard library (before Python 3.11, ``tomli``, the same
parser); the dataclass is the schema (field names, types, defaults, docs), and an unknown key or a value
of the wrong type is an error that names the key, instead of a silent default. Nested tables map to
nested dataclasses (``[model]``), and a flag names a nested key with a dot (``--model.args.n_layer 4``). The
``args`` tables are free (their keys belong to the model or data they build): those are checked where they are
used, against the built-in's dataclass, the Hugging Face config class or the function's signature.
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
from shardflow.plan.record import TABLE_PLACEMENTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class ModelConfig:
    """What to train: one of ``builtin``, ``hf`` or ``function`` (none given: the built-in GPT), built with
    ``args`` after seeding torch with the run's seed. The module's ``forward(*batch)`` returns the loss."""

    builtin: str = ""
    """A model shardflow ships: "gpt" (``args``: the keys of ``GPTArgs``) or "dlrm" (``DLRMArgs``; its sparse
    tables follow ``[embeddings]``, its table sizes and dense width the click data's)."""
    hf: str = ""
    """A Hugging Face ``transformers`` class, e.g. "LlamaForCausalLM" (a ``*ForCausalLM`` / ``*LMHeadModel``
    trains on next tokens, a ``*ForSequenceClassification`` on labels), built from its config class with
    ``args`` (random weights, nothing downloaded), or loaded from ``weights``."""
    function: str = ""
    """``package.module:function`` (imported like ``python -m`` does: the working directory first) called with
    ``args``, returning an ``nn.Module`` whose forward returns the loss."""
    weights: str = ""
    """``hf`` only: a local directory of weights (``save_pretrained``'s) to start from; ``args`` override its
    config. Empty: random weights from the seed."""
    args: dict[str, Any] = field(default_factory=dict)
    """Arguments of the model: ``GPTArgs``' or ``DLRMArgs``' keys, the ``hf`` config class's, or the function's
    keywords."""


@dataclass
class GPTArgs:
    """``[model.args]`` of the built-in GPT, which reads bytes of Python's own standard-library source."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32
    """Context length: the built-in text's sequences are this long unless ``data.args.seq_len`` says."""


@dataclass
class DLRMArgs:
    """``[model.args]`` of the built-in DLRM (``models/dlrm.py``'s ``DLRMConfig`` less what the data fixes: its
    ``table_rows`` and ``dense_features`` are the click data's, and its tables are always sparse)."""

    dim: int = 16
    """Width of every embedding row and of the bottom MLP's output."""
    bottom: list[int] = field(default_factory=lambda: [64, 16])
    """Widths of the bottom MLP's layers over the dense features; the last must be ``dim``."""
    top: list[int] = field(default_factory=lambda: [64, 32])
    """Widths of the top MLP's hidden layers (a final layer to one click logit follows)."""
    mode: str = "sum"
    """How a table pools a sample's bag of rows: "sum", "mean" or "max" ("mean" keeps multi-hot bags' sums
    small at any embedding learning rate: ``nn.EmbeddingBag`` draws rows from N(0, 1))."""


@dataclass
class EmbeddingsConfig:
    """``[embeddings]``: which embedding modules become sharded sparse tables (``sf.Embeddings``), where they
    live and how they learn; the dense parameters keep ``lr`` and AdamW. The built-in DLRM's tables always
    are (``tables`` defaults to all of them); another model's only where ``tables`` names them."""

    tables: list[str] = field(default_factory=list)
    """Globs over module names, e.g. ["tables.*"] (empty: no sparse tables; the built-in DLRM's: all)."""
    placement: dict[str, Any] = field(default_factory=dict)
    """Glob -> "row", "column", "table" or "replicated" (the first glob that matches a table wins); a table
    no glob matches is placed by the planner (by its bytes and expected traffic)."""
    optimizer: str = "adagrad"
    """The tables' fused sparse optimizer: "sgd", "adagrad", "adam" (``SparseAdam``) or "rowwise" (FBGEMM's
    row-wise Adagrad, one accumulator per row)."""
    lr: float = 0.05
    """The tables' learning rate."""
    seed: int = 0
    """Seeds the rows of tables made on the meta device (``sf.embedding.init_rows``): the built-in DLRM's, so
    that each rank draws only the rows it holds, whatever the tables' size."""


EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "adam", "rowwise")
CLICK_DATA = ("criteo", "movielens")  # the built-in data whose batches are DLRM's inputs


@dataclass
class DataConfig:
    """The batches: one of ``builtin`` or ``function`` (none given: the built-in text). Batch ``i`` of the
    training split is a function of the seed and ``i`` only, so a resumed run sees the same batches."""

    builtin: str = ""
    """Data shardflow ships: "text" (next-byte windows of Python's standard-library source; ``args``:
    ``seq_len``, default the model's context length; the last tenth is the validation split), or DLRM's click
    logs (``train/clicks.py``): "criteo" (a synthetic Criteo-shaped log; ``args``: ``CriteoArgs``' keys; the
    built-in DLRM's default) and "movielens" (MovieLens-100k ratings as clicks; ``MovieLensArgs``' keys)."""
    function: str = ""
    """``package.module:function`` called as ``function(split, **args)`` with split "train" or "validation",
    returning a map-style dataset (``__len__``, ``__getitem__``: shuffled per epoch from the seed) or an
    iterable one (read in order, skipped ahead on resume)."""
    collate: str = ""
    """``package.module:function`` turning a list of samples into the model's inputs (a tuple, or one tensor);
    empty: torch's ``default_collate``."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the data function (of "text": ``seq_len``; of "criteo" and "movielens": their
    dataclasses' keys)."""


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
    """Samples (sequences, rows) per step: the global batch, split over the data-parallel ranks."""
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
    """Peak dense TFLOP/s of one device, for MFU (0: a GPU's datasheet figure, or a CPU's measured by a matmul
    probe once and cached)."""
    plan: str = ""
    """A plan written by ``shardflow plan CONFIG --save FILE`` (JSON) to train with: it wins over mesh, axes,
    strategy, zero, micro_batches, schedule and max_grad_norm, and its mesh sets the job's ranks (empty: the
    plan is built from those keys)."""
    save: str = ""
    """``shardflow plan`` only: write the plan there as JSON (whole, then moved into place)."""
    trace: str = ""
    """Write the timeline of the run's last step here (Chrome/Perfetto JSON, every rank's tracks) and draw it
    as a PNG beside it (empty: no trace)."""
    data: DataConfig = field(default_factory=DataConfig)
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    eval_every: int = 0
    """Evaluate on the validation split every this many steps and after the last (0: never)."""
    eval_batches: int = 4
    """Validation batches per evaluation, the first ones of the split in order (0: every full batch of it)."""
    metric: str = ""
    """Also measure this on the validation batches: "accuracy" (of the largest output against the batch's
    last element, the labels), "auc" (ROC AUC of the outputs, click scores, against 0/1 labels, the batch's
    last element; exact, over every validation batch at once), or ``package.module:function(outputs, batches)
    -> float`` (empty: the loss only)."""
    metric_method: str = "predict"
    """The model method whose outputs the metric reads: ``pm.evaluate(*batch[:-1], method=...)``, the batch
    less its labels (its last element); "forward" reads the loss of the whole batch."""


def _convert(value: Any, kind: Any, key: str) -> Any:
    if kind is Any:  # a key of several types (criteo's alpha: a number or "uniform"): checked where it is used
        return value
    origin = typing.get_origin(kind)
    if origin is dict:  # free arguments: checked by what they are passed to (train/models.py, train/data.py)
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a table, got {value!r}")
        return fill(kind, value, key + ".")
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


def fill(cls: Any, table: dict[str, Any], prefix: str = "") -> Any:
    """``cls`` filled from ``table``; an unknown key or a value of the wrong type is an error naming it."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix + unknown[0]!r}; known keys: {sorted(prefix + n for n in names)}")
    return cls(**{k: _convert(v, hints[k], prefix + k) for k, v in table.items()})


def _literal(text: str) -> Any:
    """``--model.args.n_layer 4`` is the int 4, ``true`` a bool, ``[1, 2]`` a list; anything else the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _free(cls: Any, path: Sequence[str]) -> bool:
    """Whether the key at ``path`` lies in a free table (``args``, ``embeddings.placement``): its keys are not
    the schema's, so a flag's text there is read as a TOML value, ``{"tables.*" = "row"}`` a table."""
    for name in path:
        hint = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
        if hint is None:
            return False
        if typing.get_origin(hint) is dict:
            return True
        cls = hint
    return False


def _one_of(table: Any, keys: tuple[str, ...], default: str, section: str) -> None:
    """Exactly one of ``keys`` may be set in ``[section]``; none set means ``builtin = default``."""
    given = [k for k in keys if getattr(table, k)]
    if len(given) > 1:
        raise ValueError(f"[{section}] names {' and '.join(f'{k} = {getattr(table, k)!r}' for k in given)}: give one")
    if not given:
        table.builtin = default


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
        # a free table's key has no declared type to convert a flag's text to: read it as a TOML value
        node[leaf] = _literal(value) if _free(TrainConfig, [*parents, leaf]) else value
    cfg = fill(TrainConfig, table)
    if len(cfg.mesh) != len(cfg.axes):
        raise ValueError(f"mesh {cfg.mesh} and axes {cfg.axes} must have the same length")
    if not cfg.plan and "pp" in cfg.axes and (cfg.strategy != "dp" or cfg.zero or "tp" in cfg.axes):
        raise ValueError(
            f"a 'pp' axis pipelines the model with data parallel stages: use strategy 'dp', zero 0 and no 'tp' "
            f"axis (got strategy {cfg.strategy!r}, zero {cfg.zero}, axes {cfg.axes})"
        )
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.snapshot_every < 1 or cfg.keep_last < 1:
        raise ValueError("steps, batch_size, snapshot_every and keep_last must be positive")
    if cfg.eval_every < 0 or cfg.eval_batches < 0:
        raise ValueError("eval_every and eval_batches must be 0 or positive")
    _one_of(cfg.model, ("builtin", "hf", "function"), "gpt", "model")
    _one_of(cfg.data, ("builtin", "function"), "criteo" if cfg.model.builtin == "dlrm" else "text", "data")
    _check_clicks(cfg)
    _check_embeddings(cfg)
    if cfg.model.weights and not cfg.model.hf:
        raise ValueError("model.weights loads a Hugging Face model's weights: set model.hf too")
    if cfg.metric in ("accuracy", "auc") and cfg.metric_method == "forward":
        what = "scores per class" if cfg.metric == "accuracy" else "click scores"
        raise ValueError(f"metric = {cfg.metric!r} reads a method's {what}, not the loss forward returns")
    pipelined = "pp" in cfg.axes or (cfg.plan and read_plan(cfg.plan).pipeline is not None)
    if cfg.metric and cfg.metric_method != "forward" and pipelined:
        raise ValueError(
            f"metric_method {cfg.metric_method!r}: a pipelined model evaluates its forward (the loss) only; "
            "evaluate the loss alone (metric = '') or train without a 'pp' axis"
        )
    return cfg


def _check_clicks(cfg: TrainConfig) -> None:
    """The built-in DLRM and the click data go together (another model may read click data: a function)."""
    data = f"data.builtin = {cfg.data.builtin!r}" if cfg.data.builtin else f"data.function = {cfg.data.function!r}"
    if cfg.model.builtin == "dlrm" and cfg.data.builtin not in CLICK_DATA:
        raise ValueError(
            f"model.builtin = 'dlrm' reads click logs, its table sizes theirs: set data.builtin to one of "
            f"{list(CLICK_DATA)} (got {data}); for data of your own, build DLRM in a model.function"
        )
    if cfg.data.builtin in CLICK_DATA and (cfg.model.hf or cfg.model.builtin == "gpt"):
        model = f"model.hf = {cfg.model.hf!r}" if cfg.model.hf else "model.builtin = 'gpt'"
        raise ValueError(
            f"{data} makes DLRM's inputs (dense features, ids and offsets per table, clicks), which {model} "
            "does not read: set model.builtin = 'dlrm', or a model.function whose forward takes them"
        )


def _check_embeddings(cfg: TrainConfig) -> None:
    """``[embeddings]``' values, and what sparse tables allow of the rest of the config."""
    emb = cfg.embeddings
    if cfg.model.builtin == "dlrm" and not emb.tables:
        emb.tables = ["tables.*"]  # every table of the built-in DLRM
    if not emb.tables:
        if emb != EmbeddingsConfig():
            raise ValueError(
                "[embeddings] applies to the embedding modules it names: set embeddings.tables (globs over module "
                "names, e.g. ['tables.*']), or leave the section out"
            )
        return
    if emb.optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"embeddings.optimizer = {emb.optimizer!r}: one of {list(EMBEDDING_OPTIMIZERS)}")
    if not emb.lr > 0:
        raise ValueError(f"embeddings.lr must be positive, got {emb.lr!r}")
    for glob, where in emb.placement.items():
        if where not in TABLE_PLACEMENTS:
            raise ValueError(
                f"embeddings.placement {glob!r} = {where!r}: a placement is one of {list(TABLE_PLACEMENTS)}"
            )
    refused = {
        f"strategy = {cfg.strategy!r}": cfg.strategy != "dp",
        f"a {len(cfg.mesh)}-d mesh": len(cfg.mesh) != 1,
        "a 'pp' axis": "pp" in cfg.axes,
    }
    said = [k for k, v in refused.items() if v]
    if said and not cfg.plan:
        raise ValueError(
            f"sparse tables ([embeddings], or the built-in DLRM) train data parallel on a 1-d mesh: {said[0]} is "
            "not supported with them yet; use mesh = [N], axes = ['dp'] and strategy = 'dp' (zero may be any)"
        )
