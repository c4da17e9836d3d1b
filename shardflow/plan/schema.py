"""A plan as JSON: versioned, readable, editable by hand.

Layouts are written as people write them (``["S(0)", "B"]``, ``"Blocked(0, 3)"``), parameters as a table of
their four layouts, so one edit changes one layout. ``"version"`` is checked: a newer file is refused
rather than half read; unknown top-level keys are refused too (a misspelt key must not be dropped), and
new entries (sparse tables, per-value layouts) get keys of their own in later versions.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S
from shardflow.plan.record import (
    Execution,
    Frozen,
    MeshSpec,
    ParallelPlan,
    ParamPlan,
    PipelinePlan,
    PlanError,
    check,
)

VERSION = 1
_KEYS = {
    "version",
    "mesh",
    "strategy",
    "params",
    "inputs",
    "values",
    "pipeline",
    "recompute",
    "bucket_bytes",
    "max_grad_norm",
    "execution",
}
_PLACEMENT = re.compile(r"^\s*(?:(B|P)|S\((\d+)\)|Blocked\((\d+),\s*(\d+)\))\s*$")


def placement(text: str, where: str) -> Placement:
    """``"S(0)"`` -> ``S(0)``; a clear error naming ``where`` otherwise."""
    m = _PLACEMENT.match(text) if isinstance(text, str) else None
    if m is None:
        raise PlanError(f"{where}: {text!r} is not a placement; write 'B', 'P', 'S(dim)' or 'Blocked(dim, blocks)'")
    if m.group(1):
        return B if m.group(1) == "B" else P
    if m.group(2) is not None:
        return S(int(m.group(2)))
    return Blocked(int(m.group(3)), int(m.group(4)))


def _sbp(value: Any, where: str) -> NdSbp:
    if not isinstance(value, list):
        raise PlanError(f"{where}: {value!r} is not a list of placements, one per mesh axis")
    return tuple(placement(v, f"{where}[{i}]") for i, v in enumerate(value))


def _mesh(value: Any, where: str) -> MeshSpec:
    try:
        return MeshSpec(value["device_type"], tuple(value["shape"]), tuple(value["names"]), tuple(value["ranks"]))
    except (KeyError, TypeError) as e:
        raise PlanError(f"{where}: needs device_type, shape, names and ranks ({e})") from None


def _mesh_json(m: MeshSpec) -> dict[str, Any]:
    return {"device_type": m.device_type, "shape": list(m.shape), "names": list(m.names), "ranks": list(m.ranks)}


def dump(plan: ParallelPlan) -> str:
    def sbp(s: NdSbp) -> list[str]:
        return [repr(p) for p in s]

    p = plan.pipeline
    out = {
        "version": VERSION,
        "mesh": _mesh_json(plan.mesh),
        "strategy": plan.strategy,
        "params": {
            n: {"sbp": sbp(q.sbp), "compute": sbp(q.compute), "grad": sbp(q.grad), "optim": sbp(q.optim)}
            for n, q in plan.params.items()
        },
        "inputs": [sbp(s) for s in plan.inputs],
        "values": {k: sbp(s) for k, s in plan.values.items()},
        "pipeline": None
        if p is None
        else {
            "axis": p.axis,
            "split_points": list(p.split_points),
            "micro_batches": p.micro_batches,
            "schedule": p.schedule,
            "split_backward": p.split_backward,
            "stage_meshes": None if p.stage_meshes is None else [_mesh_json(m) for m in p.stage_meshes],
        },
        "recompute": list(plan.recompute),
        "bucket_bytes": plan.bucket_bytes,
        "max_grad_norm": plan.max_grad_norm,
        "execution": {
            "static": plan.execution.static,
            "updates": plan.execution.updates,
            "arena": plan.execution.arena,
            "inductor": plan.execution.inductor,
            "cuda_graphs": plan.execution.cuda_graphs,
        },
    }
    return json.dumps(out, indent=1)


def load(text: str) -> ParallelPlan:
    """The plan ``dump`` wrote (or one edited by hand), checked; ``PlanError`` names what is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"a plan is JSON (ParallelPlan.to_json()); this is not: {e}") from None
    if not isinstance(raw, dict):
        raise PlanError("a plan is a JSON object with a 'version' key")
    version = raw.get("version")
    if version != VERSION:
        raise PlanError(f"plan schema version {version!r}; this shardflow reads version {VERSION}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise PlanError(f"unknown plan keys {unknown}; known: {sorted(_KEYS)}")
    try:
        params = {}
        for name, q in raw["params"].items():
            where = f"params[{name!r}]"
            params[name] = ParamPlan(*(_sbp(q[k], f"{where}.{k}") for k in ("sbp", "compute", "grad", "optim")))
        pipe = raw.get("pipeline")
        pipeline = None
        if pipe is not None:
            meshes = pipe.get("stage_meshes")
            pipeline = PipelinePlan(
                pipe["axis"],
                tuple(pipe["split_points"]),
                int(pipe["micro_batches"]),
                pipe["schedule"],
                bool(pipe.get("split_backward", True)),
                None if meshes is None else tuple(_mesh(m, "pipeline.stage_meshes") for m in meshes),
            )
        run = raw.get("execution", {})
        plan = ParallelPlan(
            mesh=_mesh(raw["mesh"], "mesh"),
            strategy=raw["strategy"],
            params=Frozen(params),
            inputs=tuple(_sbp(s, f"inputs[{i}]") for i, s in enumerate(raw["inputs"])),
            values=Frozen({k: _sbp(s, f"values[{k!r}]") for k, s in raw.get("values", {}).items()}),
            pipeline=pipeline,
            recompute=tuple(raw.get("recompute", ())),
            bucket_bytes=raw.get("bucket_bytes", 4 * 2**20),
            max_grad_norm=raw.get("max_grad_norm"),
            execution=Execution(**run),
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise PlanError(f"the plan is missing or mistypes an entry: {err!r}") from None
    check(plan)
    return plan
