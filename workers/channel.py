"""The byte stream between the supervisor and one worker process (a Unix socket pair).

    supervisor ──▶ worker:  wire frames (4-byte length + AssignTask payload), back to back
    worker ──▶ supervisor:  messages of `HEADER` (kind, count, length) + `length` bytes

A `RESULTS` message carries `count` wire-ready `TaskResult` frames for the oldest `count` tasks
the worker was sent (a worker answers in the order it was given), so the supervisor forwards
the bytes to the master as they are and pops `count` ids: per-batch work, not per-task. `READY`
carries the worker's pid once it can take tasks; `STATS` a JSON snapshot of `workers.stats`.
`SKIPPED` (no body) says the next `count` tasks were not run: the supervisor asked the worker to
start nothing new (a drain), through the worker's progress slot.

A result frame of `RESULT_SEGMENT_BYTES` or more (a big `RetrieveData`/`DiskRead`) does not
cross the socket: the worker writes it to a payload segment in `shm_dir` (`shm.segments`) and
sends `RESULT_SEGMENT` (count 1, the segment's name as the body) in its place, after the
results it holds. The supervisor maps the segment, takes it over (unlinks it), and the master
link writes the frame from the mapping; the mapping goes when the master has confirmed it.
When `shm_dir` lacks the room the frame goes through the socket as an ordinary `RESULTS`.
"""

from __future__ import annotations

import struct
from typing import Final

Frames = bytes | memoryview
"""Wire-ready result frames back to back: bytes, or a view of a mapped segment (one big frame)."""

HEADER: Final = struct.Struct(">BII")
RESULTS: Final = 1
READY: Final = 2
STATS: Final = 3
SKIPPED: Final = 4
RESULT_SEGMENT: Final = 5

RESULT_SEGMENT_BYTES: Final = 1 << 20
"""Result frames this long or longer travel through a payload segment (as large incoming
frames do, see `FrameDecoder.spill_from`)."""

SEGMENT_RESERVE_BYTES: Final = 64 << 20
"""Free space a segment must leave in `shm_dir` (the memory store and other payloads need it);
without it the frame travels the slow way instead."""
