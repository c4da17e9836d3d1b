"""A pipeline described for people: its stages, their ranks and schedules, what crosses each boundary, and
what a tensor-parallel stage's program communicates."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardflow.comm.init import world
from shardflow.placement.sbp import is_split
from shardflow.runtime.schedule import bubble, in_flight, stage_order
from shardflow.runtime.stage_cut import plain

if TYPE_CHECKING:
    from shardflow.runtime.pipeline import PipelineModule


def explain_pipeline(pm: PipelineModule) -> str:
    """Stages, their parameters, the schedule of each stage and the expected bubble, for people."""
    p, m = pm.stages, pm.pipeline.micro_batches
    over = "own meshes" if pm.pipeline.stage_meshes else f"mesh axis {pm.pipeline.axis!r}"
    lines = [
        f"PipelineModule: {p} stage(s) over {over} of {pm.mesh}, each data parallel over its rows of ranks "
        f"(and tensor parallel along them under a tp axis), "
        f"{m} micro-batch(es), schedule {pm.pipeline.schedule!r}",
        f"split before: {pm.split.split_points or '(one stage)'}; idle fraction with equal stages "
        f"(p-1)/(m+p-1) = {bubble(p, m):.3f}",
    ]
    for s in range(p):
        order = stage_order(pm.pipeline.schedule, s, p, m)
        count, n = pm.sizes[s].tensors, pm.sizes[s].elements
        lines.append(
            f"  stage {s} on ranks {list(pm.stage_ranks[s])} ({len(pm.grids[s])} dp x {len(pm.grids[s][0])} tp"
            f"{', ' + str(sum(is_split(v) for v in pm.layouts[s].values())) + ' split' if pm.layouts[s] else ''}): "
            f"{count} tensors, {n} parameters, "
            f"{in_flight(order)} micro-batch(es) in flight: {' '.join(map(repr, order))}"
        )
    for b, (count, moves) in sorted(pm.crossing_notes.items()):
        shown = ", ".join(f"{a}->{c} {n} row(s)" for a, c, n in moves[:8]) + (" ..." if len(moves) > 8 else "")
        lines.append(
            f"  stage {b} -> {b + 1}: {count} tensor(s) per micro-batch, (S(0), B) over each side's (dp, tp) "
            f"ranks, moved by the cross-mesh plan (gradients back by its reverse); micro-batch 0: {shown}"
        )
    for name, stages in pm.split.tied.items():
        lines.append(f"  {name} is held by stages {list(stages)}; their gradients are summed")
    split = [s for s in range(p) if pm._splits_stage(s)]
    if split:
        lines.append(
            f"  stage(s) {split}: the last backward runs in two passes, its inputs' gradients sent before its "
            "weights' are computed (W in traces)"
        )
    if pm.tp_mesh is not None and pm.inside:  # this rank's stage program: what it communicates
        micro = pm._micro_batches([plain(x) for x in pm.example_inputs])[0][0]
        counts: dict[tuple[str, str], int] = {}
        for c in pm._program(micro).program.collectives:
            phase = "forward" if c.phase == "forward" else "backward"
            what = "gradient bucket all_reduce" if c.plan is None else c.route
            counts[(phase, what)] = counts.get((phase, what), 0) + 1
        said = "; ".join(
            f"{phase}: " + ", ".join(f"{n} x {what}" for (ph, what), n in counts.items() if ph == phase)
            for phase in ("forward", "backward")
            if any(ph == phase for ph, _ in counts)
        )
        lines.append(
            f"  stage {pm.stage} runs as a lowered program on rank {world()[0]}'s shards, per micro-batch: "
            f"{said or 'no communication'}"
        )
        if pm.partial:
            lines.append(
                f"  stage {pm.stage}: {len(pm.partial)} replicated parameters' gradients stay partial sums "
                f"over tp through the micro-batches, then one all_reduce over the stage's {len(pm.stage_ranks[pm.stage])} ranks"
            )
    return "\n".join(lines)
