"""The protoc output (``api_pb2``, ``api_pb2_grpc``), loaded by name: the generated code is untyped,
and importing it this way keeps ``mypy --strict`` on our code rather than on protoc's."""

from __future__ import annotations

import importlib
from typing import Any

api_pb2: Any = importlib.import_module("kubemeter.sources.podresources.api_pb2")
api_pb2_grpc: Any = importlib.import_module("kubemeter.sources.podresources.api_pb2_grpc")
