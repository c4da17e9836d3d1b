"""Mutation check of the test suite: each mutant plants one named defect in a copy of the repository and
runs the tests that must catch it; a mutant whose tests still pass means a promise nobody checks.

Each mutant replaces one exact snippet (it must occur once) in one file of the copy; the copy is imported
by its tests and by every rank and job they start (``PYTHONPATH`` and pytest's ``pythonpath``). Exit status 1
if a mutant survives or a snippet is missing, so a refactor that moves a snippet is noticed here.

    .venv/bin/python tools/mutants.py [--only NAME,...] [--list]

The mutants' snippets are checked in the default suite (tests/test_mutants.py), so they stay findable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("shardflow", "tests", "examples", "benchmarks", "tools", "pyproject.toml", "README.md", "BENCHMARKS.md")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact snippet, found once
    new: str
    tests: tuple[str, ...]  # pytest node ids; at least one must fail


MEMORY = "tests/graph/test_memory.py::test_predicted_peak_matches_measured_on_every_rank"
PROMISES = "tests/graph/test_promises.py"

MUTANTS = [
    Mutant(
        "the planner forgets a ZeRO-2 bucket's packed send buffers",
        "shardflow/graph/ir/buckets.py",
        'ir.store(handle, bucket.nbytes + packed, f"{label} ({phase})")',
        'ir.store(handle, bucket.nbytes, f"{label} ({phase})")',
        (f"{MEMORY}[gpt-dp4-dp-zero2]",),
    ),
    Mutant(
        "the planner forgets an all-reduce bucket's buffer",
        "shardflow/graph/ir/buckets.py",
        'ir.store(handle, bucket.nbytes, f"gradient bucket of {len(names)} ({phase})")',
        'ir.store(handle, 0, f"gradient bucket of {len(names)} ({phase})")',
        (f"{MEMORY}[mlp-dp2-dp]", f"{MEMORY}[mlp-dp4-dp]"),
    ),
    Mutant(
        "ZeRO-2 buckets priced without gloo's copy of the packed buffers",
        "shardflow/graph/ir/buckets.py",
        'packed = bucket.nbytes * len(key.ranks) * (2 if mesh.device_type == "cpu" else 1)',
        "packed = bucket.nbytes * len(key.ranks)",
        (f"{MEMORY}[gpt-dp4-dp-zero2]",),
    ),
    Mutant(
        "a pipeline stage keeps the other stages' parameters (the cut's cycles not collected)",
        "shardflow/runtime/pipeline.py",
        "        gc.collect()\n",
        "",
        (f"{MEMORY}[gpt-pp2-dp-gpipe-m4]", f"{MEMORY}[gpt-pp2-dp-1f1b-m4]"),
    ),
    Mutant(
        "a tensor-parallel stage keeps the whole values of its shards",
        "shardflow/runtime/tensor_stage.py",
        "p.data = p.data.new_empty(0)",
        "pass",
        (f"{MEMORY}[gpt-pp2xtp2-tp-1f1b-m4]",),
    ),
    Mutant(
        "the measurer skips allocations on other threads",
        "shardflow/testing/memory.py",
        "if rec.allocator == AllocatorType.POSIX_MEMALIGN:",
        "if rec.allocator == AllocatorType.POSIX_MEMALIGN and rec.tid == 1:",
        ("tests/testing/test_memory.py",),
    ),
    Mutant(
        "ZeRO-2 leaves gradients whole",
        "shardflow/graph/optimizer_pieces.py",
        "grad = entry.grad if entry.grad != grad_sbp(entry.compute) else None",
        "grad = None",
        ("tests/graph/test_zero.py::test_zero1_and_zero2_memory_follow_the_formulas",),
    ),
    Mutant(
        "hints= ignored",
        "shardflow/graph/transforms/__init__.py",
        "plan = apply_hints(plan, hints, shapes)",
        "pass",
        (f"{PROMISES}::test_hints_are_applied_and_train_equal_to_plain_torch",),
    ),
    Mutant(
        "input_sbp ignored",
        "shardflow/graph/transforms/__init__.py",
        "plan = apply_input_sbp(plan, input_sbp, len(example_inputs))",
        "pass",
        (
            f"{PROMISES}::test_replicated_inputs_under_dp_train_equal_to_plain_torch",
            f"{PROMISES}::test_inputs_split_on_the_sequence_dim_train_equal_to_plain_torch",
        ),
    ),
    Mutant(
        "recompute='auto' picks one block too many",
        "shardflow/graph/compile.py",
        "pm.set_recompute(every[:lo])",
        "pm.set_recompute(every[: lo + 1])",
        ("tests/graph/test_recompute.py::test_auto_recomputes_the_fewest_blocks_found_by_brute_force",),
    ),
    Mutant(
        "recompute globs ignored",
        "shardflow/graph/transforms/__init__.py",
        "plan = apply_recompute(plan, model, recompute)",
        "apply_recompute(plan, model, recompute)",
        (f"{PROMISES}::test_recompute_module_globs_equal_plain_torch",),
    ),
    Mutant(
        "eager mode (pm.static = False) ignored",
        "shardflow/graph/parallel_module.py",
        "        if self.static:\n            gins = self._inputs(inputs)",
        "        if True:\n            gins = self._inputs(inputs)",
        (f"{PROMISES}::test_eager_adamw_steps_with_clipping_equal_plain_torch",),
    ),
    Mutant(
        "a refusal calls a fix fitting that does not",
        "shardflow/graph/compile.py",
        "{'fits' if b <= limit else 'does not fit'}",
        "{'fits' if b <= 2 * limit else 'does not fit'}",
        ("tests/graph/test_memory.py::test_plan_over_limit_is_refused_before_running_and_the_named_fix_fits",),
    ),
    Mutant(
        "the half-batch fix priced on the whole batch",
        "shardflow/graph/compile.py",
        'fixes.append((_largest(pm.memory(*half)), f"a batch of',
        'fixes.append((_largest(pm.memory(*plain)), f"a batch of',
        ("tests/graph/test_memory_fixes.py::test_half_the_batch_that_the_refusal_prices_fits_when_run",),
    ),
    Mutant(
        "a pipeline's activations under-priced",
        "shardflow/runtime/pipeline_memory.py",
        "act = lowered.saved_bytes + sum(",
        "act = lowered.saved_bytes // 4 + sum(",
        ("tests/runtime/test_pipeline_memory.py::test_a_pipeline_over_its_limit_is_refused_with_the_fix",),
    ),
    Mutant(
        "a snapshot's optimizer state not restored",
        "shardflow/graph/parallel_module.py",
        'self.optimizer.load_state_dict({"state": state, "param_groups": groups})',
        'self.optimizer.load_state_dict({"state": {}, "param_groups": groups})',
        ("tests/checkpoint/test_reshard_load.py",),
    ),
    Mutant(
        "shardflow train ignores resume=<path>",
        "shardflow/train/loop.py",
        "pm.load(cfg.resume)",
        "pm.load(snapshots(os.path.dirname(cfg.resume))[-1][1])",
        ("tests/train/test_train_keys.py::test_resume_from_a_given_snapshot_path_continues_bit_identical",),
    ),
    Mutant(
        "shardflow train ignores zero",
        "shardflow/train/loop.py",
        "zero=cfg.zero,",
        "zero=0,",
        ("tests/train/test_train_keys.py::test_zero_trains_like_plain_torch_with_parameters_split_over_dp",),
    ),
    Mutant(
        "shardflow train ignores memory_limit",
        "shardflow/train/loop.py",
        "limit = cfg.memory_limit or None",
        "limit = None",
        ("tests/train/test_train_keys.py::test_a_memory_limit_too_small_is_refused_before_training",),
    ),
    Mutant(
        "MFU over one device's peak, not the job's",
        "shardflow/train/loop.py",
        "meter.devices = dist.get_world_size()",
        "meter.devices = 1",
        (
            "tests/train/test_train_keys.py::test_every_log_line_shows_the_counted_flop_rate_and_the_mfu_over_the_job_s_peak",
        ),
    ),
    Mutant(
        "each rank's FLOPs counted on the global shapes",
        "shardflow/graph/ir/op_call.py",
        "flat[i] = TensorMeta(tuple(local_shape(m.shape, need, lp.mesh.shape, lp.coord)), m.dtype)",
        "flat[i] = TensorMeta(tuple(m.shape), m.dtype)",
        ("tests/graph/test_flops.py::test_each_rank_counts_what_it_computes",),
    ),
    Mutant(
        "a recomputed forward counted as model work",
        "shardflow/ops/flop_count.py",
        'if phase == "recompute":  # a checkpointed forward again',
        'if phase == "never":  # a checkpointed forward again',
        ("tests/graph/test_flops.py::test_every_plan_counts_the_plain_model_s_step",),
    ),
    Mutant(
        "a capture error names the root module, not the failing one",
        "shardflow/runtime/capture_errors.py",
        'at = max((i for i, f in enumerate(frames) if id(f.frame.f_locals.get("self")) in names), default=-1)',
        'at = min((i for i, f in enumerate(frames) if id(f.frame.f_locals.get("self")) in names), default=-1)',
        ("tests/graph/test_capture_errors.py::test_a_rejecting_fake_kernel_names_the_module_the_op_and_the_way_out",),
    ),
    Mutant(
        "the restart test's fault lands after the last step",
        "tests/cli/test_faults.py",
        '_job_cmd(tmp_path, "step", 5, "--steps", "8"',
        '_job_cmd(tmp_path, "step", 8, "--steps", "8"',
        ("tests/cli/test_faults.py::test_with_restarts_a_killed_worker_rejoins_and_training_continues",),
    ),
    Mutant(
        "a restarted job resumes from its first snapshot, not its last",
        "shardflow/train/loop.py",
        "pm.load(found[-1][1])",
        "pm.load(found[0][1])",
        ("tests/cli/test_faults.py::test_with_restarts_a_killed_worker_rejoins_and_training_continues",),
    ),
    Mutant(
        "sf.init ignores its collective timeout",
        "shardflow/comm/init.py",
        "td = _timeout = _as_timedelta(timeout)",
        "td = _timeout = DEFAULT_TIMEOUT",
        ("tests/comm/test_timeout.py::test_a_stuck_peer_fails_the_job_by_the_configured_timeout",),
    ),
    Mutant(
        "a ring all-reduce priced as moving half its bytes",
        "shardflow/boxing/plan.py",
        '"all_reduce": 2 * (k - 1) * inb // k,',
        '"all_reduce": (k - 1) * inb // k,',
        ("tests/boxing/test_plan.py::test_collective_bytes_and_seconds_follow_the_ring_formulas",),
    ),
    Mutant(
        "a plan's forced value layouts ignored",
        "shardflow/graph/ir/op_call.py",
        "if node in lp.forced and outs[0] != lp.forced[node]:",
        "if False:",
        ("tests/graph/test_plans.py::test_a_hand_edited_plan_trains_equal_to_serial",),
    ),
    Mutant(
        "a changed option keeps the old programs",
        "shardflow/graph/parallel_module.py",
        "        self._plan = new\n        self.programs.clear()",
        "        self._plan = new",
        ("tests/graph/test_plans.py::test_every_option_changed_after_a_step_replans_or_raises",),
    ),
    Mutant(
        "a plan's JSON loses the ZeRO layouts",
        "shardflow/plan/schema.py",
        "for k in _PARAM_KEYS[1:] if getattr(q, k) != getattr(implied, k)}",
        "for k in _PARAM_KEYS[1:] if False}",
        (
            "tests/plan/test_record.py::test_json_round_trip_is_equal_and_readable",
            "tests/plan/test_record.py::test_every_entry_survives_json",
        ),
    ),
    Mutant(
        "the cost model runs a started collective in the foreground (no overlap with backward)",
        "shardflow/graph/step_time.py",
        "end = self._run(legs, self.compute)",
        "self.blocking(legs)\n        end = self.compute",
        ("tests/graph/test_estimate.py::test_data_parallel_gradients_cost_a_ring_all_reduce_of_every_parameter",),
    ),
    Mutant(
        "the cost model leaves a local function's collectives unpriced (synchronised BatchNorm's statistics)",
        "shardflow/graph/step_time.py",
        "for plan in ins.work.boxes if ins.work is not None else ():",
        "for plan in ():",
        ("tests/graph/test_step_costs.py::test_synchronised_batch_norm_prices_its_statistics_all_reduces",),
    ),
    Mutant(
        "the cost model hides a started collective behind compute whatever the profile's overlap",
        "shardflow/graph/step_time.py",
        "shared = (1.0 - self.overlap) * sum(leg.seconds for leg in legs)",
        "shared = 0.0",
        (
            "tests/graph/test_step_costs.py::"
            "test_every_collective_pays_the_in_step_cost_and_shares_cores_as_the_overlap_says",
        ),
    ),
    Mutant(
        "the cost model prices ops at their time alone whatever the profile's in-step kernel scale",
        "shardflow/graph/step_time.py",
        "roofline *= profile.kernel_scale",
        "roofline *= 1.0",
        ("tests/graph/test_step_costs.py::test_the_kernel_scale_stretches_ops_and_updates_not_launches",),
    ),
    Mutant(
        "a collective's bytes priced at their link time whatever the profile's in-step link scale",
        "shardflow/cost/profile.py",
        "nbytes / fit.bus_bandwidth * self.link_scale",
        "nbytes / fit.bus_bandwidth",
        (
            "tests/graph/test_step_costs.py::"
            "test_every_collective_pays_the_in_step_cost_and_shares_cores_as_the_overlap_says",
        ),
    ),
    Mutant(
        "a synchronous boxing priced without the profile's boxing cost on the compute clock",
        "shardflow/graph/step_time.py",
        "self.compute += overhead",
        "self.compute += 0.0",
        ("tests/graph/test_step_costs.py::test_synchronised_batch_norm_prices_its_statistics_all_reduces",),
    ),
    Mutant(
        "an Estimator prices every plan on the programs it lowered first",
        "shardflow/graph/estimate.py",
        "lowered = self._lowered.pop(plan, None) or self._lower(plan)",
        "lowered = next(iter(self._lowered.values()), None) or self._lower(plan)",
        (
            "tests/graph/test_estimate.py::test_an_estimator_prices_a_plan_again_on_another_device_without_lowering_it_again",
        ),
    ),
    Mutant(
        "the cost model prices one rank for every rank, uneven shards included",
        "shardflow/graph/estimate.py",
        "groups.setdefault(key, []).append(r)",
        "groups.setdefault((), []).append(r)",
        ("tests/graph/test_estimate.py::test_a_thousand_devices_price_in_one_trace_and_one_lowering",),
    ),
    Mutant(
        "meta shards counted by address (all of them at 0, so once)",
        "shardflow/runtime/memory.py",
        "seen[storage._cdata if t.is_meta or isinstance(t, FakeTensor) else storage.data_ptr()]",
        "seen[storage.data_ptr()]",
        ("tests/graph/test_estimate.py::test_estimate_matches_the_module_on_one_rank_with_an_arena_and_recompute",),
    ),
    Mutant(
        "an all-reduce priced at a gather's bus factor",
        "shardflow/cost/profile.py",
        'return 2 * (n - 1) / n if kind == "all_reduce" else',
        'return (n - 1) / n if kind == "all_reduce" else',
        (
            "tests/graph/test_estimate.py::test_data_parallel_gradients_cost_a_ring_all_reduce_of_every_parameter",
            "tests/graph/test_estimate.py::test_shipped_profiles_read_and_price_links_by_bus_factor",
        ),
    ),
    Mutant(
        "a pipeline priced without its schedule's bubbles",
        "shardflow/graph/estimate_pipeline.py",
        "span = makespan(p.schedule, len(stages), p.micro_batches, forward, backward)",
        "span = p.micro_batches * max(f + b for f, b in zip(forward, backward))",
        ("tests/graph/test_estimate.py::test_a_pipeline_is_its_stages_walked_by_its_schedule",),
    ),
]


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    verdict: str  # "caught", "SURVIVED", "MISSING" (the snippet is not in the file once) or "ERROR <pytest's code>"
    seconds: float
    tail: str


def run(mutant: Mutant, python: str) -> Outcome:
    source = (ROOT / mutant.path).read_text()
    if source.count(mutant.old) != 1:
        return Outcome(mutant, "MISSING", 0.0, f"{mutant.path}: snippet found {source.count(mutant.old)} times")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sf-mutant-") as tmp:
        copy = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(src, copy / name)
        (copy / mutant.path).write_text(source.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        cmd = [python, "-m", "pytest", "-x", "-q", "--tb=no", "-rf", *mutant.tests]
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    tail = "\n".join(out.strip().splitlines()[-3:])
    seconds = time.perf_counter() - started
    # caught: pytest ran and one of the named tests failed; a collection error (2), a usage error or a node id
    # that matches nothing (4) or no test at all (5) is not a catch but a broken mutant
    failed = [line.split()[1] for line in out.splitlines() if line.startswith("FAILED ")]
    if proc.returncode == 1 and any(f.startswith(t) for f in failed for t in mutant.tests):
        return Outcome(mutant, "caught", seconds, tail)
    return Outcome(mutant, "SURVIVED" if proc.returncode == 0 else f"ERROR {proc.returncode}", seconds, tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated substrings of mutant names")
    p.add_argument("--list", action="store_true", help="list the mutants and check their snippets, run nothing")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only.split(","))]
    if args.list:
        missing = 0
        for m in chosen:
            found = (ROOT / m.path).read_text().count(m.old)
            missing += found != 1
            print(f"{'ok' if found == 1 else 'MISSING':8s} {m.name}: {m.path} -> {', '.join(m.tests)}")
        sys.exit(1 if missing else 0)
    bad = 0
    for m in chosen:
        outcome = run(m, sys.executable)
        bad += outcome.verdict != "caught"
        print(f"{outcome.verdict:8s} {outcome.seconds:6.0f} s  {m.name}", flush=True)
        if outcome.verdict != "caught":
            print("    " + outcome.tail.replace("\n", "\n    "), flush=True)
    print(f"{len(chosen) - bad} of {len(chosen)} mutants caught")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
