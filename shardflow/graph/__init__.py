"""The compiler: capture a model, choose parameter layouts by strategy, run steps equal to serial."""

from shardflow.graph.compile import MemoryPlanError, ParallelModule, compile
from shardflow.runtime.capture_errors import CaptureError
from shardflow.runtime.memory import MemoryReport

__all__ = ["CaptureError", "MemoryPlanError", "MemoryReport", "ParallelModule", "compile"]
