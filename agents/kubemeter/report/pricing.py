"""Prices and units. Events carry base units (gpu-seconds, core-seconds, byte-seconds); people buy
GPU-hours, core-hours and GiB-hours. Each event unit maps to one display unit by a fixed divisor, and
prices are per display unit, optionally per GPU model or per event type."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GPU_HOURS = "GPU-hours"
SECONDS_PER_HOUR = 3_600
BYTES_PER_GIB = 2**30

# event unit -> (display unit, event units per display unit)
UNIT_CONVERSIONS: dict[str, tuple[str, float]] = {
    "gpu-seconds": (GPU_HOURS, SECONDS_PER_HOUR),
    "core-seconds": ("core-hours", SECONDS_PER_HOUR),
    "cpu-seconds": ("core-hours", SECONDS_PER_HOUR),
    "byte-seconds": ("GiB-hours", SECONDS_PER_HOUR * BYTES_PER_GIB),
    "gib-seconds": ("GiB-hours", SECONDS_PER_HOUR),
    "joules": ("kWh", 3_600_000),
    "seconds": ("hours", SECONDS_PER_HOUR),
}


@dataclass(frozen=True)
class DisplayUnit:
    name: str
    divisor: float


def display_unit(event_type: str, event_unit: str) -> DisplayUnit:
    """The unit a person reads. Without a known ``event_unit`` (OpenMeter does not return one unless
    the meter groups by it), the event type's suffix decides: ``cpu-core-seconds`` -> core-hours."""
    known = UNIT_CONVERSIONS.get(event_unit.lower())
    if known is None and not event_unit:
        for suffix in sorted(UNIT_CONVERSIONS, key=len, reverse=True):
            if event_type.lower().endswith(suffix):
                known = UNIT_CONVERSIONS[suffix]
                break
    if known is None:
        return DisplayUnit(event_unit or "units", 1.0)
    return DisplayUnit(*known)


class PricingError(ValueError):
    """A pricing file or flag could not be read; the message shows the expected form."""


@dataclass(frozen=True)
class Pricing:
    currency: str = "USD"
    unit_prices: Mapping[str, float] = field(default_factory=dict)  # display unit -> price
    gpu_model_prices: Mapping[str, float] = field(default_factory=dict)  # GPU model -> per GPU-hour
    meter_prices: Mapping[str, float] = field(default_factory=dict)  # event type -> per display unit

    def price(self, event_type: str, unit: str, gpu_model: str) -> float | None:
        """Price per display unit, or None when nothing prices it."""
        if event_type in self.meter_prices:
            return self.meter_prices[event_type]
        if unit == GPU_HOURS and gpu_model in self.gpu_model_prices:
            return self.gpu_model_prices[gpu_model]
        return self.unit_prices.get(unit)

    def merged(self, other: Pricing, currency: str | None = None) -> Pricing:
        """``other`` (flags) over ``self`` (the file)."""
        return Pricing(
            currency=currency or self.currency,
            unit_prices={**self.unit_prices, **other.unit_prices},
            gpu_model_prices={**self.gpu_model_prices, **other.gpu_model_prices},
            meter_prices={**self.meter_prices, **other.meter_prices},
        )


PRICING_EXAMPLE = """currency: USD
prices:          # per display unit: GPU-hours, core-hours, GiB-hours, hours, kWh
  GPU-hours: 2.50
  core-hours: 0.04
  GiB-hours: 0.005
gpuModels:       # per GPU-hour, by the gpu_model dimension; others fall back to prices.GPU-hours
  NVIDIA-H100-80GB-HBM3: 3.90
meters:          # per display unit of one event type, over the unit price
  nvml-energy: 0.20"""


def _prices(source: str, value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PricingError(f"{source} must be a map of name to price; for example:\n{PRICING_EXAMPLE}")
    prices = {}
    for name, price in value.items():
        if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
            raise PricingError(f"{source}.{name}: price must be a number >= 0, got {price!r}")
        prices[str(name)] = float(price)
    return prices


def load_pricing(path: Path) -> Pricing:
    try:
        text = path.read_text()
    except OSError as error:
        raise PricingError(f"cannot read pricing file {path}: {error}") from error
    try:
        document = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise PricingError(f"pricing file {path} is not valid YAML/JSON: {error}") from error
    if not isinstance(document, Mapping):
        raise PricingError(f"pricing file {path} must be a map; for example:\n{PRICING_EXAMPLE}")
    unknown = set(document) - {"currency", "prices", "gpuModels", "meters"}
    if unknown:
        raise PricingError(
            f"pricing file {path}: unknown key(s) {', '.join(sorted(unknown))}; the keys are "
            f"currency, prices, gpuModels, meters, for example:\n{PRICING_EXAMPLE}"
        )
    return Pricing(
        currency=str(document.get("currency") or "USD"),
        unit_prices=_prices("prices", document.get("prices")),
        gpu_model_prices=_prices("gpuModels", document.get("gpuModels")),
        meter_prices=_prices("meters", document.get("meters")),
    )


def parse_assignments(flag: str, values: Sequence[str]) -> dict[str, float]:
    """``NAME=PRICE`` flags, e.g. ``--price GPU-hours=2.5``."""
    prices = {}
    for item in values:
        name, sep, text = item.rpartition("=")
        try:
            price = float(text)
        except ValueError:
            price = -1.0
        if not sep or not name or price < 0:
            raise PricingError(
                f"{flag} {item!r}: give NAME=PRICE with a price >= 0, e.g. {flag} GPU-hours=2.5"
            )
        prices[name] = price
    return prices
