"""One module per billing API: an encoder and a response classifier (the ``Sink`` protocol).

Retry, backoff, batching, rate limiting and dead-lettering live in :mod:`kubemeter.output.delivery`;
nothing of that belongs here.
"""

from __future__ import annotations

from kubemeter.output.sinks.cloudevents import CloudEventsSink
from kubemeter.output.sinks.flexprice import FlexpriceSink
from kubemeter.output.sinks.lago import LagoSink
from kubemeter.output.sinks.openmeter import OpenMeterSink

__all__ = ["CloudEventsSink", "FlexpriceSink", "LagoSink", "OpenMeterSink"]
