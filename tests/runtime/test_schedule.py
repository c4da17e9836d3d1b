"""Pipeline schedules, single process: the order each stage runs, the activation sets it keeps alive, and
the idle fraction a simulation of the orders gives against the formula (p - 1) / (m + p - 1)."""

from __future__ import annotations

import pytest

from shardflow.runtime.schedule import Action, bubble, in_flight, memory_peak, simulate, stage_order


def test_orders_of_a_four_stage_pipeline():
    assert " ".join(map(repr, stage_order("gpipe", 1, 4, 3))) == "F0 F1 F2 B0 B1 B2"
    assert " ".join(map(repr, stage_order("1f1b", 0, 4, 6))) == "F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5"
    assert " ".join(map(repr, stage_order("1f1b", 3, 4, 3))) == "F0 B0 F1 B1 F2 B2"
    assert " ".join(map(repr, stage_order("1f1b", 0, 4, 2))) == "F0 F1 B0 B1"  # fewer micro-batches than stages


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("micro_batches", [1, 2, 4, 7])
def test_every_micro_batch_once_and_idle_fraction_is_the_formula(schedule, stages, micro_batches):
    for s in range(stages):
        order = stage_order(schedule, s, stages, micro_batches)
        assert sorted((a.kind, a.micro_batch) for a in order) == sorted(
            (k, j) for k in "FB" for j in range(micro_batches)
        )
        assert all(order.index(type(a)("F", a.micro_batch)) < i for i, a in enumerate(order) if a.kind == "B")
        want = micro_batches if schedule == "gpipe" else min(stages - s, micro_batches)
        assert in_flight(order) == want
    formula = (stages - 1) / (micro_batches + stages - 1)  # written here, not shardflow's bubble(), to check both
    assert simulate(schedule, stages, micro_batches) == pytest.approx(formula)
    assert bubble(stages, micro_batches) == pytest.approx(formula)


def test_memory_peak_walks_the_order():
    """Activations of 10 bytes per micro-batch, gradients of 5 (cleared each step, made by the first
    backward), 3 of temporaries while a backward runs: GPipe peaks as its first backward starts, before any
    gradient exists; 1F1B at its second backward, with the gradients; summing gradients out of place adds
    to every backward after the first; a split last backward (``tail``) adds to that one alone."""
    gpipe = stage_order("gpipe", 0, 2, 4)
    peak, action, alive, grads = memory_peak(gpipe, 10, 5, 3)
    assert (peak, repr(action), alive, grads) == (43, "B0", 4, False)
    assert memory_peak(gpipe, 10, 50, 3)[:1] == (30 + 3 + 50 + 0,)  # big gradients: B1 (3 in flight) wins
    one_f = stage_order("1f1b", 0, 2, 4)  # F0 F1 B0 F2 B1 F3 B2 B3
    peak, action, alive, grads = memory_peak(one_f, 10, 5, 3)
    assert (peak, repr(action), alive, grads) == (28, "B1", 2, True)
    assert memory_peak(one_f, 10, 5, 3, accumulate=5)[0] == 33
    assert memory_peak(stage_order("gpipe", 0, 1, 1), 10, 50, 3)[:3][0] == 50  # the first backward's end
    # the last backward split in two passes holds 20 more: B3 (1 in flight) now beats B1 (2 in flight)
    peak, action, alive, grads = memory_peak(one_f, 10, 5, 3, tail=20, split=True)
    assert (peak, repr(action), alive, grads) == (10 + 3 + 20 + 5, "B3", 1, True)
    assert memory_peak(one_f, 10, 5, 3, tail=20)[0] == 28  # not split: no tail
    # one micro-batch split: its activations are alive while its second pass makes the gradients
    assert memory_peak(stage_order("gpipe", 0, 1, 1), 10, 50, 3, tail=2, split=True)[:3] == (60, Action("B", 0), 1)


def test_backward_twice_as_long_keeps_the_formula():
    assert simulate("1f1b", 4, 8, forward=1.0, backward=2.0) == pytest.approx((4 - 1) / (8 + 4 - 1))


def test_a_split_last_backward_hands_its_gradient_on_earlier():
    """One micro-batch, 2 stages, F=1, B=2 of which the weights' pass is 1 on stage 1: stage 0's backward
    starts at 3 instead of 4; the step spans 5 instead of 6 (idle 1 - 3/5 on each stage)."""
    assert simulate("1f1b", 2, 1, 1.0, 2.0) == pytest.approx(0.5)
    assert simulate("1f1b", 2, 1, 1.0, 2.0, weights=[0.0, 1.0]) == pytest.approx(0.4)
    # only the last backward splits: with 4 micro-batches 1F1B's tail shortens by the same 1; under GPipe
    # stage 0 is still busy with its previous backward when the gradient comes, so nothing changes
    for schedule, gain in (("1f1b", 1.0), ("gpipe", 0.0)):
        span = 4 * 3 / (1 - simulate(schedule, 2, 4, 1.0, 2.0))
        split = 4 * 3 / (1 - simulate(schedule, 2, 4, 1.0, 2.0, weights=[0.0, 1.0]))
        assert span - split == pytest.approx(gain), schedule


def test_bad_times_name_the_value():
    with pytest.raises(ValueError, match=r"forward must be one time >= 0, or one per stage \(2\), got \[1.0\]"):
        simulate("1f1b", 2, 4, forward=[1.0])
    with pytest.raises(ValueError, match=r"backward must be one time >= 0.*got -1.0"):
        simulate("1f1b", 2, 4, backward=-1.0)
    with pytest.raises(ValueError, match=r"weights \[0.0, 3.0\] must not exceed the backward.*\(2.0\)"):
        simulate("1f1b", 2, 4, 1.0, 2.0, weights=[0.0, 3.0])


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="'zigzag'"):
        stage_order("zigzag", 0, 2, 2)
    with pytest.raises(ValueError, match="stage 2 out of range for 2 stages"):
        stage_order("1f1b", 2, 2, 2)
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        stage_order("gpipe", 0, 2, 0)
