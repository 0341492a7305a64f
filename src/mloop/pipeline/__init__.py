from mloop.pipeline.context import StepContext
from mloop.pipeline.dsl import Graph, Node, OutputRef, Pipeline, Step, pipeline, step

__all__ = ["Graph", "Node", "OutputRef", "Pipeline", "Step", "StepContext", "pipeline", "step"]
