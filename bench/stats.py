"""Repeated measurements reduced to what the report shows: the median and the spread around it."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def summary(values: Iterable[float | None]) -> dict[str, float | None]:
    """median, min, max and n of the measured values (None = not measured that time, left out)."""
    measured = [v for v in values if v is not None]
    if not measured:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(measured), 2),
        "min": round(min(measured), 2),
        "max": round(max(measured), 2),
        "n": len(measured),
    }
