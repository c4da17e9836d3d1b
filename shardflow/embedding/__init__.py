"""Sparse embedding tables sharded by layout: ``sf.Embeddings`` names them, ``sf.compile`` places them
(row ``S(0)``, column ``S(1)``, whole table on one rank, replicated ``B``) and runs their lookups and fused
sparse updates by all-to-all around the dense program.

Layers, each importing only those above it in this list: ``spec`` (what a user writes), ``init`` (rows of
meta tables), ``lookups`` (tables found and traced), ``dense`` (the model with stubs), ``table`` (a shard),
``optimizers``, ``exchange`` (a step's sparse work), ``validate``, ``planner``, ``module``
(``SparseParallelModule``), ``compile``.
"""

from shardflow.embedding import compile as _compile  # noqa: F401 - registers embeddings= with sf.compile
from shardflow.embedding.init import init_rows
from shardflow.embedding.spec import SGD, Adagrad, Embeddings, RowWiseAdagrad, SparseAdam, Tiers

__all__ = ["SGD", "Adagrad", "Embeddings", "RowWiseAdagrad", "SparseAdam", "Tiers", "init_rows"]
