"""The model a config names: a built-in, a Hugging Face ``transformers`` class, or a user function.

Every one ends as an ``nn.Module`` whose ``forward(*batch)`` returns the loss, which is all ``sf.compile``
asks. A Hugging Face model returns a ``ModelOutput`` and computes its loss its own way (shifting labels), so
it is wrapped: a causal language model's forward is the next-token cross-entropy of its logits against the
batch's targets, as the built-in GPT's is; a sequence classifier's the cross-entropy against labels. Both
keep the model's ``logits``/``predict`` for evaluation. Accelerate and torchtitan likewise take the loss
outside the model for the same reason: one loss convention for every model the platform trains.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shardflow.models import CHAR_VOCAB_SIZE, DLRM, GPT, DLRMConfig, GPTConfig
from shardflow.train.clicks import ClickShape
from shardflow.train.config import DLRMArgs, GPTArgs, ModelConfig, fill
from shardflow.train.imports import bind, resolve

BUILTIN = ("gpt", "dlrm")
_FROM_DATA = ("table_rows", "dense_features", "sparse")  # DLRMConfig's keys that DLRMArgs leaves out


@dataclass(frozen=True)
class TrainModel:
    """The module to compile, and its context length where it reads sequences (the built-in text's default
    window)."""

    module: nn.Module
    context: int | None = None


class CausalLM(nn.Module):
    """A ``transformers`` causal language model trained on next tokens: ``forward(x, y)`` is the mean
    cross-entropy of its logits at ``x`` against ``y``, the targets already shifted (``y[:, t] = x[:, t + 1]``,
    as the built-in text makes them; Hugging Face's own ``labels = input_ids`` would teach it to copy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x).float()  # the loss in float32 even for half-precision logits, as HF computes it
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab)."""
        # NOTE: the model's default key/value cache stays on: without a cache or a mask, transformers looks for
        # packed sequences in the position ids (data-dependent indexing); a cache started empty costs a copy
        return self.model(input_ids=x).logits

    predict = logits


class SequenceClassifier(nn.Module):
    """A ``transformers`` sequence classifier: ``forward(x, labels)`` is the mean cross-entropy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.predict(x), labels)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (batch, classes)."""
        return self.model(input_ids=x).logits  # the cache on, as for CausalLM.logits


def check_model(cfg: ModelConfig) -> None:
    """Everything about ``cfg`` that can be wrong without building it (the launcher checks it before any
    rank starts): the built-in's name and arguments, the Hugging Face class and its settings, the function's
    path and signature."""
    if cfg.builtin:
        _builtin_args(cfg)
    elif cfg.hf:
        _hf_class(cfg)
    else:
        bind(resolve(cfg.function, "model.function"), cfg.args, "model.args")


def build_model(cfg: ModelConfig, seed: int, clicks: ClickShape | None = None) -> TrainModel:
    """The model ``cfg`` names, its weights drawn after ``torch.manual_seed(seed)``; the built-in DLRM's
    widths and table sizes are the click data's, ``clicks``."""
    # each branch checks what it builds as it builds it (check_model's work, not done twice)
    if cfg.builtin:
        args = _builtin_args(cfg)
        if isinstance(args, DLRMArgs):
            if clicks is None:
                raise ValueError("model.builtin = 'dlrm' takes its table sizes from the click data: give its shape")
            return _dlrm(args, clicks, seed)
        torch.manual_seed(seed)
        return _gpt(args)
    if cfg.hf:
        cls = _hf_class(cfg)
        torch.manual_seed(seed)
        return _hugging_face(cfg, cls)
    fn = resolve(cfg.function, "model.function")
    bind(fn, cfg.args, "model.args")
    torch.manual_seed(seed)
    made = fn(**cfg.args)
    if not isinstance(made, nn.Module):
        raise ValueError(f"model.function = {cfg.function!r} returned {type(made).__name__}, not an nn.Module")
    return TrainModel(made)


def _builtin_args(cfg: ModelConfig) -> GPTArgs | DLRMArgs:
    """The built-in's arguments, its name and their keys (and a DLRM's widths) checked."""
    if cfg.builtin not in BUILTIN:
        raise ValueError(f"model.builtin = {cfg.builtin!r}: shardflow ships {list(BUILTIN)}")
    if cfg.builtin == "gpt":
        return fill(GPTArgs, cfg.args, "model.args.")  # type: ignore[no-any-return]
    given = sorted(set(cfg.args) & set(_FROM_DATA))
    if given:
        raise ValueError(
            f"model.args.{given[0]}: the built-in DLRM takes its table sizes and dense width from the click data, "
            "and its tables are always sparse ([embeddings]); set dim, bottom, top and mode only"
        )
    args: DLRMArgs = fill(DLRMArgs, cfg.args, "model.args.")
    _dlrm_config(args, ClickShape(1, (1,)))  # its own checks (bottom ends in dim, the mode), before any data
    return args


def _dlrm_config(args: DLRMArgs, clicks: ClickShape) -> DLRMConfig:
    try:
        return DLRMConfig(
            dense_features=clicks.dense_features, table_rows=clicks.table_rows, dim=args.dim,
            bottom=tuple(args.bottom), top=tuple(args.top), mode=args.mode,  # type: ignore[arg-type]
        )  # fmt: skip
    except ValueError as e:
        raise ValueError(f"model.args: {e}") from None


def _dlrm(args: DLRMArgs, clicks: ClickShape, seed: int) -> TrainModel:
    """DLRM with its tables on the meta device: ``sf.Embeddings`` has each rank draw only the rows its
    placement gives it (``init_rows``, seeded by ``embeddings.seed``), so a row-split 40M-row table is never
    whole on any rank; the MLPs are drawn from ``seed``."""
    config = _dlrm_config(args, clicks)
    with torch.device("meta"):
        dlrm = DLRM(config)
    torch.manual_seed(seed)
    for mlp in (dlrm.bottom, dlrm.top):
        mlp.to_empty(device="cpu")
        for layer in mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    return TrainModel(dlrm)


def _gpt(args: GPTArgs) -> TrainModel:
    # dropout 0: compiled steps cannot train with it yet (no layout rule for random ops)
    gpt = GPT(GPTConfig(vocab_size=CHAR_VOCAB_SIZE, dropout=0.0, **dataclasses.asdict(args)))
    return TrainModel(gpt, args.block_size)


def _hf_class(cfg: ModelConfig) -> Any:
    """The ``transformers`` class ``cfg.hf`` names, its ``args`` checked against its config class."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model.hf = {cfg.hf!r} needs transformers: pip install 'transformers>=4.40'") from None
    transformers.logging.set_verbosity_error()  # its warnings about unused weights and caches are not the user's
    cls = getattr(transformers, cfg.hf, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"model.hf = {cfg.hf!r}: transformers has no model class of that name")
    if not cfg.hf.endswith(("ForCausalLM", "LMHeadModel", "ForSequenceClassification")):
        raise ValueError(
            f"model.hf = {cfg.hf!r}: shardflow trains *ForCausalLM, *LMHeadModel and *ForSequenceClassification "
            "classes from a config; for another head, write a function returning a module whose forward returns "
            "the loss and name it with model.function"
        )
    config_cls: Any = cls.config_class
    # the config class's own settings, and those every config has (num_labels, pad_token_id, ...)
    known = set(config_cls().to_dict())
    for klass in config_cls.__mro__:
        if "__init__" in vars(klass):
            known |= set(inspect.signature(klass.__init__).parameters)
        known |= {n for n, v in vars(klass).items() if isinstance(v, property) and v.fset is not None}
    known.add("attn_implementation")  # read from the keywords by PreTrainedConfig, in no signature
    unknown = sorted(set(cfg.args) - known)
    if unknown:  # a config class takes any keyword silently: a typo would train another model
        raise ValueError(f"unknown key 'model.args.{unknown[0]}': {config_cls.__name__} has no such setting")
    if cfg.hf.endswith("ForSequenceClassification") and "pad_token_id" not in cfg.args and not cfg.weights:
        # it pools each sequence's last token that is not padding: without a padding id it cannot find it
        raise ValueError(f"model.hf = {cfg.hf!r} pools the last non-padding token: set model.args.pad_token_id")
    return cls


def _hugging_face(cfg: ModelConfig, cls: Any) -> TrainModel:
    config_cls: Any = cls.config_class
    if cfg.weights:
        model = cls.from_pretrained(cfg.weights, local_files_only=True, **cfg.args)
    else:
        model = cls(config_cls(**cfg.args))
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    wrap = SequenceClassifier if cfg.hf.endswith("ForSequenceClassification") else CausalLM
    return TrainModel(wrap(model), context)
