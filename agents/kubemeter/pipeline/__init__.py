"""From a reading to a usage event: subject and dimensions (CEL over pod, namespace, node), then the
pipeline's processors (filter, set, drop, rename) in order."""

from kubemeter.pipeline.cel import CelError, Expression
from kubemeter.pipeline.processors import Processor, compile_processors, run_processors
from kubemeter.pipeline.subject import EventShaper

__all__ = ["CelError", "EventShaper", "Expression", "Processor", "compile_processors", "run_processors"]
