"""An executor module for pool tests whose worker is killed just before it tells the supervisor
something: where $CPNODE_TEST_KILLED_BEFORE names a file that does not exist yet, the first
worker about to send a message of kind $CPNODE_TEST_KILLED_BEFORE_KIND (`SKIPPED`: the tasks a
drain had it skip; `RESULTS`) makes that file and kills itself with SIGKILL instead, so the
message never leaves, as a kill in that instant would have it; every later worker (the file
exists) sends its messages.

`compute` is `tests.slowtasks.compute`; `wait_for_path` runs a `DiskWrite` until the file its
path names exists (at most `WAIT_S`): a long task that is neither a `Compute` (plain ones stay
on the compiled path) nor safe to repeat.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from node.protocol import messages as m
from tests.slowtasks import WAIT_S, compute
from workers import channel
from workers.channel import HEADER

__all__ = ["compute", "wait_for_path"]

_MARKER = os.environ.get("CPNODE_TEST_KILLED_BEFORE")
_KIND = getattr(channel, os.environ.get("CPNODE_TEST_KILLED_BEFORE_KIND", "SKIPPED"))


def wait_for_path(task: m.DiskWrite) -> m.Result:
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(task.path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return m.Number(0.0)


def _first_to_die() -> bool:
    assert _MARKER is not None
    try:
        os.close(os.open(_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


if _MARKER:
    _sendall = socket.socket.sendall

    def _sendall_or_die(self: socket.socket, data: Any, *args: Any) -> None:
        # A worker's message starts with its header (a big RESULTS blob follows its header in a
        # second call, and a frame's length never starts with a kind's byte below 16 MiB).
        if len(data) >= HEADER.size and data[0] == _KIND and _first_to_die():
            os.kill(os.getpid(), signal.SIGKILL)
        _sendall(self, data, *args)

    socket.socket.sendall = _sendall_or_die  # type: ignore[method-assign]
