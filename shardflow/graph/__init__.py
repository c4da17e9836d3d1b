"""The compiler: capture a model, choose parameter layouts by strategy, run steps equal to serial."""

from shardflow.graph.compile import ParallelModule, compile

__all__ = ["ParallelModule", "compile"]
