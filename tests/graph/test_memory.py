"""Static memory prediction: ``pm.memory()`` against what the profiler measures for a real step, and
``memory_limit`` refusing a plan before it runs with a fix that the test applies and sees fit.

The measurement (shardflow/testing/memory.py) does not ask the planner: it sums the profiler's allocation
and free events of a step on top of the storages alive before it."""

from __future__ import annotations

import ast
import copy
import functools
import re
from typing import Any

import pytest

import shardflow as sf
from shardflow.testing import run_on_ranks
from shardflow.testing.memory import measure_step_peak, memory_case
from tests.graph.test_memory_fixes import _measured


def _predict_and_measure(kind: str, strategy: str) -> tuple[int, int, str]:
    model, data = memory_case(kind)
    pm = sf.compile(model, sf.Mesh("cpu", (2,), names=(strategy,)), example_inputs=data, strategy=strategy)
    report = pm.memory()
    pm.step(*data)  # the optimizer's state exists from here on, as the prediction assumes
    measured, _ = measure_step_peak(pm, *data)
    return report.peak, measured, str(report)


# NOTE: the cases here agree within 1%, checked at the 10%, but for the GPT under tp, whose
# measurement swings between runs by up to 5% (gloo's staging blocks, allocated on its own threads, counted
# for their moment). The CNN's peak is inside the batch-norm backward that computes global-batch
# statistics: its temporaries are priced by WORKSPACE.
@pytest.mark.parametrize("kind, strategy", [("mlp", "dp"), ("mlp", "tp"), ("gpt", "dp"), ("gpt", "tp"), ("cnn", "dp")])
def test_predicted_peak_matches_measured(kind, strategy):
    for predicted, measured, text in run_on_ranks(2, _predict_and_measure, kind, strategy, timeout=300):
        assert abs(measured - predicted) <= 0.1 * measured, (predicted, measured, text)
        assert "predicted peak on rank" in text and "largest at the peak" in text


def named_fixes(message: str) -> dict[str, object]:
    """The ``name=value`` changes a MemoryPlanError says fit, parsed from its text as a user would apply them."""
    fixes = {}
    for line in message.split("Changes and their predicted peaks")[1].splitlines()[1:]:
        named = re.fullmatch(r"\s*(\w+)=([^ :]+)( \(.*\))?: .* \(fits\)", line)
        if named:
            fixes[named[1]] = ast.literal_eval(named[2])
    return fixes


def _compile_copy(model: Any, mesh: sf.Mesh, data: Any, **kwargs: Any) -> Any:
    return sf.compile(copy.deepcopy(model), mesh, example_inputs=data, **kwargs)


def _refused_then_fixed() -> tuple[str, dict[str, int]]:
    """Refused under 20 MiB (a fixed figure, not the planner's), then every ``name=value`` change the message
    says fits, parsed from it, compiled under the same limit, stepped and measured (largest rank)."""
    model, data = memory_case("mlp")
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    with pytest.raises(sf.MemoryPlanError) as err:
        sf.compile(model, mesh, example_inputs=data, strategy="dp", memory_limit="20MiB")
    message = str(err.value)
    assert "rank 0 would peak at" in message and "strategy='tp'" in message, message
    assert "zero=2 (ZeRO stage 2" in message and "zero=3 (ZeRO stage 3" in message, message
    peaks = {}
    for name, value in named_fixes(message).items():
        change: dict[str, Any] = {"strategy": "dp", name: value}
        build = functools.partial(_compile_copy, model, mesh, data, memory_limit="20MiB", **change)
        peaks[f"{name}={value!r}"] = _measured(build, *data)[0]
    return message, peaks


def test_plan_over_limit_is_refused_before_running_and_the_named_fix_fits():
    for message, peaks in run_on_ranks(2, _refused_then_fixed, timeout=300):
        assert peaks, message  # some change is said to fit
        for fix, measured in peaks.items():
            assert measured <= 20 * 2**20, (fix, measured, message)


def test_bad_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="memory_limit"):
        sf.runtime.memory.parse_bytes("lots")
    assert sf.runtime.memory.parse_bytes("1.5 GiB") == int(1.5 * 2**30)


def _default_limit_refuses() -> str:
    import importlib

    compiling = importlib.import_module("shardflow.graph.compile")  # the module (the package exports the function)

    model, data = memory_case("mlp")
    mesh = sf.Mesh("cpu", (2,), names=("dp",))
    saved = compiling.device_limit
    # what a GPU would report as free (the default limit applies to CUDA meshes; this one is told 20 MiB)
    compiling.device_limit = lambda device_type: 20 * 2**20  # type: ignore[assignment]
    try:
        with pytest.raises(sf.MemoryPlanError) as err:
            sf.compile(model, mesh, example_inputs=data, strategy="dp")
    finally:
        compiling.device_limit = saved  # type: ignore[assignment]
    return str(err.value)


def test_the_default_limit_refuses_and_prices_other_plans_without_their_own_verdict():
    # the other strategies and ZeRO stages are compiled to be priced: they take no default limit of their own,
    # which made each refuse in turn and price the first again, without end
    for message in run_on_ranks(2, _default_limit_refuses, timeout=300):
        assert "strategy='tp'" in message and "zero=3 (ZeRO stage 3" in message, message
