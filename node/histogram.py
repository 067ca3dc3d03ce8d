"""A histogram of durations kept by the component that measures them, read by the metrics
endpoint at scrape time: recording costs one bisect and two adds, and nothing here depends on a
metrics library."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Histogram:
    """Counts of observations per bucket (upper bounds in seconds, one more for the rest),
    their sum, and the largest seen."""

    __slots__ = ("bounds", "counts", "max", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    @property
    def count(self) -> int:
        return sum(self.counts)
