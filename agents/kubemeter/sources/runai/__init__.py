"""Run:ai metrics per pod on this node, with project and department as dimensions."""

from kubemeter.sources.runai.client import (
    RunaiAuthError,
    RunaiClient,
    RunaiCredentials,
    RunaiError,
    RunaiUnavailableError,
)
from kubemeter.sources.runai.source import RunaiSource, integrate

__all__ = [
    "RunaiAuthError",
    "RunaiClient",
    "RunaiCredentials",
    "RunaiError",
    "RunaiSource",
    "RunaiUnavailableError",
    "integrate",
]
