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

from shardflow.models import CHAR_VOCAB_SIZE, GPT, GPTConfig
from shardflow.train.config import GPTArgs, ModelConfig, fill
from shardflow.train.imports import call_with, resolve

BUILTIN = ("gpt",)


@dataclass(frozen=True)
class TrainModel:
    """The module to compile, its context length where it reads sequences (the built-in text's default
    window), and FLOPs per token where a formula is known (the GPT's)."""

    module: nn.Module
    context: int | None = None
    flops_per_token: float | None = None


class CausalLM(nn.Module):
    """A ``transformers`` causal language model trained on next tokens: ``forward(x, y)`` is the mean
    cross-entropy of its logits at ``x`` against ``y`` (the built-in text's targets, already shifted)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab); the key-value cache is off (training never decodes)."""
        return self.model(input_ids=x, use_cache=False).logits

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
        return self.model(input_ids=x).logits


def build_model(cfg: ModelConfig, seed: int) -> TrainModel:
    """The model ``cfg`` names, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if cfg.builtin:
        if cfg.builtin not in BUILTIN:
            raise ValueError(f"model.builtin = {cfg.builtin!r}: shardflow ships {list(BUILTIN)}")
        return _gpt(fill(GPTArgs, cfg.args, "model.args."))
    if cfg.hf:
        return _hugging_face(cfg)
    made = call_with(resolve(cfg.function, "model.function"), cfg.args, "model.args")
    if not isinstance(made, nn.Module):
        raise ValueError(f"model.function = {cfg.function!r} returned {type(made).__name__}, not an nn.Module")
    return TrainModel(made)


def _gpt(args: GPTArgs) -> TrainModel:
    gpt = GPT(GPTConfig(vocab_size=CHAR_VOCAB_SIZE, **dataclasses.asdict(args)))
    n_params = sum(p.numel() for p in gpt.parameters())
    # 6 FLOPs per parameter per token (forward + backward), plus attention (PaLM, appendix B)
    flops = 6 * n_params + 12 * args.n_layer * args.block_size * args.n_embd
    return TrainModel(gpt, args.block_size, flops)


def _hugging_face(cfg: ModelConfig) -> TrainModel:
    try:
        import transformers
    except ImportError:
        raise ValueError(f"model.hf = {cfg.hf!r} needs transformers: pip install 'transformers>=4.40'") from None
    transformers.logging.set_verbosity_error()  # its warnings about unused weights and caches are not the user's
    cls = getattr(transformers, cfg.hf, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"model.hf = {cfg.hf!r}: transformers has no model class of that name")
    if cfg.hf.endswith(("ForCausalLM", "LMHeadModel")):
        wrap: type[nn.Module] = CausalLM
    elif cfg.hf.endswith("ForSequenceClassification"):
        wrap = SequenceClassifier
    else:
        raise ValueError(
            f"model.hf = {cfg.hf!r}: shardflow trains *ForCausalLM, *LMHeadModel and *ForSequenceClassification "
            "classes from a config; for another head, write a function returning a module whose forward returns "
            "the loss and name it with model.function"
        )
    config_cls: Any = cls.config_class
    known = set(config_cls().to_dict()) | set(inspect.signature(config_cls.__init__).parameters)
    unknown = sorted(set(cfg.args) - known)
    if unknown:  # a config class takes any keyword silently: a typo would train another model
        raise ValueError(f"unknown key 'model.args.{unknown[0]}': {config_cls.__name__} has no such setting")
    if cfg.weights:
        model = cls.from_pretrained(cfg.weights, local_files_only=True, **cfg.args)
    else:
        model = cls(config_cls(**cfg.args))
    config = model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return TrainModel(wrap(model), context)
