"""Promises of the API that other tests leave alone, each trained against plain PyTorch (5 AdamW steps with
clipping, the fp32 tolerances): eager mode (``pm.static = False``) on dp, tp and hybrid meshes; ``hints=`` and
``input_sbp=`` applied (the layouts and the program take them) and equal to serial; ``recompute=`` with
module globs; ``updates="after"`` as the one-rank default; ``inductor=True`` refused with pipelines."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch

import shardflow as sf
from shardflow.placement import format_sbp
from shardflow.placement.shard import take_local
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import _model_and_batches, train_and_compare


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _setup(kind: str, batch: int, shape, names, **kwargs):  # type: ignore[no-untyped-def]
    """The model compiled on ``shape`` with ``kwargs``, a plain copy and its optimizer, and the batches."""
    model, data = _model_and_batches(kind, batch)
    ref = copy.deepcopy(model)
    mesh = sf.Mesh("cpu", shape, names=names)
    kwargs.setdefault("strategy", names[-1] if len(names) == 1 else "hybrid")
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, **kwargs)
    return pm, ref, _adamw(ref.parameters()), data


def _train(pm, ref, opt, data) -> bool:  # type: ignore[no-untyped-def]
    """``train_and_compare`` on the mesh's ranks; the pool's other ranks only take part. Whether compared."""
    if torch.distributed.get_rank() in pm.mesh:
        train_and_compare(pm, ref, opt, data)
        return True
    for x, y in data:
        pm.step(x, y)
    pm.full_state_dict()
    return False


def _eager(kind: str, batch: int, shape, names) -> str | None:
    pm, ref, opt, data = _setup(kind, batch, shape, names)
    pm.static = False
    if not _train(pm, ref, opt, data):
        return None
    assert not pm.programs  # every step ran op by op: nothing was lowered
    return pm.explain()


@pytest.mark.parametrize(
    "kind, batch, shape, names",
    [("mlp", 7, (2,), ("dp",)), ("gpt", 2, (4,), ("tp",)), ("gpt", 3, (2, 2), ("dp", "tp"))],
)
def test_eager_adamw_steps_with_clipping_equal_plain_torch(kind, batch, shape, names):
    explained = [e for e in run_on_ranks(4, _eager, kind, batch, shape, names, timeout=300) if e is not None]
    assert len(explained) == math.prod(shape)  # every rank of the mesh compared
    assert all("first eager step (forward, backward, gradient sync, clipping, update)" in e for e in explained)


# hints on a hybrid GPT: the embedding split over tp on its feature dim, and each block's c_fc weight (a
# column-parallel S(0) on tp by default) also split over dp on its other dim, as ZeRO-3 would for just it
HINTS = {"transformer.wte.weight": (sf.B, sf.S(1)), "transformer.h.*.mlp.c_fc.weight": (sf.S(1), sf.S(0))}
HINTED = {
    "transformer.wte.weight": (sf.B, sf.S(1)),
    "transformer.h.0.mlp.c_fc.weight": (sf.S(1), sf.S(0)),
    "transformer.h.1.mlp.c_fc.weight": (sf.S(1), sf.S(0)),
}


def _hinted() -> tuple[dict, str, str]:  # type: ignore[type-arg]
    pm, ref, opt, data = _setup("gpt", 3, (2, 2), ("dp", "tp"), hints=HINTS)
    assert pm.updates == "loop"  # a CPU mesh of several ranks updates on the compute thread's event loop
    train_and_compare(pm, ref, opt, data)
    local = {n: tuple(pm.module.get_parameter(n)._local.shape) for n in HINTED}
    return local, pm.explain(), format_sbp(pm.layouts["transformer.h.0.mlp.c_proj.weight"])


def test_hints_are_applied_and_train_equal_to_plain_torch():
    model, _ = _model_and_batches("gpt", 3)
    params = dict(model.named_parameters())
    for rank, (local, explained, untouched) in enumerate(run_on_ranks(4, _hinted, timeout=300)):
        coord = (rank // 2, rank % 2)
        for name, sbp in HINTED.items():
            want = tuple(take_local(params[name].detach(), sbp, (2, 2), coord).shape)
            assert local[name] == want, (rank, name, local[name], want)  # the rank holds the hinted piece
            line = next(line for line in explained.splitlines() if line.strip().startswith(name + " "))
            assert line.endswith(format_sbp(sbp)), line
        assert untouched == "(B, S(1))"  # parameters no hint names keep the strategy's layouts


def _input_laid(kind: str, batch: int, shape, names, input_sbp) -> tuple[tuple, list[str]] | None:  # type: ignore[type-arg]
    pm, ref, opt, data = _setup(kind, batch, shape, names, input_sbp=input_sbp)
    if not _train(pm, ref, opt, data):
        return None
    (key,) = pm.programs  # one program, lowered for the inputs' layouts (its signature holds them)
    return tuple(sbp for _, _, sbp in key), [c.where for c in pm.programs[key].collectives]


def test_replicated_inputs_under_dp_train_equal_to_plain_torch():
    """``input_sbp=sf.B`` on a dp mesh: every rank takes the whole batch, so gradients are whole already and
    the program all-reduces none of them (the default S(0) batch would need every one summed)."""
    for sbps, wheres in filter(None, run_on_ranks(4, _input_laid, "mlp", 6, (2,), ("dp",), sf.B, timeout=300)):
        assert sbps == ((sf.B,), (sf.B,)), sbps
        assert not any("gradient" in w for w in wheres), wheres


def test_inputs_split_on_the_sequence_dim_train_equal_to_plain_torch():
    """Token ids split on dim 1 (the sequence) over dp, targets replicated, on a hybrid mesh."""
    laid = [(sf.S(1), sf.B), (sf.B, sf.B)]
    got = [r for r in run_on_ranks(4, _input_laid, "gpt", 3, (2, 2), ("dp", "tp"), laid, timeout=300) if r]
    assert len(got) == 4
    for sbps, _ in got:
        assert sbps == tuple(laid), sbps


RECOMPUTE = ["transformer.h.*.mlp", "transformer.h.0.attn"]


def _recomputed() -> tuple[list[str], dict[str, int]] | None:
    pm, ref, opt, data = _setup("gpt", 4, (2, 2), ("dp", "tp"), recompute=RECOMPUTE)
    train_and_compare(pm, ref, opt, data)
    (program,) = pm.programs.values()
    forward = ("aten.gelu.default", "aten._scaled_dot_product_flash_attention_for_cpu.default")
    return pm.recomputed, {op: sum(r.op == op for r in program.record.ops) for op in forward}


def test_recompute_module_globs_equal_plain_torch():
    for names, counts in run_on_ranks(4, _recomputed, timeout=300):
        assert names == ["transformer.h.0.attn", "transformer.h.0.mlp", "transformer.h.1.mlp"]
        # each recomputed module's forward is in the program twice: once in forward, again in backward
        assert counts == {
            "aten.gelu.default": 2 + 2,  # both blocks' MLPs
            "aten._scaled_dot_product_flash_attention_for_cpu.default": 2 + 1,  # the first block's attention
        }, counts


def test_recompute_glob_that_matches_nothing_is_an_error():
    model, data = _model_and_batches("gpt", 2)
    mesh = sf.Mesh("cpu", (1,), names=("dp",))
    with pytest.raises(ValueError, match=r"recompute glob 'transformer\.h\.9' matches no module of GPT"):
        sf.compile(model, mesh, data[0], recompute=["transformer.h.*.mlp", "transformer.h.9"])


def test_updates_after_backward_is_the_one_rank_default(monkeypatch):
    """One rank has no communication to hide: one update after backward (no update actors), equal to PyTorch."""
    pm, ref, opt, data = _setup("gpt", 3, (1,), ("dp",))
    assert pm.updates == "after"

    def no_actors(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("update actors started for updates='after'")

    monkeypatch.setattr(importlib.import_module("shardflow.graph.static_step"), "UpdateActors", no_actors)
    train_and_compare(pm, ref, opt, data)


def test_inductor_with_a_pipeline_is_refused():
    model, data = _model_and_batches("gpt", 2)
    with pytest.raises(NotImplementedError, match="inductor cannot be combined with pipeline="):
        sf.compile(model, sf.Mesh("cpu", (2,), names=("pp",)), data[0], inductor=True, pipeline=sf.Pipeline())
