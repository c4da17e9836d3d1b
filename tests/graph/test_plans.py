"""Plans as values on real ranks: ``sf.plan(...)`` equals the compiled module's ``pm.plan``; a plan written
to JSON and read back compiles to bit-identical losses (CPU) for dp, tp, hybrid, ZeRO 1/2/3, recompute, a
pipeline and a pipeline of tensor-parallel stages; a plan edited by hand trains equal to plain PyTorch
with that layout, and a bad edit is a clear error; every option changed after the first step re-plans
(a new program, equal to serial still) or raises."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import operator

import pytest
import torch

import shardflow as sf
from shardflow.testing import run_on_ranks
from tests.graph.test_compile import _model_and_batches, reference_step, train_and_compare


def _adamw(ps):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(ps, lr=1e-2, eps=1e-6, foreach=False)


# (name, model kind, batch, mesh shape, axis names, sf.compile keywords): all on 4 ranks
ROUND_TRIPS = [
    ("dp", "mlp", 8, (4,), ("dp",), {"strategy": "dp"}),
    ("tp", "gpt", 4, (4,), ("tp",), {"strategy": "tp"}),
    ("hybrid", "gpt", 4, (2, 2), ("dp", "tp"), {"strategy": "hybrid"}),
    ("zero1", "mlp", 8, (4,), ("dp",), {"zero": 1}),
    ("zero2", "gpt", 4, (2, 2), ("dp", "tp"), {"strategy": "hybrid", "zero": 2}),
    ("zero3", "gpt", 4, (4,), ("dp",), {"zero": 3}),
    ("recompute", "gpt", 4, (2, 2), ("dp", "tp"), {"strategy": "hybrid", "recompute": True}),
    ("pipeline", "gpt", 4, (2, 2), ("pp", "dp"), {"pipeline": sf.Pipeline(micro_batches=2)}),
    ("pipeline-tp", "gpt", 4, (2, 2), ("pp", "tp"), {"strategy": "tp", "pipeline": sf.Pipeline(micro_batches=2)}),
]


def _round_trip(names: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    out = {}
    for name, kind, batch, shape, axes, kwargs in (c for c in ROUND_TRIPS if c[0] in names):
        model, data = _model_and_batches(kind, batch)
        mesh = sf.Mesh("cpu", shape, names=axes)
        planned = sf.plan(model, mesh, data[0], max_grad_norm=0.5, **kwargs)  # no compiling, no messages
        pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5, **kwargs)
        assert pm.plan == planned, name
        text = pm.plan.to_json()
        read = sf.ParallelPlan.from_json(text)
        assert read == pm.plan and read.to_json() == text, name
        # the mesh comes from the plan (made here, collectively): a plan is all a job needs beside the model
        again = sf.compile(model, plan=read, example_inputs=data[0], optimizer=_adamw)
        assert again.plan == pm.plan
        first = [pm.step(*b) for b in data[:3]]
        # and the plan read back is not just equal to itself: it trains equal to plain PyTorch
        ref = copy.deepcopy(model)
        opt = _adamw(ref.parameters())
        second = []
        for x, y in data[:3]:
            want, got = reference_step(ref, opt, x, y), again.step(x, y)
            assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (name, got, want)
            second.append(got)
        out[name] = (first, second)
    return out


@pytest.mark.parametrize("names", [["dp", "tp", "hybrid"], ["zero1", "zero2", "zero3", "recompute"]])
def test_a_plan_read_back_from_json_trains_bit_identically(names):
    for losses in run_on_ranks(4, _round_trip, names, timeout=400):
        for name in names:
            first, second = losses[name]
            assert first == second and all(math.isfinite(v) for v in first), (name, first, second)


def test_pipeline_plans_read_back_train_bit_identically():
    names = ["pipeline", "pipeline-tp"]
    for losses in run_on_ranks(4, _round_trip, names, timeout=400):
        for name in names:
            first, second = losses[name]
            assert first == second and all(math.isfinite(v) for v in first), (name, first, second)


def test_values_are_named_by_module_and_op():
    """Keys of intermediate values: the module that made the value and the op's place in its own forward;
    backward nodes get none (a plan forces forward values only)."""
    from shardflow.graph.lower import trace_step

    model, data = _model_and_batches("mlp", 4)
    nodes = list(trace_step(model, data[0]).graph.graph.nodes)
    keys = [n.meta["sf_key"] for n in nodes if "sf_key" in n.meta]
    assert keys[:5] == ["net.0/t.0", "net.0/addmm.0", "net.1/gelu.0", "net.2/t.0", "net.2/addmm.0"], keys
    assert "/nll_loss_forward.0" in keys and not any("backward" in k for k in keys), keys
    assert sum("backward" in str(n.target) for n in nodes) > 0  # the backward is in the graph, unnamed


def _edited(edit: str) -> str | None:
    """The MLP's dp plan with ``net.0.weight`` split over dp on its rows and the first layer's output forced
    replicated (an all-gather the strategy would not choose), trained against plain PyTorch."""
    model, data = _model_and_batches("mlp", 8)
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    raw = json.loads(sf.plan(model, mesh, data[0], max_grad_norm=0.5).to_json())
    raw["params"]["net.0.weight"] = dict.fromkeys(("sbp", "compute", "grad", "optim"), ["S(0)"])
    raw["values"] = {"net.0/addmm.0": ["B"]}
    if edit == "split dim":
        raw["params"]["net.2.weight"] = dict.fromkeys(("sbp", "compute", "grad", "optim"), ["S(5)"])
    elif edit == "mesh":
        raw["mesh"]["shape"] = [2, 1]
        raw["mesh"]["names"] = ["dp", "tp"]
    elif edit == "value key":
        raw["values"] = {"net.0/admm.0": ["B"]}
    plan = sf.ParallelPlan.from_json(json.dumps(raw))
    if edit == "given mesh":
        sf.compile(model, sf.Mesh("cpu", (2,), names=("tp",)), plan=plan, example_inputs=data[0], optimizer=_adamw)
    pm = sf.compile(model, plan=plan, example_inputs=data[0], optimizer=_adamw)
    assert tuple(pm.module.get_parameter("net.0.weight")._local.shape) == (8, 6)  # its 8 rows of 16
    ref = copy.deepcopy(model)
    train_and_compare(pm, ref, _adamw(ref.parameters()), data)
    program = next(iter(pm.programs.values()))
    return "\n".join(c.where for c in program.collectives)


def test_a_hand_edited_plan_trains_equal_to_serial():
    for where in run_on_ranks(2, _edited, "none", timeout=200):
        assert "aten.addmm.default (forced by the plan)" in where, where


@pytest.mark.parametrize(
    "edit, error",
    [
        ("split dim", "parameter 'net.2.weight' of shape \\(12, 16\\).*splits dim 5"),
        ("mesh", "'net.0.weight'.*has 1 entries; the mesh \\('dp', 'tp'\\) has 2 axes"),
        ("value key", "value 'net.0/admm.0'.*no such value.*'net.0/addmm.0'"),
        ("given mesh", "the plan is for a cpu mesh \\(dp=2\\), but the mesh given is Mesh\\('cpu', tp=2\\)"),
    ],
)
def test_a_bad_edit_is_a_clear_error(edit, error):
    with pytest.raises(Exception, match=error):
        run_on_ranks(2, _edited, edit, timeout=200)


def _knobs() -> list[str]:
    """Every option changed after the first step, with each step checked against plain PyTorch."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("shardflow.plan").addHandler(handler)
    logging.getLogger("shardflow.plan").setLevel(logging.INFO)
    model, data = _model_and_batches("gpt", 4)
    data = data * 2
    ref = copy.deepcopy(model)
    opt = _adamw(ref.parameters())
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, max_grad_norm=0.5)
    clip = [0.5]
    steps = iter(data)

    def step() -> None:
        x, y = next(steps)
        want, got = reference_step(ref, opt, x, y, clip[0]), pm.step(x, y)
        assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (got, want)

    def program():  # type: ignore[no-untyped-def]
        return next(iter(pm.programs.values()))

    vehicles: list[str] = []
    module = importlib.import_module("shardflow.graph.static_step")
    actors = module.UpdateActors

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        vehicles.append(args[4])  # the vehicle the step runs its updates on
        return actors(*args, **kwargs)

    module.UpdateActors = spy
    step()
    first = program()
    pm.bucket_bytes = 1  # one bucket per gradient
    step()
    assert program() is not first and len(program().units) > len(first.units), (program().units, first.units)
    pm.updates = "inline"
    step()
    assert vehicles == ["loop", "loop", "inline"], vehicles  # the step ran the new vehicle
    pm.arena = "all"
    step()
    assert program().memory.arena > 0 and first.memory.arena == 0
    pm.max_grad_norm = clip[0] = 0.05
    step()
    pm.recompute = ["transformer.h.0"]
    step()
    assert pm.recomputed == ["transformer.h.0"] and "forward" in pm.module.transformer.h[0].__dict__
    pm.arena = False  # the arena places the lowered program's temporaries: eager steps refuse it
    pm.static = False
    step()
    assert not pm.programs  # op by op on GlobalTensors
    pm.static = True
    pm.inductor = True  # lowered again and wrapped by torch.compile (not run here: it compiles for minutes)
    program_run = pm.program(pm._inputs(data[0])).run
    assert program_run.__module__ == "shardflow.runtime.inductor", program_run  # runtime/inductor.py's wrapper
    errors = []
    for attempt in (
        lambda: setattr(pm, "zero_axis", 0),
        lambda: setattr(pm, "layouts", {}),
        lambda: setattr(pm, "input_sbp", ()),
        lambda: pm.replan(params=pm.plan.params),
        lambda: setattr(pm, "cuda_graphs", True),
        lambda: setattr(pm, "plan", pm.plan.replace(bucket_bytes=7)),
        lambda: operator.setitem(pm.layouts, "transformer.wte.weight", (sf.S(0),)),
        lambda: setattr(pm, "recompute", ["transformer.h.9"]),
    ):
        try:
            attempt()
        except (AttributeError, ValueError, TypeError) as e:
            errors.append(str(e))
    module.UpdateActors = actors
    state = pm.full_state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)
    return [r.getMessage() for r in records] + errors


def test_every_option_changed_after_a_step_replans_or_raises():
    said = run_on_ranks(2, _knobs, timeout=300)[0]
    for change in (
        "bucket_bytes: 4194304 -> 1",
        "updates: 'loop' -> 'inline'",
        "arena: False -> 'all'",
        "arena: 'all' -> False",
        "max_grad_norm: 0.5 -> 0.05",
        "recompute: () -> ('transformer.h.0',)",
        "static: True -> False",
        "inductor: False -> True",
    ):
        assert any(change in s and "re-planned" in s for s in said), (change, said)
    assert sum("is fixed by the plan" in s for s in said) == 3, said
    assert any("['params'] are fixed once the module is built" in s for s in said), said
    assert any("cuda_graphs=True replays a step on one GPU" in s for s in said), said
    assert any("property 'plan'" in s and "has no setter" in s for s in said), said  # pm.plan is what runs
    assert any("does not support item assignment" in s for s in said), said  # layouts are read-only
    assert any("recompute names ['transformer.h.9'], not modules of the model" in s for s in said), said


def _pipeline_knobs() -> list[str]:
    model, data = _model_and_batches("gpt", 4)
    mesh = sf.Mesh("cpu", (2,), names=("pp",))
    pm = sf.compile(model, mesh, example_inputs=data[0], optimizer=_adamw, pipeline=sf.Pipeline(micro_batches=2))
    pm.step(*data[0])
    before = len(pm.buckets.members)
    pm.bucket_bytes = 1
    assert len(pm.buckets.members) > before or not pm.params
    assert any(pm._splits_stage(s) for s in range(pm.stages))  # the last stage's last backward runs in two passes
    pm.split_backward = False
    assert pm.plan.pipeline.split_backward is False and pm.pipeline.split_backward is False
    assert not any(pm._splits_stage(s) for s in range(pm.stages))
    pm.step(*data[1])
    errors = []
    for name in ("static", "updates", "inductor", "cuda_graphs", "strategy"):
        try:
            setattr(pm, name, getattr(pm, name))
        except AttributeError as e:
            errors.append(str(e))
    return errors


def test_pipeline_options_replan_or_raise():
    for errors in run_on_ranks(2, _pipeline_knobs, timeout=200):
        assert len(errors) == 5 and all(e.startswith("pm.") for e in errors), errors
