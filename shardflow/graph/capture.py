"""Capture a model's forward once with ``torch.export`` (training IR, no decompositions).

Why export: it sees an unmodified ``nn.Module`` (no tracing-friendly rewrites), names every parameter,
and keeps high-level ATen ops (``linear``, ``scaled_dot_product_attention``, ``layer_norm``), which is
what strategy search needs to see (Megatron pairs are ``linear -> ... -> linear``). Decomposed graphs
would bury that structure under ``addmm``/``bmm``/``where``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shardflow.runtime.capture_errors import explained


@dataclass(frozen=True)
class Captured:
    """The forward graph and the map from graph placeholders to parameter names."""

    program: Any  # torch.export.ExportedProgram
    param_of: dict[str, str]  # placeholder name -> parameter name (model.named_parameters())


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> Captured:
    """Export ``model`` on plain example inputs; the forward must return a scalar loss."""
    with explained(model, f"capturing {type(model).__name__} with torch.export (to choose parameter layouts)"):
        program = torch.export.export(model, tuple(example_inputs), strict=False)
    outputs = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    vals = [o.meta.get("val") for o in outputs if hasattr(o, "meta")]
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor) or vals[0].dim() != 0:
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in vals]
        raise ValueError(
            f"{type(model).__name__}.forward must return one scalar loss tensor, got {shapes}; wrap the model "
            f"in a module whose forward returns the loss (e.g. hf_model(input_ids=x, labels=y).loss)"
        )
    param_of = dict(program.graph_signature.inputs_to_parameters)
    return Captured(program, param_of)
