"""Pipeline parallelism on real ranks equals plain PyTorch on one process: GPipe and 1F1B, 2 and 4 stages,
1, 4 and 7 micro-batches, the GPT (tied embeddings held by the first and last stage) and the MLP, a
pp x dp mesh, and batches that micro-batches cut unevenly (like ``tensor_split``). Losses of 5 AdamW steps with global-norm clipping and the parameters after them agree within
rtol 1e-4 (micro-batches sum gradients in another order than one batch does). The traced last step shows
each stage ran its schedule's order."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, MLP, GPTConfig, MLPConfig
from shardflow.runtime.schedule import stage_order
from shardflow.runtime.trace import read
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import reference_step

STEPS = 5


def _model_and_batches(kind: str, batch: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=4, n_head=2, n_embd=16))
        xs = [torch.randint(0, 32, (batch, 8), generator=gen) for _ in range(STEPS)]
        return model, [(x, torch.roll(x, -1, 1)) for x in xs]
    model = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16, 16), num_classes=5))
    return model, [
        (torch.randn(batch, 6, generator=gen), torch.randint(0, 5, (batch,), generator=gen)) for _ in range(STEPS)
    ]


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


def _cases(kind: str, cases, trace_dir: str) -> list[str]:  # type: ignore[no-untyped-def]
    checked = []
    for shape, names, schedule, m, batch in cases:
        model, data = _model_and_batches(kind, batch)
        ref = copy.deepcopy(model)
        opt = _adamw(ref.parameters())
        mesh = sf.Mesh("cpu", shape, names=names)
        pipeline = sf.Pipeline(micro_batches=m, schedule=schedule)
        pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline)
        case = f"{kind} {shape} {names} {schedule} m={m}"
        trace = f"{trace_dir}/{kind}-{len(checked)}.json"
        inside = torch.distributed.get_rank() in mesh
        for i, (x, y) in enumerate(data):
            want = reference_step(ref, opt, x, y)
            got = pm.step(x, y, trace=trace if i == STEPS - 1 else None)
            if inside:
                assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (case, i, got, want)
        state = pm.full_state_dict()
        if not inside:
            continue
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")
        stages = shape[names.index("pp")]
        for rank in mesh.ranks:
            stage = mesh.coord_of(rank)[names.index("pp")]
            ran = [e.name for e in pm.events if e.rank == rank and e.track == "compute"]
            assert ran == [repr(a) for a in stage_order(schedule, stage, stages, m)], (case, rank, ran)
        if torch.distributed.get_rank() == mesh.ranks[0]:
            assert {e.rank for e in read(trace)} == set(mesh.ranks)  # the file rank 0 wrote has every rank
        checked.append(case)
    return checked


def _matrix(kind: str) -> list[tuple]:
    cases = [
        ((stages,), ("pp",), schedule, m, 28) for stages in (2, 4) for schedule in ("gpipe", "1f1b") for m in (1, 4, 7)
    ]
    uneven = [((2,), ("pp",), "1f1b", 4, 10), ((2, 2), ("pp", "dp"), "gpipe", 3, 10)]  # tensor_split cuts
    return cases + [((2, 2), ("pp", "dp"), "1f1b", 4, 8), ((2, 2), ("dp", "pp"), "gpipe", 3, 6), *uneven]


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_pipeline_equals_plain_torch(kind, tmp_path: Path):
    cases = _matrix(kind)
    checked = run_on_ranks(4, _cases, kind, cases, str(tmp_path), timeout=600)
    assert len(checked[0]) == len(cases)  # rank 0 is in every mesh and checked every case


def _compile(model, batch, mesh_shape=(2,), **pipeline):  # type: ignore[no-untyped-def]
    x = torch.randn(batch, 6) if isinstance(model, MLP) else torch.randn(batch, 3, 8, 8)
    y = torch.zeros(batch, dtype=torch.long)
    mesh = sf.Mesh("cpu", mesh_shape, names=("pp",) if len(mesh_shape) == 1 else ("pp", "dp"))
    return sf.compile(model, mesh, example_inputs=(x, y), pipeline=sf.Pipeline(**pipeline))


def test_bad_pipelines_are_refused_with_the_fix():
    mlp = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16), num_classes=5))
    with pytest.raises(ValueError, match="a batch of 3 rows leaves some of the 4 micro-batches x 1 data-parallel"):
        _compile(mlp, 3, micro_batches=4)
    with pytest.raises(ValueError, match="split point 'net.9' is not a submodule of MLP"):
        _compile(mlp, 8, split_points=["net.9"])
    with pytest.raises(ValueError, match="make 3 stages, but mesh axis 'pp' has 2 ranks: give 1 split points"):
        _compile(mlp, 8, split_points=["net.2", "net.4"])
    with pytest.raises(ValueError, match="Pipeline.schedule must be one of"):
        sf.Pipeline(schedule="interleaved")
    with pytest.raises(ValueError, match="Pipeline.micro_batches must be a positive int, got 0"):
        sf.Pipeline(micro_batches=0)
    cnn = sf.models.SmallCNN(sf.models.CNNConfig(in_channels=3, image_size=8, channels=(4, 6), num_classes=3))
    with pytest.raises(ValueError, match="has BatchNorm: under a pipeline it would normalise each micro-batch"):
        _compile(cnn, 8)
    mesh = sf.Mesh("cpu", (2,), names=("pp",))
    with pytest.raises(NotImplementedError, match="strategy cannot be combined with pipeline="):
        sf.compile(
            mlp,
            mesh,
            example_inputs=(torch.randn(4, 6), torch.zeros(4, dtype=torch.long)),
            strategy="tp",
            pipeline=sf.Pipeline(),
        )


def test_balanced_cut_puts_the_expensive_head_alone():
    """The GPT's lm_head (vocab x width per token) costs more than a block: with two stages, the cut by
    FLOPs leaves the last block with the head and gives the first stage the rest."""
    from shardflow.runtime.stages import balanced_split_points

    gpt = GPT(GPTConfig(vocab_size=512, block_size=8, n_layer=4, n_head=2, n_embd=16))
    x = torch.randint(0, 512, (2, 8))
    assert balanced_split_points(gpt, (x, x), 2) == ["transformer.h.3"]
    mlp = MLP(MLPConfig(in_features=64, hidden_sizes=(64, 64, 64), num_classes=64))  # four equal Linears
    cut = balanced_split_points(mlp, (torch.randn(2, 64), torch.zeros(2, dtype=torch.long)), 2)
    assert cut in (["net.3"], ["net.4"])  # two Linears each side; the GELU between costs next to nothing
