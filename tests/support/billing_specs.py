"""The published billing API specs (``../shared/reference`` beside the clone) as request validators."""

from __future__ import annotations

import functools
from pathlib import Path

from kubemeter.sink.specs import SpecValidators, load_spec_validators

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = (REPO_ROOT / "../shared/reference").resolve()


def spec_dir() -> Path:
    if not SPEC_DIR.is_dir():
        raise FileNotFoundError(
            f"{SPEC_DIR} is missing: the billing API specs live in the shared folder beside the clone "
            "(../shared/reference); check it out there"
        )
    return SPEC_DIR


@functools.cache
def spec_validators() -> SpecValidators:
    return load_spec_validators(spec_dir())
