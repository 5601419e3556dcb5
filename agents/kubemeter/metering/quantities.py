"""Kubernetes resource quantities as exact integer milli-units, and exact unit-second values."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]?)$")


def parse_quantity_milli(quantity: str | int | float) -> int:
    """``"500m"`` → 500, ``"2"`` → 2000, ``"1Gi"`` → 1073741824000.

    Rounds up to the next milli-unit, as Kubernetes does (``Quantity.MilliValue``).
    """
    text = str(quantity).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity; write it like 500m, 2, 1.5Gi or 8")
    number, suffix = match.groups()
    if suffix in _BINARY:
        scale = Fraction(_BINARY[suffix])
    elif suffix and suffix[0] in "eE":
        scale = Fraction(10) ** int(suffix[1:])
    else:
        scale = _DECIMAL[suffix]
    milli = Fraction(Decimal(number)) * scale * 1000
    return -((-milli.numerator) // milli.denominator)  # ceiling, exact


def unit_seconds(milli_unit_ms: int) -> int | float:
    """milli-unit·milliseconds → unit·seconds as a JSON number.

    The exact value is ``milli_unit_ms / 10**6``, a finite decimal; an integer stays an int, anything
    else becomes the float whose shortest text is that decimal (exact below 15 significant digits).
    """
    whole, rest = divmod(milli_unit_ms, 10**6)
    if rest == 0:
        return whole
    return float(Decimal(milli_unit_ms).scaleb(-6))


def exact_unit_seconds(milli_unit_ms: int) -> Decimal:
    """The exact decimal behind :func:`unit_seconds`, for checks and reports."""
    return Decimal(milli_unit_ms).scaleb(-6)
