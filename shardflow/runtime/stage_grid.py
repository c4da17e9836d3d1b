"""Which ranks each pipeline stage runs on: its mesh, its ranks as a ``grid[dp][tp]``, and this rank's place.

A stage is data parallel over the rows of its grid and tensor parallel along them (its ``tp`` axis, under
``strategy="tp"``/``"hybrid"``). Every rank builds every stage's meshes, as making a mesh is collective.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardflow.comm.init import world
from shardflow.placement.mesh import Mesh
from shardflow.runtime.pipeline_config import Pipeline


@dataclass(frozen=True)
class StageGrid:
    """Every stage's ranks and meshes, and where this rank sits among them."""

    grids: list[list[list[int]]]  # each stage's ranks as grid[dp][tp]
    stage_ranks: list[tuple[int, ...]]  # each stage's ranks, row by row
    flat: list[Mesh]  # each stage as a (dp, tp) mesh: boundary tensors are boxed between them, snapshots use them
    row_mesh: Mesh  # this rank's tp row as a 1-d mesh (itself alone on a data-parallel stage)
    stage: int  # this rank's stage (a rank outside the mesh acts as the first stage's first rank)
    dp_index: int  # this rank's row in its stage's grid
    tp_index: int  # its place along the row

    @property
    def dp(self) -> int:
        return len(self.grids[self.stage])

    @property
    def tp(self) -> int:
        return len(self.grids[self.stage][0])

    @property
    def dp_ranks(self) -> tuple[int, ...]:
        """This rank's data-parallel group: its column of the stage's grid."""
        return tuple(row[self.tp_index] for row in self.grids[self.stage])


def stage_grid(mesh: Mesh, pipeline: Pipeline, strategy: str) -> StageGrid:
    """The stages of ``pipeline`` over ``mesh`` (collective: every rank makes every stage's meshes)."""
    grids = [_grid(m, s, strategy) for s, m in enumerate(_stages(mesh, pipeline))]
    stage_ranks = [tuple(r for row in g for r in row) for g in grids]
    rank = world()[0]
    me = rank if rank in mesh else stage_ranks[0][0]
    stage = next(s for s, ranks in enumerate(stage_ranks) if me in ranks)
    dp_index = next(i for i, row in enumerate(grids[stage]) if me in row)
    tp_index = grids[stage][dp_index].index(me)
    flat = [
        Mesh(
            mesh.device_type,
            (len(g), len(g[0])),
            names=("dp", "tp"),
            ranks=[r for row in g for r in row],
            virtual=mesh.virtual,
        )
        for g in grids
    ]
    rows = [
        [Mesh(mesh.device_type, (len(row),), names=("tp",), ranks=row, virtual=mesh.virtual) for row in g]
        for g in grids
    ]
    return StageGrid(grids, stage_ranks, flat, rows[stage][dp_index], stage, dp_index, tp_index)


def _stages(mesh: Mesh, pipeline: Pipeline) -> list[Mesh]:
    """Each stage's mesh: the given stage meshes, or the slices of ``mesh`` at each coordinate of the
    pipeline axis (collective: makes every stage's mesh)."""
    if pipeline.stage_meshes is not None:
        meshes = list(pipeline.stage_meshes)
        seen: dict[int, int] = {}
        for s, m in enumerate(meshes):
            if m.device_type != mesh.device_type:
                raise ValueError(f"stage mesh {s} {m} is on {m.device_type!r} but the mesh is on {mesh.device_type!r}")
            for r in m.ranks:
                if r in seen:
                    raise ValueError(f"rank {r} is in stage meshes {seen[r]} and {s}: give each stage its own ranks")
                seen[r] = s
        if set(seen) != set(mesh.ranks):
            raise ValueError(
                f"the stage meshes hold ranks {sorted(seen)} but the mesh {mesh} holds {list(mesh.ranks)}: "
                "give sf.compile the mesh of all the stages' ranks, each in exactly one stage mesh"
            )
        return meshes
    pp = mesh.axis_index(pipeline.axis)
    others = [a for a in range(mesh.ndim) if a != pp]
    return [
        Mesh(
            mesh.device_type,
            tuple(mesh.shape[a] for a in others) or (1,),
            names=tuple(mesh.names[a] for a in others) or ("replica",),
            ranks=[r for r in mesh.ranks if mesh.coord_of(r)[pp] == s],
            virtual=mesh.virtual,
        )
        for s in range(mesh.shape[pp])
    ]


def _grid(stage: Mesh, s: int, strategy: str) -> list[list[int]]:
    """The ranks of a stage as ``grid[dp][tp]``: the tensor-parallel axis (``"tp"``, or the only axis of a
    1-d stage mesh under ``strategy="tp"``) and every other axis data parallel, in mesh order."""
    tp: int | None = None
    if strategy in ("tp", "hybrid"):
        if "tp" in stage.names:
            tp = stage.names.index("tp")
        elif strategy == "tp" and stage.ndim == 1:
            tp = 0
        else:
            raise ValueError(
                f"strategy {strategy!r} with a pipeline splits each stage over its 'tp' axis; stage {s}'s mesh "
                f"{stage} has none: name one axis of each stage 'tp' (the others are data parallel)"
            )
    rows: dict[tuple[int, ...], list[int]] = {}
    for r in stage.ranks:
        coord = stage.coord_of(r)
        rows.setdefault(tuple(c for a, c in enumerate(coord) if a != tp), []).append(r)
    return list(rows.values())
