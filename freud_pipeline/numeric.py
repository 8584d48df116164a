"""Small numeric helpers shared by the library and the app."""

from __future__ import annotations

import math
from typing import Any


def finite_float(value: Any) -> float | None:
    """`value` as a float, or None when it is not a number or is NaN/inf (missing metrics, empty statistics)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
