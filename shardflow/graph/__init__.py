"""The compiler: capture a model, build its plan by strategy transforms, run steps equal to serial."""

from shardflow.graph.compile import MemoryPlanError, ParallelModule, compile, plan
from shardflow.runtime.capture_errors import CaptureError
from shardflow.runtime.memory import MemoryReport

__all__ = ["CaptureError", "MemoryPlanError", "MemoryReport", "ParallelModule", "compile", "plan"]
