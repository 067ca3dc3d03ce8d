"""The byte stream between the supervisor and one worker process (a Unix socket pair).

    supervisor ──▶ worker:  wire frames (4-byte length + AssignTask payload), back to back
    worker ──▶ supervisor:  messages of `HEADER` (kind, count, length) + `length` bytes

A `RESULTS` message carries `count` wire-ready `TaskResult` frames for the oldest `count` tasks
the worker was sent (a worker answers in the order it was given), so the supervisor forwards
the bytes to the master as they are and pops `count` ids: per-batch work, not per-task. `READY`
carries the worker's pid once it can take tasks; `STATS` a JSON snapshot of `workers.stats`.
`SKIPPED` (no body) says the next `count` tasks were not run: the supervisor asked the worker to
start nothing new (a drain), through the worker's progress slot.
"""

from __future__ import annotations

import struct
from typing import Final

HEADER: Final = struct.Struct(">BII")
RESULTS: Final = 1
READY: Final = 2
STATS: Final = 3
SKIPPED: Final = 4
