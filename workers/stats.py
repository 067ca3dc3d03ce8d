"""Per-task-type counters and execution-time histograms, kept in each worker.

A worker records every task it runs (`TaskStats.record`) and sends a cumulative snapshot to the
supervisor now and then (a `STATS` channel message), so the supervisor's metrics cost it
nothing per task: `merge` adds the latest snapshot of every worker that ever lived.

A snapshot leaves the worker after the results of the tasks it counts (at the end of a batch),
so it never counts a task whose result the supervisor did not get; but a worker that dies or is
killed takes with it the counts of the results it sent since its last snapshot (those of the
batch it was running, and of the batches it ended in the `STATS_EVERY_S` before). The tasks
the supervisor answers itself (a dead worker's, with an `Error`) it counts itself
(`node.dispatch`).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable
from typing import Final

import orjson

# Upper bounds (seconds) of the execution-time histogram; one more bucket catches the rest.
BUCKETS: Final = (1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 60.0)
# The same bounds in nanoseconds, for counting in C (`workers._fastpath.plain_batch`).
BUCKETS_NS: Final = array("q", (round(bound * 1e9) for bound in BUCKETS))
# Layout of one kind's row: completed, failed, sum of seconds, then the bucket counts.
COMPLETED, FAILED, SECONDS, FIRST_BUCKET = 0, 1, 2, 3


def empty_row() -> list[float]:
    return [0, 0, 0.0] + [0] * (len(BUCKETS) + 1)


class TaskStats:
    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def record(self, kind: str, failed: bool, seconds: float) -> None:
        row = self.rows.get(kind)
        if row is None:
            row = self.rows[kind] = empty_row()
        row[COMPLETED] += 1
        if failed:
            row[FAILED] += 1
        row[SECONDS] += seconds
        row[FIRST_BUCKET + bisect.bisect_left(BUCKETS, seconds)] += 1

    def record_counted(self, kind: str, seconds: float, counts: array[int]) -> None:
        """Record tasks counted elsewhere, none failed: `counts` per bucket of `BUCKETS_NS`
        (as `record` would have put them), `seconds` their sum; `counts` is zeroed."""
        row = self.rows.get(kind)
        if row is None:
            row = self.rows[kind] = empty_row()
        row[COMPLETED] += sum(counts)
        row[SECONDS] += seconds
        for bucket, count in enumerate(counts):
            if count:
                row[FIRST_BUCKET + bucket] += count
                counts[bucket] = 0

    def snapshot(self) -> bytes:
        return orjson.dumps(self.rows)


def merge(snapshots: Iterable[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Sum snapshots row by row."""
    total: dict[str, list[float]] = {}
    for snapshot in snapshots:
        for kind, row in snapshot.items():
            into = total.setdefault(kind, empty_row())
            for i, value in enumerate(row):
                into[i] += value
    return total
