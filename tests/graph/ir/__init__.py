"""Unit tests of the step IR passes (shardflow/graph/ir/) on small hand-built programs."""
