"""The runtime: pipeline schedules and their execution over stages of a cut model, and step timelines."""

from shardflow.runtime.pipeline import Pipeline, PipelineModule

__all__ = ["Pipeline", "PipelineModule"]
