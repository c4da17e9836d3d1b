"""shardflow: global tensors over device meshes, automatic boxing, static plans.

Public API (everything else may change): ``init``, ``Mesh``, ``S``, ``B``, ``P``, ``Blocked``, ``GlobalTensor``,
``distribute``, ``from_local``, ``plan_boxing``, ``compile``, ``plan``, ``ParallelPlan``, ``Flops``, ``Meter``,
``Embeddings`` and ``embedding`` (its optimizers and ``init_rows``).
"""

from shardflow import checkpoint, embedding
from shardflow.boxing import CostModel, Plan, plan_boxing
from shardflow.comm import init
from shardflow.embedding import Embeddings
from shardflow.graph import CaptureError, MemoryPlanError, MemoryReport, ParallelModule, compile, plan
from shardflow.ops.flop_count import Flops
from shardflow.placement import B, Blocked, Mesh, P, S
from shardflow.plan import MeshSpec, ParallelPlan, PlanError
from shardflow.runtime import Loader, Pipeline, PipelineModule
from shardflow.runtime.meter import Meter
from shardflow.tensor import GlobalTensor, distribute, from_local

__all__ = [
    "checkpoint",
    "embedding",
    "Embeddings",
    "ParallelModule",
    "compile",
    "plan",
    "ParallelPlan",
    "MeshSpec",
    "PlanError",
    "CaptureError",
    "MemoryPlanError",
    "MemoryReport",
    "Flops",
    "Meter",
    "Loader",
    "Pipeline",
    "PipelineModule",
    "B",
    "Blocked",
    "CostModel",
    "GlobalTensor",
    "Mesh",
    "P",
    "Plan",
    "S",
    "distribute",
    "from_local",
    "init",
    "plan_boxing",
]
__version__ = "0.1.0"
