"""The pure metering core: no I/O, no clocks, no floats in the sums.

Times are integer milliseconds since the Unix epoch (``*_ms``); quantities are integer milli-units
(``*_milli``: 1 GPU = 1000, 1 CPU core = 1000, 1 byte = 1000). A product of the two is exact, so a
7-second job holding one GPU is exactly ``1000 * 7000`` milli-GPU-milliseconds = 7 GPU-seconds.
"""

from kubemeter.metering.counters import CounterSample, counter_delta
from kubemeter.metering.gauges import GaugeSample, integrate_gauge
from kubemeter.metering.ids import event_id
from kubemeter.metering.intervals import Interval, overlap_ms
from kubemeter.metering.quantities import parse_quantity_milli, unit_seconds
from kubemeter.metering.windows import Window, window_containing, windows_between

__all__ = [
    "CounterSample",
    "GaugeSample",
    "Interval",
    "Window",
    "counter_delta",
    "event_id",
    "integrate_gauge",
    "overlap_ms",
    "parse_quantity_milli",
    "unit_seconds",
    "window_containing",
    "windows_between",
]
