"""At most one log line per period for an event a peer can repeat at will.

A refused token, a connection turned away: each is worth a line, but whoever can reach the port
can make thousands a second, and a line for each would fill the disk the logs are on. The first
event is said at once; later ones at most once per `every_s`, with how many there were since.
"""

from __future__ import annotations

import math
import time


class Throttle:
    """Counts one recurring event; `hit()` says when a line is due and how many it covers."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._count = 0  # events since the last line
        self._said_at = -math.inf

    def hit(self) -> int:
        """Count an event. Returns how many events the line due now covers (this one and the
        ones kept quiet since the last line), or 0 when no line is due."""
        self._count += 1
        now = time.monotonic()
        if now - self._said_at < self.every_s:
            return 0
        count, self._count, self._said_at = self._count, 0, now
        return count


def more_since(count: int) -> str:
    """What a line that `Throttle.hit` let through adds about the events kept quiet."""
    return f" ({count - 1} more since the last such line)" if count > 1 else ""
