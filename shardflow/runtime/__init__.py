"""The runtime: actors and registers, the data loader built on them, pipeline schedules and their execution
over stages of a cut model, and step timelines."""

from shardflow.runtime.actors import ActorError
from shardflow.runtime.loader import Loader
from shardflow.runtime.pipeline import Pipeline, PipelineModule

__all__ = ["ActorError", "Loader", "Pipeline", "PipelineModule"]
