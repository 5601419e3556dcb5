"""The published billing API specs, vendored in ``tests/support/specs`` (see its README), as request
validators."""

from __future__ import annotations

import functools
from pathlib import Path

from kubemeter.sink.specs import SpecValidators, load_spec_validators

SPEC_DIR = Path(__file__).resolve().parent / "specs"


def spec_dir() -> Path:
    return SPEC_DIR


@functools.cache
def spec_validators() -> SpecValidators:
    return load_spec_validators(SPEC_DIR)
