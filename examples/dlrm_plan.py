"""Where the planner puts DLRM's 26 tables on 4 ranks, without a process group: ``python examples/dlrm_plan.py``.

The tables are MLPerf's Criteo cardinalities scaled by 1e-4 (multi-hot, zipf ids); the plan is built on a
mesh description, so nothing runs but tracing and planning."""

from __future__ import annotations

import shardflow as sf
from shardflow.models import DLRM, CriteoShape, DLRMConfig, criteo_batch, dlrm_inputs


def main() -> None:
    shape = CriteoShape(scale=1e-4, multi_hot=True, alpha=1.05, seed=0)
    model = DLRM(DLRMConfig(table_rows=shape.table_rows, dim=16))
    batch = dlrm_inputs(criteo_batch(shape, 1024, 0))
    mesh = sf.MeshSpec("cpu", (4,), ("dp",), (0, 1, 2, 3))
    spec = sf.Embeddings(tables="tables.*", optimizer=sf.embedding.RowWiseAdagrad(0.05))
    plan = sf.plan(model, mesh, example_inputs=batch, embeddings=spec)
    lines = plan.explain().splitlines()
    print("\n".join(lines[:1] + lines[lines.index("sparse tables (over the data-parallel axis):") :]))
    pinned = sf.Embeddings(tables="tables.*", placement={"tables.20": "column"}, optimizer=spec.optimizer)
    table = sf.plan(model, mesh, example_inputs=batch, embeddings=pinned).tables["tables.20"]
    print(f"with placement={{'tables.20': 'column'}}: tables.20 {table}")


if __name__ == "__main__":
    main()
