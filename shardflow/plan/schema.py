"""A plan as JSON: versioned, readable, editable by hand.

Layouts are written as people write them (``["S(0)", "B"]``, ``"Blocked(0, 3)"``), one line per parameter
and per value, and a parameter's ``compute``, ``grad`` and ``optim`` layouts only where they differ from
what its ``sbp`` implies (ZeRO), so changing one layout is one edit. Reading is strict: ``"version"`` must
be this one (a newer file is refused rather than half read), every object's keys are known (a misspelt
key must not be dropped), and every value has its type (``"false"`` is not a boolean); errors name the
entry's path. Sparse embedding tables are one more section, ``tables``, written only when a plan has them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S
from shardflow.plan.check import PlanError
from shardflow.plan.record import Execution, MeshSpec, ParallelPlan, ParamPlan, PipelinePlan, TablePlan

VERSION = 1
_PLACEMENT = re.compile(r"^\s*(?:(B|P)|S\((\d+)\)|Blocked\((\d+),\s*(\d+)\))\s*$")
_PARAM_KEYS = ("sbp", "compute", "grad", "optim")
_OPTIONAL = (
    "values",
    "pipeline",
    "recompute",
    "bucket_bytes",
    "max_grad_norm",
    "execution",
    "tables",
)  # top-level keys


def dump(plan: ParallelPlan) -> str:
    """``plan`` as JSON text (``load`` reads it back equal)."""
    p, e = plan.pipeline, plan.execution
    params = {}
    for name, q in plan.params.items():
        entry = {"sbp": _sbp_json(q.sbp)}
        implied = ParamPlan.plain(q.sbp)
        entry |= {k: _sbp_json(getattr(q, k)) for k in _PARAM_KEYS[1:] if getattr(q, k) != getattr(implied, k)}
        params[name] = entry
    head = {
        "version": VERSION,
        "mesh": _mesh_json(plan.mesh),
        "strategy": plan.strategy,
        "inputs": [_sbp_json(s) for s in plan.inputs],
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
            "static": e.static,
            "updates": e.updates,
            "arena": e.arena,
            "inductor": e.inductor,
            "cuda_graphs": e.cuda_graphs,
        },
    }
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    tables = {n: {k: v for k, v in vars(t).items() if v is not None} for n, t in plan.tables.items()}
    sections: list[tuple[str, dict[str, Any]]] = [("params", params)]
    sections.append(("values", {k: _sbp_json(s) for k, s in plan.values.items()}))
    for key, table in sections + [("tables", tables)] * bool(tables):
        rows = [f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()]
        lines.append(f"  {json.dumps(key)}: {{" + ("\n" + ",\n".join(rows) + "\n  }," if rows else "},"))
    lines[-1] = lines[-1].rstrip(",")
    return "{\n" + "\n".join(lines) + "\n}\n"


def load(text: str) -> ParallelPlan:
    """The plan ``dump`` wrote (or one edited by hand), checked; ``PlanError`` names what is wrong."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"a plan is JSON (ParallelPlan.to_json()); this is not: {e}") from None
    top = _object(raw, "plan", required=("version", "mesh", "strategy", "params", "inputs"), optional=_OPTIONAL)
    if type(top["version"]) is not int or top["version"] != VERSION:
        raise PlanError(f"plan schema version {top['version']!r}; this shardflow reads version {VERSION}")
    params = {}
    for name, entry in _object(top["params"], "params").items():
        where = f"params[{name!r}]"
        q = _object(entry, where, required=("sbp",), optional=_PARAM_KEYS[1:])
        sbp = _sbp(q["sbp"], f"{where}.sbp")
        implied = ParamPlan.plain(sbp)
        params[name] = ParamPlan(
            sbp, *(_sbp(q[k], f"{where}.{k}") if k in q else getattr(implied, k) for k in _PARAM_KEYS[1:])
        )
    pipeline = None
    if top.get("pipeline") is not None:
        pipe = _object(top["pipeline"], "pipeline", required=("axis", "split_points", "micro_batches", "schedule"),
                       optional=("split_backward", "stage_meshes"))  # fmt: skip
        meshes = pipe.get("stage_meshes")
        pipeline = PipelinePlan(
            _typed(pipe["axis"], str, "pipeline.axis"),
            tuple(_list(pipe["split_points"], "pipeline.split_points", str)),
            _typed(pipe["micro_batches"], int, "pipeline.micro_batches"),
            _typed(pipe["schedule"], str, "pipeline.schedule"),
            _typed(pipe.get("split_backward", True), bool, "pipeline.split_backward"),
            None if meshes is None else tuple(_mesh(m, f"pipeline.stage_meshes[{i}]") for i, m in
                                             enumerate(_list(meshes, "pipeline.stage_meshes", dict))),
        )  # fmt: skip
    run = _object(
        top.get("execution", {}), "execution", optional=("static", "updates", "arena", "inductor", "cuda_graphs")
    )
    for key in ("static", "inductor", "cuda_graphs"):
        if key in run:
            _typed(run[key], bool, f"execution.{key}")
    norm = top.get("max_grad_norm")
    if norm is not None and (type(norm) is bool or not isinstance(norm, (int, float))):
        raise PlanError(f"max_grad_norm {norm!r}: a number or null")
    return ParallelPlan(
        mesh=_mesh(top["mesh"], "mesh"),
        strategy=_typed(top["strategy"], str, "strategy"),
        params=params,
        inputs=tuple(_sbp(s, f"inputs[{i}]") for i, s in enumerate(_list(top["inputs"], "inputs", list))),
        values={k: _sbp(s, f"values[{k!r}]") for k, s in _object(top.get("values", {}), "values").items()},
        pipeline=pipeline,
        recompute=tuple(_list(top.get("recompute", []), "recompute", str)),
        bucket_bytes=_typed(top.get("bucket_bytes", 4 * 2**20), int, "bucket_bytes"),
        max_grad_norm=norm,
        execution=Execution(**run),
        tables={n: _table(t, f"tables[{n!r}]") for n, t in _object(top.get("tables", {}), "tables").items()},
    )


def _table(value: Any, where: str) -> TablePlan:
    t = _object(value, where, required=("placement", "rows", "dim"), optional=("owner",))
    owner = t.get("owner")
    return TablePlan(
        _typed(t["placement"], str, f"{where}.placement"),
        _typed(t["rows"], int, f"{where}.rows"),
        _typed(t["dim"], int, f"{where}.dim"),
        None if owner is None else _typed(owner, int, f"{where}.owner"),
    )


def placement(text: str, where: str) -> Placement:
    """``"S(0)"`` -> ``S(0)``; a clear error naming ``where`` otherwise."""
    m = _PLACEMENT.match(text) if isinstance(text, str) else None
    if m is None:
        raise PlanError(f"{where}: {text!r} is not a placement; write 'B', 'P', 'S(dim)' or 'Blocked(dim, blocks)'")
    if m.group(1):
        return B if m.group(1) == "B" else P
    if m.group(2) is not None:
        return S(int(m.group(2)))
    try:
        return Blocked(int(m.group(3)), int(m.group(4)))
    except ValueError as e:
        raise PlanError(f"{where}: {e}") from None


def _sbp(value: Any, where: str) -> NdSbp:
    return tuple(placement(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where, str)))


def _sbp_json(sbp: NdSbp) -> list[str]:
    return [repr(p) for p in sbp]


def _mesh(value: Any, where: str) -> MeshSpec:
    m = _object(value, where, required=("device_type", "shape", "names", "ranks"))
    return MeshSpec(
        _typed(m["device_type"], str, f"{where}.device_type"),
        tuple(_list(m["shape"], f"{where}.shape", int)),
        tuple(_list(m["names"], f"{where}.names", str)),
        tuple(_list(m["ranks"], f"{where}.ranks", int)),
    )


def _mesh_json(m: MeshSpec) -> dict[str, Any]:
    return {"device_type": m.device_type, "shape": list(m.shape), "names": list(m.names), "ranks": list(m.ranks)}


def _object(
    value: Any, where: str, required: tuple[str, ...] = (), optional: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """``value`` as a JSON object with the ``required`` keys and, when ``optional`` is given, no others."""
    if not isinstance(value, dict):
        raise PlanError(f"{where}: a JSON object, got {value!r}")
    missing = [k for k in required if k not in value]
    if missing:
        raise PlanError(f"{where}: missing {missing}")
    if optional is not None:
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise PlanError(f"{where}: unknown keys {unknown}; known: {sorted({*required, *optional})}")
    return value


def _typed(value: Any, kind: type, where: str) -> Any:
    # NOTE: bool is an int in Python; JSON's true must not pass for 1, nor 1 for true
    if type(value) is not kind:
        raise PlanError(f"{where}: a {_NAMES[kind]}, got {value!r}")
    return value


def _list(value: Any, where: str, kind: type) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(f"{where}: a list, got {value!r}")
    for i, v in enumerate(value):
        _typed(v, kind, f"{where}[{i}]")
    return value


_NAMES: dict[type, str] = {str: "string", int: "integer", bool: "boolean (true or false)", list: "list", dict: "object"}
