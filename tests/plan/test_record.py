"""``ParallelPlan`` in one process: a value (equal, hashable, JSON round trip), built without process groups,
and every entry a hand edit can get wrong refused with a message naming it."""

from __future__ import annotations

import json

import pytest
import torch

import shardflow as sf
from shardflow.models import GPT, GPTConfig
from shardflow.plan import MeshSpec, ParamPlan

MESH = sf.Mesh("cpu", (2, 2), names=("dp", "tp"))  # no process group here: a description only


def _gpt() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    x = torch.randint(0, 32, (4, 8))
    return model, (x, torch.roll(x, -1, 1))


@pytest.fixture(scope="module")
def hybrid() -> sf.ParallelPlan:
    model, data = _gpt()
    return sf.plan(model, MESH, data, strategy="hybrid", zero=1, recompute=True, max_grad_norm=1.0)


def test_a_plan_is_a_value(hybrid):
    model, data = _gpt()
    again = sf.plan(model, MESH, data, strategy="hybrid", zero=1, recompute=True, max_grad_norm=1.0)
    assert again == hybrid and hash(again) == hash(hybrid) and again is not hybrid
    assert len({hybrid, again}) == 1  # usable as a dict key / set member
    other = sf.plan(model, MESH, data, strategy="hybrid", zero=2, recompute=True, max_grad_norm=1.0)
    assert other != hybrid and other.zero == 2 and hybrid.zero == 1
    with pytest.raises(AttributeError):
        hybrid.bucket_bytes = 1  # type: ignore[misc]  # frozen


def test_json_round_trip_is_equal_and_readable(hybrid):
    text = hybrid.to_json()
    raw = json.loads(text)
    assert raw["version"] == 1 and raw["mesh"]["names"] == ["dp", "tp"]
    # Megatron's column-parallel fused projection, and ZeRO-1's optimizer piece on dp, as people write them
    attn = raw["params"]["transformer.h.0.attn.c_attn.weight"]
    assert attn["sbp"] == ["B", "Blocked(0, 3)"] and attn["optim"] == ["S(1)", "Blocked(0, 3)"]
    assert raw["recompute"] == ["transformer.h.0", "transformer.h.1"]
    assert sf.ParallelPlan.from_json(text) == hybrid


def test_explain_names_every_decision(hybrid):
    text = hybrid.explain()
    for part in [
        "strategy 'hybrid'",
        "ZeRO stage 1",
        "recomputed in backward: transformer.h.0, transformer.h.1",
        "gradients clipped to norm 1.0",
        "transformer.h.0.mlp.c_fc.weight",
        "(B, S(0))  (optim (S(1), S(0)))",
    ]:
        assert part in text, (part, text)


def test_zero_is_read_from_the_layouts():
    model, data = _gpt()
    mesh = sf.Mesh("cpu", (4,), names=("dp",))
    stages = [sf.plan(model, mesh, data, zero=k) for k in (0, 1, 2, 3)]
    assert [p.zero for p in stages] == [0, 1, 2, 3]
    assert stages[3].zero_axis == 0 and stages[2].zero_axis is None
    w = "transformer.h.0.mlp.c_fc.weight"
    assert stages[3].params[w] == ParamPlan((sf.S(0),), (sf.B,), (sf.S(0),), (sf.S(0),))
    assert stages[2].params[w] == ParamPlan((sf.B,), (sf.B,), (sf.S(0),), (sf.S(0),))
    assert stages[1].params[w] == ParamPlan((sf.B,), (sf.B,), (sf.B,), (sf.S(0),))


def test_a_pipeline_plan_names_its_cut():
    model, data = _gpt()
    mesh = sf.Mesh("cpu", (2, 2), names=("pp", "tp"))
    plan = sf.plan(model, mesh, data, strategy="tp", pipeline=sf.Pipeline(micro_batches=2))
    assert plan.pipeline is not None and plan.pipeline.split_points == ("transformer.h.1",)  # balanced by FLOPs
    assert plan.inputs == ()  # a pipeline cuts its inputs by rows
    assert plan.params["transformer.h.0.mlp.c_fc.weight"].sbp == (sf.B, sf.S(0))  # over each stage's (dp, tp)
    assert sf.ParallelPlan.from_json(plan.to_json()) == plan


def _edited(plan: sf.ParallelPlan, edit) -> str:  # type: ignore[no-untyped-def]
    raw = json.loads(plan.to_json())
    edit(raw)
    return json.dumps(raw)


def _param(name: str, **layouts: list[str]):  # type: ignore[no-untyped-def]
    return lambda r: r["params"].__setitem__(name, layouts)


LN = "transformer.ln_f.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.update(version=9), "plan schema version 9; this shardflow reads version 1"),
        (lambda r: r.update(version=True), "plan schema version True"),
        (lambda r: r.update(stratgey="dp"), "plan: unknown keys \\['stratgey'\\]"),
        (lambda r: r.pop("params"), "plan: missing \\['params'\\]"),
        (lambda r: r["execution"].update(static="false"), "execution.static: a boolean .*'false'"),
        (lambda r: r["execution"].update(updates="sometimes"), "execution.updates 'sometimes'"),
        (lambda r: r["execution"].update(arena=1), "execution.arena 1"),
        (lambda r: r["execution"].update(threads=2), "execution: unknown keys \\['threads'\\]"),
        (lambda r: r.update(recompute="transformer.h.0"), "recompute: a list, got 'transformer.h.0'"),
        (lambda r: r.update(bucket_bytes=0), "bucket_bytes \\(0,\\): positive integers"),
        (lambda r: r.update(max_grad_norm="1.0"), "max_grad_norm '1.0': a number or null"),
        (lambda r: r["mesh"].update(ranks=[0, 1, 2]), "mesh ranks \\[0, 1, 2\\]: 4 distinct non-negative ranks"),
        (lambda r: r["mesh"].update(names="dp"), "mesh.names: a list, got 'dp'"),
        (lambda r: r["inputs"][0].__setitem__(0, "S(x)"), "inputs\\[0\\]\\[0\\]: 'S\\(x\\)' is not a placement"),
        (
            lambda r: r["inputs"][0].__setitem__(0, "Blocked(0, 1)"),
            "inputs\\[0\\]\\[0\\]: Blocked\\(dim, blocks\\) needs",
        ),
        (_param("transformer.wte.weight", sbp=["B"]), "'transformer.wte.weight'.*has 1 entries; the mesh"),
        (_param(LN, sbp=["P", "B"]), f"'{LN}'.*is partial"),
        (_param(LN, sbp=["B", "B"], optimizer=["S(0)", "B"]), f"params\\['{LN}'\\]: unknown keys \\['optimizer'\\]"),
        (
            _param(LN, sbp=["B", "B"], grad=["B", "S(0)"]),
            "grad must be sbp's gradient layout, or the optimizer's piece",
        ),
        (_param(LN, sbp=["S(0)", "Blocked(0, 3)"]), "splits one dim plainly and in blocks"),
        (_param(LN, sbp=["B", "B"], compute=["S(0)", "B"]), "compute may differ from sbp only where sbp is S\\(i\\)"),
    ],
)
def test_a_bad_edit_is_named(hybrid, edit, message):
    with pytest.raises(sf.PlanError, match=message):
        sf.ParallelPlan.from_json(_edited(hybrid, edit))


def test_not_json_and_replace_checks(hybrid):
    with pytest.raises(sf.PlanError, match="a plan is JSON"):
        sf.ParallelPlan.from_json("strategy = 'dp'")
    with pytest.raises(sf.PlanError, match="execution.arena 'some'"):
        hybrid.replace(arena="some")
    with pytest.raises(sf.PlanError, match="a plan has no entry \\['zero'\\].*apply_zero"):
        hybrid.replace(zero=2)
    with pytest.raises(sf.PlanError, match="static=False does not run"):
        hybrid.replace(static=False, arena=True)
    unhashable = hybrid.replace(values={"net.0/addmm.0": [sf.B, sf.B]}, recompute=["transformer.h.0"])
    assert hash(unhashable) and unhashable.values["net.0/addmm.0"] == (sf.B, sf.B)  # lists and dicts normalised
    assert hybrid.replace(max_grad_norm=1) == hybrid and hybrid.replace(max_grad_norm=1).to_json() == hybrid.to_json()
    assert hybrid.replace(bucket_bytes=1024).bucket_bytes == 1024
    assert hybrid.replace(updates="inline").execution.updates == "inline"


def test_a_plan_checked_against_the_model(hybrid):
    """What only the model can tell: names, shapes, inputs (checked by sf.compile before anything runs)."""
    from shardflow.plan import check_model

    model, data = _gpt()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    check_model(hybrid, shapes, 2)
    raw = json.loads(hybrid.to_json())
    raw["params"]["transformer.ln_f.weight"] = dict.fromkeys(("sbp", "compute", "grad", "optim"), ["B", "S(3)"])
    with pytest.raises(sf.PlanError, match="'transformer.ln_f.weight' of shape \\(16,\\).*splits dim 3"):
        check_model(sf.ParallelPlan.from_json(json.dumps(raw)), shapes, 2)
    fewer = hybrid.replace(params=type(hybrid.params)({n: p for n, p in hybrid.params.items() if "wte" not in n}))
    with pytest.raises(sf.PlanError, match="missing \\['transformer.wte.weight'\\]"):
        check_model(fewer, shapes, 2)
    with pytest.raises(sf.PlanError, match="lays out 2 inputs; the model was given 3"):
        check_model(hybrid, shapes, 3)


def test_mesh_spec_is_a_description(hybrid):
    spec = MeshSpec.of(MESH)
    assert spec == MeshSpec("cpu", (2, 2), ("dp", "tp"), (0, 1, 2, 3)) and spec.size == 4
    assert str(spec) == "cpu mesh (dp=2, tp=2)"
    model, data = _gpt()  # planning from the description alone: the plan a real mesh gets
    assert sf.plan(model, spec, data, strategy="hybrid", zero=1, recompute=True, max_grad_norm=1.0) == hybrid


def test_every_entry_survives_json():
    model, data = _gpt()
    a = sf.plan(model, MESH, data, strategy="hybrid", zero=3, recompute=["transformer.h.1"], max_grad_norm=0.3)
    a = a.replace(
        values={"transformer.h.0.mlp.c_fc/addmm.0": (sf.B, sf.S(2))},
        bucket_bytes=1234,
        updates="inline",
        arena="all",
        inductor=True,
    )
    stages = [sf.Mesh("cpu", (1,), names=("dp",), ranks=[0]), sf.Mesh("cpu", (3,), names=("dp",), ranks=[1, 2, 3])]
    piped = sf.Pipeline(stage_meshes=stages, micro_batches=3, schedule="gpipe", split_backward=False)
    b = sf.plan(model, sf.Mesh("cpu", (4,), names=("dp",)), data, pipeline=piped)
    c = sf.plan(model, MESH, data).replace(static=False)
    for plan in (a, b, c):
        assert sf.ParallelPlan.from_json(plan.to_json()) == plan, plan.explain()
    assert b.pipeline is not None and b.pipeline.stage_meshes is not None and b.pipeline.stage_meshes[1].size == 3
    assert "over each stage's (dp, tp) grid" in b.explain() and "inputs:" not in b.explain()


def test_one_layout_is_one_edit():
    """A parameter's compute, grad and optim layouts follow its sbp unless written: changing sbp alone is a
    valid plan (here c_fc split on its other dim over tp, ZeRO-1's piece left as it was written)."""
    model, data = _gpt()
    raw = json.loads(sf.plan(model, MESH, data, strategy="hybrid").to_json())
    assert raw["params"]["transformer.h.0.mlp.c_fc.weight"] == {"sbp": ["B", "S(0)"]}
    raw["params"]["transformer.h.0.mlp.c_fc.weight"]["sbp"] = ["B", "S(1)"]
    edited = sf.ParallelPlan.from_json(json.dumps(raw))
    assert edited.params["transformer.h.0.mlp.c_fc.weight"] == ParamPlan.plain((sf.B, sf.S(1)))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"micro_batches": 0}, "pipeline.micro_batches \\(0,\\): positive integers"),
        ({"schedule": "zigzag"}, "pipeline.schedule 'zigzag'"),
        ({"split_points": ()}, "0 split points \\[\\] make 1 stages, but mesh axis 'pp' has 2 ranks: give 1 split"),
        ({"split_points": "transformer.h.1"}, "pipeline.split_points 'transformer.h.1': a list of strings"),
    ],
)
def test_a_pipeline_entry_that_cannot_run_is_named(change, message):
    import dataclasses

    model, data = _gpt()
    plan = sf.plan(model, sf.Mesh("cpu", (2, 2), names=("pp", "dp")), data, pipeline=sf.Pipeline(micro_batches=2))
    assert plan.pipeline is not None
    with pytest.raises(sf.PlanError, match=message):
        plan.replace(pipeline=dataclasses.replace(plan.pipeline, **change))
    with pytest.raises(sf.PlanError, match="execution.arena cannot be combined with this pipeline"):
        plan.replace(arena=True)  # a data-parallel stage places no temporaries: refused, not ignored
    with pytest.raises(sf.PlanError, match="strategy 'dp' gives the stages no tp axis"):
        plan.replace(params={n: ParamPlan.plain((sf.B, sf.S(0))) for n in plan.params})
