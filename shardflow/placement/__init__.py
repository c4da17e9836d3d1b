"""Where tensors live: meshes of ranks and SBP layouts over them."""

from shardflow.placement.mesh import Mesh
from shardflow.placement.sbp import B, Blocked, NdSbp, P, Placement, S, format_sbp, grad_sbp, normalize_sbp

__all__ = ["Mesh", "S", "B", "P", "Blocked", "NdSbp", "Placement", "format_sbp", "grad_sbp", "normalize_sbp"]
