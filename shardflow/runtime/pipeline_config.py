"""``sf.Pipeline``: how to pipeline a model (the axis or meshes of its stages, the cut, micro-batches, schedule).

A frozen record checked on construction, so that a plan holding one is valid before anything is built; the
stages themselves are ``runtime/pipeline.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardflow.placement.mesh import Mesh
from shardflow.runtime.schedule import SCHEDULES


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """How to pipeline a model: over mesh ``axis``, cut before ``split_points`` (None: balanced by FLOPs)."""

    axis: str = "pp"
    """Mesh axis whose coordinate is the stage; the other axes are data parallel inside each stage."""
    split_points: tuple[str, ...] | None = None
    """Module names (``"transformer.h.2"``) each stage after the first starts with; one fewer than stages."""
    micro_batches: int = 1
    """Micro-batches per step; the batch is cut like ``tensor_split`` (and each micro-batch again over the
    data-parallel ranks), so it needs at least ``micro_batches x data-parallel ranks`` rows."""
    schedule: str = "1f1b"
    """``"1f1b"`` (bounded activations) or ``"gpipe"`` (all forwards, then all backwards)."""
    stage_meshes: tuple[Mesh, ...] | None = None
    """One mesh per stage, of any sizes (``axis`` is then unused): stage ``s`` is data parallel over the ranks
    of ``stage_meshes[s]`` (tensor parallel over its ``tp`` axis under ``strategy="tp"``/``"hybrid"``), and
    activations cross between stages of different sizes by cross-mesh boxing. Their ranks must not overlap
    and together be the ranks of the mesh given to ``sf.compile``."""
    split_backward: bool = True
    """Run the step's last backward of each data-parallel stage after the first in two passes, its inputs'
    gradients sent before its weights' are computed (``runtime/split_backward.py``); False: one pass."""

    def __post_init__(self) -> None:
        if self.stage_meshes is not None:
            meshes = tuple(self.stage_meshes) if isinstance(self.stage_meshes, (list, tuple)) else None
            if not meshes or not all(isinstance(m, Mesh) for m in meshes):
                raise ValueError(
                    f"Pipeline.stage_meshes must be a list of sf.Mesh, one per stage, got {self.stage_meshes!r}"
                )
            object.__setattr__(self, "stage_meshes", meshes)
        if self.split_points is not None:
            if isinstance(self.split_points, str) or not all(isinstance(p, str) for p in self.split_points):
                raise ValueError(f"Pipeline.split_points must be a list of module names, got {self.split_points!r}")
            object.__setattr__(self, "split_points", tuple(self.split_points))
        m = self.micro_batches
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"Pipeline.micro_batches must be a positive int, got {m!r}")
        if not isinstance(self.split_backward, bool):
            raise ValueError(f"Pipeline.split_backward must be True or False, got {self.split_backward!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Pipeline.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
