"""Pipeline parallelism on real ranks equals plain PyTorch on one process: GPipe and 1F1B, 2 and 4 stages, 1, 4
and 7 micro-batches, the GPT (tied embeddings held by the first and last stage) and the MLP, a pp x dp mesh,
and batches that micro-batches cut unevenly (like ``tensor_split``). Losses of 5 AdamW steps with global-norm
clipping and the parameters after them agree within rtol 1e-4 (micro-batches sum gradients in another order
than one batch does). The traced last step shows each stage ran its schedule's order, and that every
data-parallel stage after the first split its last backward (input gradients first, weights' after)."""

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
from tests.graph.test_compile import reference_step, train_and_compare
from tests.runtime.custom_ops import Quantized, scaled

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
    for shape, names, schedule, m, batch, *more in cases:
        given = more[0] if more else None
        strategy = more[1] if len(more) > 1 else "dp"
        model, data = _model_and_batches(kind, batch)
        ref = copy.deepcopy(model)
        opt = _adamw(ref.parameters())
        mesh = sf.Mesh("cpu", shape, names=names)
        # stages of their own meshes (of any sizes), given as ranks (1-d, data parallel) or (shape, names, ranks)
        meshes = None
        if given:
            meshes = [sf.Mesh("cpu", *g[:2], ranks=g[2]) if isinstance(g, tuple) else _dp_mesh(g) for g in given]
        pipeline = sf.Pipeline(micro_batches=m, schedule=schedule, stage_meshes=meshes)
        pm = sf.compile(
            model,
            mesh,
            example_inputs=data[0],
            optimizer=_adamw,
            max_grad_norm=0.5,
            pipeline=pipeline,
            strategy=strategy,
        )
        case = f"{kind} {shape} {names} {schedule} m={m} {given or ''} {strategy}"
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
        stages = len(given) if given else shape[names.index("pp")]
        text = pm.explain()  # every rank of each next stage is named as receiving rows of micro-batch 0
        for b in range(stages - 1):
            line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"stage {b} -> {b + 1}:"))
            assert all(f"->{r} " in line for r in pm.stage_ranks[b + 1]), (case, line)
        if strategy == "dp":
            assert f"stage(s) {list(range(1, stages))}: the last backward runs in two passes" in text, text
        for rank in mesh.ranks:
            stage = next(s for s, r in enumerate(pm.stage_ranks) if rank in r)
            if not given:
                assert stage == mesh.coord_of(rank)[names.index("pp")]
            ran = [e.name for e in pm.events if e.rank == rank and e.track == "compute"]
            order = [repr(a) for a in stage_order(schedule, stage, stages, m)]
            # a data-parallel stage after the first sends its last backward's input gradients before it
            # computes its weights' gradients (W): runtime/split_backward.py
            if stage > 0 and strategy == "dp":
                order.append("W" + order[-1][1:])
            assert ran == order, (case, rank, ran)
        if torch.distributed.get_rank() == mesh.ranks[0]:
            assert {e.rank for e in read(trace)} == set(mesh.ranks)  # the file rank 0 wrote has every rank
        checked.append(case)
    return checked


def _dp_mesh(ranks: list[int]) -> sf.Mesh:
    return sf.Mesh("cpu", (len(ranks),), names=("dp",), ranks=ranks)


def _matrix(kind: str) -> list[tuple]:
    cases = [
        ((stages,), ("pp",), schedule, m, 28) for stages in (2, 4) for schedule in ("gpipe", "1f1b") for m in (1, 4, 7)
    ]
    uneven = [((2,), ("pp",), "1f1b", 4, 10), ((2, 2), ("pp", "dp"), "gpipe", 3, 10)]  # tensor_split cuts
    # stages of different sizes, uneven cuts everywhere: 1 rank hands its rows to 3 (micro-batches of 4, 4,
    # 3, 3 rows, cut 2+1+1 and 1+1+1 on the second stage), 2 ranks to 1 (7 rows), 1 to 2 to 1 in reverse rank order
    sized = [
        ((4,), ("pp",), "1f1b", 4, 14, [[0], [1, 2, 3]]),
        ((3,), ("pp",), "gpipe", 3, 7, [[0, 1], [2]]),
        ((4,), ("pp",), "1f1b", 2, 9, [[3], [1, 2], [0]]),
    ]
    # tensor parallel inside stages: Megatron layouts over each stage's tp axis; then a data-parallel stage of
    # two ranks handing on to a tensor-parallel stage of two (hybrid), and one rank to a tp stage of three
    tp = [
        ((2, 2), ("pp", "tp"), "1f1b", 4, 8, None, "tp"),
        ((4,), ("pp",), "gpipe", 3, 7, [((2, 1), ("dp", "tp"), [0, 1]), ((1, 2), ("dp", "tp"), [2, 3])], "hybrid"),
        ((4,), ("pp",), "1f1b", 2, 6, [((1,), ("tp",), [0]), ((3,), ("tp",), [1, 2, 3])], "tp"),
    ]
    return cases + [((2, 2), ("pp", "dp"), "1f1b", 4, 8), ((2, 2), ("dp", "pp"), "gpipe", 3, 6), *uneven, *sized, *tp]


@pytest.mark.parametrize("kind", ["mlp", "gpt"])
def test_pipeline_equals_plain_torch(kind, tmp_path: Path):
    cases = _matrix(kind)
    # below pytest's 600 s timeout, so a hang is reported by the harness (which rank is silent), not by pytest
    checked = run_on_ranks(4, _cases, kind, cases, str(tmp_path), timeout=480)
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
    with pytest.raises(ValueError, match="Pipeline.split_backward must be True or False, got 'no'"):
        sf.Pipeline(split_backward="no")  # type: ignore[arg-type]
    cnn = sf.models.SmallCNN(sf.models.CNNConfig(in_channels=3, image_size=8, channels=(4, 6), num_classes=3))
    with pytest.raises(ValueError, match="has BatchNorm: under a pipeline it would normalise each micro-batch"):
        _compile(cnn, 8)
    mesh = sf.Mesh("cpu", (2,), names=("pp",))
    with pytest.raises(ValueError, match="stage 0's mesh Mesh.'cpu', replica=1. has none: name one axis"):
        sf.compile(
            mlp,
            mesh,
            example_inputs=(torch.randn(4, 6), torch.zeros(4, dtype=torch.long)),
            strategy="hybrid",
            pipeline=sf.Pipeline(),
        )
    hooked = (torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="_Hooked registers tensor hooks in forward .register_hook or retain_grad"):
        sf.compile(_Hooked(), mesh, example_inputs=hooked, pipeline=sf.Pipeline(split_points=["b"]))
    with pytest.raises(ValueError, match="_Hooked registers tensor hooks in forward"):
        sf.compile(_Hooked(retain=True), mesh, example_inputs=hooked, pipeline=sf.Pipeline(split_points=["b"]))
    backward_hooked = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16), num_classes=5))
    backward_hooked.net[0].register_full_backward_hook(lambda *_: None)
    with pytest.raises(ValueError, match=r"modules \['net.0'\] have backward hooks, which the stages"):
        sf.compile(backward_hooked, mesh, example_inputs=hooked, pipeline=sf.Pipeline(split_points=["net.2"]))
    # a custom autograd.Function's backward would be dropped by the cut: a straight-through rounding would
    # get rounding's derivative (zero) in the stage
    apply = torch.autograd.Function.__dict__["apply"]  # watched during the cut, then put back
    with pytest.raises(
        ValueError, match=r"Quantized calls custom autograd.Functions \['tests.runtime.custom_ops.StraightThrough'\]"
    ):
        sf.compile(Quantized(), mesh, example_inputs=hooked, pipeline=sf.Pipeline(split_points=["head"]))
    assert torch.autograd.Function.__dict__["apply"] is apply
    with pytest.raises(NotImplementedError, match="zero cannot be combined with pipeline="):
        sf.compile(
            mlp,
            mesh,
            example_inputs=(torch.randn(4, 6), torch.zeros(4, dtype=torch.long)),
            zero=1,
            pipeline=sf.Pipeline(),
        )


class _Swap(torch.nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.transpose(0, 1)


class _BatchSecond(torch.nn.Module):
    """An MLP whose first stage hands on (features, batch): rows of it are not rows of the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(6, 8), _Swap(), _Swap(), torch.nn.Linear(8, 5))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.layers(x), y)


def _refusals() -> list[str]:
    """What compiling each bad pipeline with stage meshes says (every rank of the job must raise it)."""
    mlp = MLP(MLPConfig(in_features=6, hidden_sizes=(16, 16), num_classes=5))
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    one, two, three = ([0], [1, 2]), ([0, 1], [1, 2, 3]), ([0], [1])
    meshes = [[sf.Mesh("cpu", (len(r),), names=("dp",), ranks=r) for r in stages] for stages in (one, two, three)]
    whole = sf.Mesh("cpu", (3,), names=("pp",))
    said = []
    for model, stages, mesh in [(_BatchSecond(), meshes[0], whole), (mlp, meshes[1], whole), (mlp, meshes[2], whole)]:
        try:
            sf.compile(
                model,
                mesh,
                example_inputs=(x, y),
                pipeline=sf.Pipeline(
                    stage_meshes=stages, split_points=["layers.2"] if isinstance(model, _BatchSecond) else None
                ),
            )
        except ValueError as exc:
            said.append(str(exc))
    return said


def test_bad_stage_meshes_are_refused_on_every_rank():
    said = run_on_ranks(4, _refusals)
    assert all(s == said[0] for s in said)  # the same verdict everywhere, so no rank is left waiting
    assert len(said[0]) == 3, said[0]
    assert "tensor 0 from stage 0 to stage 1 (micro-batch 0): the stage on ranks [0] hands on rows [8]" in said[0][0]
    assert "Stages of different sizes need tensors whose dim 0 is the batch" in said[0][0]
    assert "rank 1 is in stage meshes 0 and 1: give each stage its own ranks" in said[0][1]
    assert "the stage meshes hold ranks [0, 1] but the mesh" in said[0][2]


def test_stages_run_their_generated_code():
    """torch.export outlines each stage's submodules to interpret their graphs node by node; ``split_model``
    sets every one to run the graph's generated code instead (the equality tests above run them so)."""
    from torch.export.unflatten import InterpreterModule

    from shardflow.runtime.stages import split_model

    model, data = _model_and_batches("gpt", 4)
    split = split_model(model, data[0], ["transformer.h.2"])
    outlined = [m for stage in split.modules for m in stage.modules() if isinstance(m, InterpreterModule)]
    assert len(outlined) > 10 and all(m._run_with_interpreter is False for m in outlined)


def test_balanced_cut_weighs_stages_by_their_ranks():
    """Equal layers over a stage of one rank and a stage of three: the wide stage takes four of five."""
    from shardflow.runtime.stages import balanced_split_points

    mlp = MLP(MLPConfig(in_features=32, hidden_sizes=(32, 32, 32, 32), num_classes=32))  # five equal linears
    batch = (torch.randn(4, 32), torch.randint(0, 32, (4,)))
    assert balanced_split_points(mlp, batch, 2, capacity=[1, 3]) == ["net.2"]  # 1 linear against 4 over 3 ranks
    assert balanced_split_points(mlp, batch, 2, capacity=[3, 1]) == ["net.7"]  # the last GELU goes too
    # 3 linears against 2 and the loss: the GELU at the cut may go either way
    assert balanced_split_points(mlp, batch, 2) in (["net.4"], ["net.5"], ["net.6"])


def test_balanced_cut_puts_the_expensive_head_alone():
    """The GPT's lm_head (vocab x width per token) costs more than a block: with two stages, the cut by
    FLOPs leaves the last block with the head and gives the first stage the rest."""
    from shardflow.runtime.stages import balanced_split_points

    gpt = GPT(GPTConfig(vocab_size=512, block_size=8, n_layer=4, n_head=2, n_embd=16))
    x = torch.randint(0, 512, (2, 8))
    assert balanced_split_points(gpt, (x, x), 2) == ["transformer.h.3"]
    mlp = MLP(MLPConfig(in_features=64, hidden_sizes=(64, 64, 64), num_classes=64))  # four equal Linears
    cut = balanced_split_points(mlp, (torch.randn(2, 64), torch.zeros(2, dtype=torch.long)), 2)
    assert cut in (["net.3"], ["net.4"])  # two Linears each side; the GELU between goes either way


def _tp_stage_collectives() -> tuple[list[list[tuple[str, str, str]]], str]:
    model, data = _model_and_batches("gpt", 8)
    mesh = sf.Mesh("cpu", (2, 2), names=("pp", "tp"))
    pipeline = sf.Pipeline(micro_batches=2, schedule="1f1b", split_points=["transformer.h.2"])
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, pipeline=pipeline, strategy="tp")
    pm.step(*data[0])
    pm.step(*data[1])
    return [[(c.phase, c.where, c.route) for c in p.program.collectives] for p in pm.programs.values()], pm.explain()


def test_tensor_parallel_stage_runs_megatron_attention():
    """A tp stage runs as a lowered program (forward and backward, cut where the forward ends) with
    Megatron's collectives: attention on each rank's heads (c_attn is Blocked), two all-reduces per block
    forward and up to two backward (input gradients), nothing gathered. Two blocks per stage; stage 0's first
    input gradient is the embedding's, which needs none. The replicated parameters' gradients (layer norms,
    row-parallel biases, the tied embedding) leave the program as partial sums, no bucket per micro-batch:
    summed over the micro-batches, then reduced once per step over the stage's ranks."""
    for rank, (programs, explained) in enumerate(run_on_ranks(4, _tp_stage_collectives, timeout=300)):
        assert f"stage {rank // 2} runs as a lowered program on rank {rank}'s shards" in explained, explained
        assert "forward: 4 x all_reduce; backward: " in explained, explained
        assert len(programs) == 1, programs  # one signature: every micro-batch of 4 rows
        comms = programs[0]
        assert all(route == "all_reduce" for _, _, route in comms), comms
        assert sum(phase == "forward" for phase, _, _ in comms) == 4, comms
        backward = [where for phase, where, _ in comms if phase != "forward" and not where.startswith("gradient")]
        assert len(backward) == (3 if rank < 2 else 4), comms
        assert not any(where.startswith("gradient") for _, where, _ in comms), comms
        assert f"stage {rank // 2}: " in explained and "gradients stay partial sums" in explained, explained


def _dp_tp_stage() -> float:
    model, data = _model_and_batches("gpt", 8)
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    # a stage that is data and tensor parallel at once: its partial-sum gradients (layer norms, biases, the
    # tied embedding) are reduced over its 2 x 2 ranks in one all-reduce, tp and dp together
    meshes = [
        sf.Mesh("cpu", (1,), names=("tp",), ranks=[0]),
        sf.Mesh("cpu", (2, 2), names=("dp", "tp"), ranks=[1, 2, 3, 4]),
    ]
    pipeline = sf.Pipeline(micro_batches=2, schedule="1f1b", stage_meshes=meshes)
    mesh = sf.Mesh("cpu", (5,), names=("pp",))
    pm = sf.compile(
        model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, pipeline=pipeline, strategy="tp"
    )
    for i, (x, y) in enumerate(data):
        want, got = reference_step(ref, opt, x, y), pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (i, got, want)
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    return float(len(pm.partial))


def test_tensor_parallel_stage_with_data_parallel_rows_equals_plain_torch():
    partial = run_on_ranks(5, _dp_tp_stage, timeout=300)
    assert all(n > 0 for n in partial[1:]), partial  # the dp x tp stage leaves some gradients partial
    assert partial[0] == 0  # a one-rank stage has nothing to sum


class _WithUnused(torch.nn.Module):
    """A model with a layer and a buffer that forward never reaches (plain PyTorch: no gradient, no update)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6, 16)
        self.spare = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 5)
        self.register_buffer("seen", torch.arange(3.0))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return torch.nn.functional.cross_entropy(self.head(h), y)


def _unused_cases() -> list[str]:
    def decaying(ps):  # type: ignore[no-untyped-def]  # a zero gradient would still decay a parameter
        return torch.optim.AdamW(ps, lr=0.05, weight_decay=0.5, foreach=False)

    done = []
    for shape, names, strategy in [((2, 2), ("pp", "dp"), "dp"), ((2, 2), ("pp", "tp"), "tp")]:
        torch.manual_seed(0)
        model = _WithUnused()
        ref, gen = copy.deepcopy(model), torch.Generator().manual_seed(1)
        opt = decaying(ref.parameters())
        data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(3)]
        # the dp case's last backward in one pass (the matrix above splits it): both equal plain PyTorch
        pipeline = sf.Pipeline(split_points=["b"], micro_batches=2, split_backward=strategy != "dp")
        mesh = sf.Mesh("cpu", shape, names=names)
        opts = {"optimizer": decaying, "max_grad_norm": 0.5, "pipeline": pipeline, "strategy": strategy}
        pm = sf.compile(model, mesh, example_inputs=data[0], **opts)
        train_and_compare(pm, ref, opt, data)  # spare.* unchanged, seen saved
        assert set(pm.full_state_dict()) == set(ref.state_dict())
        done.append(strategy)
    return done


def test_parameters_forward_never_reaches_stay_as_plain_torch_leaves_them():
    """Unreached parameters and buffers are held (by the first stage) and saved, and get no gradient: the
    data-parallel buckets and tensor-parallel partial sums count which ranks had one, instead of reducing
    zeros that weight decay would then apply."""
    assert run_on_ranks(4, _unused_cases, timeout=300) == [["dp", "tp"]] * 4


class _CustomOps(torch.nn.Module):
    """Layers through a torch.library op with a registered backward (a fused kernel's stand-in), the second
    stage's with a weight edge: a boundary its split last backward runs in both passes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(6, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 5)
        self.gain_a, self.gain_b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = scaled(torch.relu(self.a(x)), self.gain_a)
        h = scaled(torch.relu(self.b(h)), self.gain_b)
        return torch.nn.functional.cross_entropy(self.head(h), y)


def _custom_op_case(trace: str) -> list[str]:
    torch.manual_seed(0)
    model = _CustomOps()
    ref, gen = copy.deepcopy(model), torch.Generator().manual_seed(1)
    opt = _adamw(ref.parameters())
    data = [(torch.randn(8, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(4)]
    pipeline = sf.Pipeline(split_points=["b"], micro_batches=2, schedule="1f1b")
    pm = sf.compile(
        model,
        sf.Mesh("cpu", (2, 2), names=("pp", "dp")),
        example_inputs=data[0],
        optimizer=_adamw,
        max_grad_norm=0.5,  # as reference_step clips
        pipeline=pipeline,
    )
    train_and_compare(pm, ref, opt, data[:3])
    pm.step(*data[3], trace=trace)
    return [e.name for e in pm.events if e.rank == torch.distributed.get_rank() and e.track == "compute"]


def test_a_model_with_custom_ops_splits_its_last_backward_and_equals_plain_torch(tmp_path: Path):
    ran = run_on_ranks(4, _custom_op_case, str(tmp_path / "t.json"), timeout=300)
    assert ran[:2] == [["F0", "F1", "B0", "B1"]] * 2  # stage 0 (pp is the first axis)
    assert ran[2:] == [["F0", "B0", "F1", "B1", "W1"]] * 2  # its input gradients went first


class _HalvedGradient(torch.nn.Module):
    """A linear layer whose output's gradient a tensor hook halves, registered in forward (or whose output
    keeps its gradient, ``retain_grad``)."""

    def __init__(self, retain: bool) -> None:
        super().__init__()
        self.lin, self.retain = torch.nn.Linear(16, 16), retain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if h.requires_grad and self.retain:
            h.retain_grad()
        elif h.requires_grad:
            h.register_hook(lambda g: g * 0.5)
        return torch.relu(h)


class _Hooked(torch.nn.Module):
    def __init__(self, retain: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(6, 16), _HalvedGradient(retain), torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(self.b(torch.relu(self.a(x)))), y)
