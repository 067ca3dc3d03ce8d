"""The loop inside a worker process.

    channel ──recv──▶ FrameDecoder ──▶ [AssignTask payloads] ──TaskRunner──▶ TaskResult frames
                                                                              │
    channel ◀──sendmsg(HEADER RESULTS count len, frames)◀── flushed per read batch, or every
                                                             FLUSH_AFTER_S while a batch runs

A worker reads whatever tasks are waiting (a batch), runs them in order and sends the results
back in one message; a long batch is flushed every few milliseconds so early results are not
held back by late ones. It exits when the channel closes (the supervisor stopped or died) and,
through PR_SET_PDEATHSIG, when the process that spawned it dies, even in the middle of a task.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import time

from node.protocol.framing import FrameDecoder, frame
from workers.channel import HEADER, READY, RESULTS, STATS
from workers.tasks import TaskRunner, WorkerSettings

FLUSH_AFTER_S = 0.002
STATS_EVERY_S = 0.5
RECV_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the forkserver or supervisor) exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel's EOF still stops us
        pass


def worker_main(sock: socket.socket, settings: WorkerSettings, index: int) -> None:
    """Entry point of a worker process (the target of `multiprocessing.Process`)."""
    _die_with_parent()
    # The supervisor owns shutdown: Ctrl-C in a terminal, or a service manager's SIGTERM, reach
    # the whole process group, and a worker that died of them would turn a graceful drain into
    # lost tasks. A worker exits when its channel closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s worker-{index}[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    runner = TaskRunner(settings)
    pid = str(os.getpid()).encode()
    sock.sendall(HEADER.pack(READY, 0, len(pid)) + pid)
    try:
        _serve(sock, runner, settings.max_frame_bytes)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()


def _serve(sock: socket.socket, runner: TaskRunner, max_frame_bytes: int) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    run = runner.run_payload
    clock = time.monotonic
    stats_sent = 0.0
    while True:
        data = sock.recv(RECV_BYTES)
        if not data:
            return
        payloads = decoder.feed(data)
        out: list[bytes] = []
        started = clock()
        for payload in payloads:
            out.append(frame(run(payload)))
            if clock() - started > FLUSH_AFTER_S:
                _send_results(sock, out)
                out = []
                started = clock()
        if out:
            _send_results(sock, out)
        if clock() - stats_sent > STATS_EVERY_S:
            snapshot = runner.stats.snapshot()
            sock.sendall(HEADER.pack(STATS, 0, len(snapshot)) + snapshot)
            stats_sent = clock()


def _send_results(sock: socket.socket, frames: list[bytes]) -> None:
    blob = b"".join(frames)
    header = HEADER.pack(RESULTS, len(frames), len(blob))
    if len(blob) < 1 << 16:
        sock.sendall(header + blob)
    else:  # no copy of a large blob just to prepend nine bytes
        sock.sendall(header)
        sock.sendall(blob)
