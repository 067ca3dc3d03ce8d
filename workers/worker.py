"""The loop inside a worker process.

    channel ──recv──▶ FrameDecoder ──▶ [AssignTask payloads] ──TaskRunner──▶ TaskResult frames
                                                                              │
    channel ◀──(HEADER RESULTS count len, frames)◀── _ResultSender: flushed per read batch, and
                                                      every FLUSH_AFTER_S by its thread while a
                                                      batch runs
    shm_dir ◀── a result frame of RESULT_SEGMENT_BYTES or more, written to a payload segment;
    channel ◀── (HEADER RESULT_SEGMENT 1 len, its name), after the results before it
    progress slot (shared memory) ◀── before each task: started-at, started; after: finished
                                  ──▶ run limit: tasks past it are skipped, not run (a drain)
                                  ◀── skipped from: the first task skipped, before its claim
                                  ──▶ started, moved on by the supervisor: tasks taken back

A worker reads whatever tasks are waiting (a batch), runs them in order and sends the results
back in one message; while a batch runs, a helper thread flushes finished results every few
milliseconds, so a result never waits behind a slow task that follows it. Before and after each
task the worker writes its progress slot (see `PROGRESS_FIELDS`), which the supervisor reads to
time tasks out and to know, when a worker dies, which of its tasks it had started. A drain
lowers the slot's run limit: the worker finishes the task it runs and answers the tasks it has
not started with one `SKIPPED` message, so the supervisor can hand them back; the slot says
which task it skipped first (written before it claims that one), so a worker that dies before
that message still leaves those tasks as never started.

A task is claimed by moving `STARTED` from its number - 1 to its number with an atomic
compare-and-swap, and the supervisor takes back tasks a worker has not started (work stealing:
a long task holds up the ones behind it while another worker idles) by moving `STARTED` from
the running task's number to the last one it sent, the same way. A claim that fails finds the
tasks up to that number taken: the worker skips them, silently (the supervisor already counts
them answered), and marks them finished so nothing looks running. Without the compiled module
the claim is a plain write and nothing is taken back.

Runs of plain `Compute` tasks (the commonest kind, see workers/_fastpath.c) go through one C
call per run of up to `PLAIN_BATCH_MOST` tasks or `FLUSH_AFTER_S` (`plain_batch`), which writes
the progress slot for each task as this loop does (started after it was computed: a pure
expression of bounded length) and counts their times into the stats buckets; any other task
is run here, one at a time, by `TaskRunner.run_payload`.

It exits when the channel closes (the supervisor stopped or died) and, through
PR_SET_PDEATHSIG, when the process that spawned it dies, even in the middle of a task.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import Any, Final

from node.protocol.framing import FrameDecoder, frame
from shm import native
from shm.nodedir import node_prefix
from shm.segments import write_segment
from workers.channel import (
    HEADER,
    READY,
    RESULT_SEGMENT,
    RESULT_SEGMENT_BYTES,
    RESULTS,
    SEGMENT_RESERVE_BYTES,
    SKIPPED,
    STATS,
)
from workers.logformat import configure_logging
from workers.stats import BUCKETS_NS
from workers.storage import Answer, BytesResult
from workers.tasks import TaskRunner, WorkerSettings

_fastpath = native.load("workers._fastpath")
compare_and_swap: Callable[[Any, int, int, int], bool] | None = (
    None if _fastpath is None else _fastpath.compare_and_swap
)
"""`workers._fastpath.compare_and_swap(buffer, index, expected, new)`: an atomic update of
one int64 field of shared memory (a progress slot), or None: then no task is taken back."""

PLAIN_BATCH_MOST = 512  # plain Computes per call of the compiled loop (about 0.3 ms)
FLUSH_AFTER_S = 0.002  # the main thread flushes between tasks this often
FLUSH_AFTER_NS = round(FLUSH_AFTER_S * 1e9)  # and a compiled run of plain Computes stops
SLOW_TASK_FLUSH_S = 0.02  # the flusher thread, while one task runs longer than this
STATS_EVERY_S = 0.5
RECV_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1

# The progress slot: int64 fields in memory shared with the supervisor (one slot per worker,
# zeroed before each start). Counts are of tasks since this process started; the supervisor
# knows how many results it received, so `STARTED` minus that is how many of the oldest tasks
# it sent were started, and `STARTED > FINISHED` means the last of them is running.
STARTED: Final = 0  # tasks started, claimed by compare-and-swap (and tasks taken back)
STARTED_AT_NS: Final = 1  # time.monotonic_ns() when the last one started (written first)
FINISHED: Final = 2  # tasks finished (written after each; and after tasks taken back)
RUN_LIMIT: Final = 3  # written by the supervisor: take no task numbered above this (a drain)
# The first task skipped for the run limit (0: none yet), written before it is claimed. The
# limit is set to `STARTED` (never above a task not claimed yet), so no task from this one on
# runs in this process: each is claimed and skipped, and a worker that dies before its SKIPPED
# message leaves them as never started, not as run (see `WorkerPool._worker_died`).
SKIPPED_FROM: Final = 4
PROGRESS_FIELDS: Final = 5
NO_RUN_LIMIT: Final = (1 << 63) - 1

EXIT_SETUP_FAILED: Final = 3  # the worker could not set itself up (logged); it never ran a task

log = logging.getLogger("cpnode.worker")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when our parent (the forkserver or supervisor) exits."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the channel's EOF still stops us
        return
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(EXIT_SETUP_FAILED)


def worker_main(sock: socket.socket, settings: WorkerSettings, index: int, progress: Any) -> None:
    """Entry point of a worker process (the target of `multiprocessing.Process`); `progress` is
    this worker's slot, a shared `ctypes` array of `PROGRESS_FIELDS` int64."""
    _die_with_parent()
    # The supervisor owns shutdown: Ctrl-C in a terminal, or a service manager's SIGTERM, reach
    # the whole process group, and a worker that died of them would turn a graceful drain into
    # lost tasks. A worker exits when its channel closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(
        settings.log_level,
        settings.log_format,
        text_format=f"%(asctime)s %(levelname)s worker-{index}[%(process)d] %(message)s",
        static={"worker": index},
    )
    try:
        runner = TaskRunner(settings)
    except Exception as exc:
        log.error("worker %d cannot start: %s", index, exc)
        sock.close()
        sys.exit(EXIT_SETUP_FAILED)
    pid = str(os.getpid()).encode()
    sender = _ResultSender(sock, settings.shm_dir, node_prefix(settings.node_id))
    try:
        sender.send(HEADER.pack(READY, 0, len(pid)) + pid)
        slot = memoryview(progress).cast("B").cast("q")  # faster to index than the ctypes array
        _serve(sock, sender, runner, settings.max_frame_bytes, slot)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()


class _ResultSender:
    """The worker's only writer to the channel: results as they finish, stats, READY.

    The main thread queues results and flushes between tasks every FLUSH_AFTER_S and at the
    end of each batch; while a batch runs (`busy` set) a daemon thread flushes what a slow task
    holds back, every SLOW_TASK_FLUSH_S, so a worker killed for a time limit takes no finished
    result with it. (The thread wakes rarely: each wake costs the main thread a GIL handoff.)
    One lock keeps messages whole and results in order.

    A result too big for the socket pair goes through a payload segment (`send_large`).
    """

    def __init__(self, sock: socket.socket, shm_dir: str, segment_prefix: str) -> None:
        self._sock = sock
        self._shm_dir = shm_dir
        self._segment_prefix = segment_prefix
        self._warned_no_room = False
        self._lock = threading.Lock()
        # Results waiting to be sent: (how many frames, the frames back to back).
        self.frames: collections.deque[tuple[int, bytes]] = collections.deque()
        self.busy = threading.Event()
        threading.Thread(target=self._flush_while_busy, name="result-flusher", daemon=True).start()

    def send(self, message: bytes) -> None:
        with self._lock:
            self._sock.sendall(message)

    def flush(self) -> None:
        frames = self.frames
        with self._lock:
            count = len(frames)
            if count:
                _send_results(self._sock, [frames.popleft() for _ in range(count)])

    def send_large(self, payload: Answer) -> None:
        """Send one big result frame through a payload segment, after the results queued
        before it (a `BytesResult` is encoded straight into the segment); through the socket
        when `shm_dir` has no room for it."""
        frames = self.frames
        header = len(payload).to_bytes(4, "big")
        pieces: Iterable[bytes | memoryview]
        pieces = payload.pieces() if isinstance(payload, BytesResult) else (payload,)
        with self._lock:
            if frames:
                _send_results(self._sock, [frames.popleft() for _ in range(len(frames))])
            try:
                name = write_segment(
                    self._shm_dir,
                    self._segment_prefix,
                    itertools.chain((header,), pieces),
                    len(header) + len(payload),
                    reserve_bytes=SEGMENT_RESERVE_BYTES,
                )
            except OSError as error:  # StoreFullError included
                if not self._warned_no_room:
                    self._warned_no_room = True
                    log.warning("large results go through the socket instead: %s", error)
                _send_results(self._sock, [(1, header + bytes(payload))])
                return
            body = name.encode()
            self._sock.sendall(HEADER.pack(RESULT_SEGMENT, 1, len(body)) + body)

    def _flush_while_busy(self) -> None:
        while True:
            self.busy.wait()
            time.sleep(SLOW_TASK_FLUSH_S)
            try:
                self.flush()
            except OSError:  # the channel is gone; the main thread sees it too
                return


def _serve(
    sock: socket.socket,
    sender: _ResultSender,
    runner: TaskRunner,
    max_frame_bytes: int,
    progress: memoryview,
) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    run = runner.run_payload
    plain_batch = runner.plain_batch
    record_counted = runner.stats.record_counted
    counts = array("q", bytes(8 * (len(BUCKETS_NS) + 1)))  # plain_batch's, zeroed as recorded
    clock = time.monotonic
    clock_ns = time.monotonic_ns
    frames = sender.frames
    busy = sender.busy
    # Read per task: locals, not module globals.
    started_at_ns, started, finished, run_limit = STARTED_AT_NS, STARTED, FINISHED, RUN_LIMIT
    skipped_from = SKIPPED_FROM
    large = RESULT_SEGMENT_BYTES
    buffer = bytearray(RECV_BYTES)
    view = memoryview(buffer)
    recv_into = sock.recv_into
    stats_sent = 0.0
    unsent = False  # tasks ran since the last STATS message
    seq = 0
    taken_through = 0  # tasks numbered up to this were taken back by the supervisor
    cas = compare_and_swap
    # A read waits at most STATS_EVERY_S (the kernel's receive timeout: no `select` before
    # each read, one system call less on a lone task's round trip); an idle worker wakes that
    # often, and sends its stats the first time.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(STATS_EVERY_S))
    while True:
        # Into a buffer made once: `recv(RECV_BYTES)` would allocate (and give back) 1 MiB per
        # read, 16 µs of a lone task's round trip here (see bench/bench_hops.py).
        try:
            count = recv_into(buffer)
        except BlockingIOError:  # STATS_EVERY_S without new work
            if unsent:
                # The supervisor's metrics must not miss the last tasks of a burst.
                _send_stats(sender, runner)
                stats_sent = clock()
                unsent = False
            continue
        if not count:  # the supervisor sends nothing more: a stop, or this worker retires
            if unsent:
                with contextlib.suppress(OSError):
                    _send_stats(sender, runner)
            return
        payloads = decoder.feed(view[:count].tobytes())
        if not payloads:
            continue
        skipped = 0
        flushed = 0.0
        # The flusher thread matters only once a finished result could wait behind the next
        # task; waking it for a lone task would only add a thread switch to its round trip.
        flusher_on = False
        total = len(payloads)
        index = 0
        while index < total:
            if seq < taken_through:  # tasks the supervisor took back: not run, not answered
                gone = min(total - index, taken_through - seq)
                index += gone
                seq += gone
                continue
            ran = 0
            if plain_batch is not None:
                # A run of plain Computes, in C: each recorded in the progress slot as below,
                # their frames in one piece.
                try:
                    end, blob, nanoseconds = plain_batch(
                        payloads, index, PLAIN_BATCH_MOST, FLUSH_AFTER_NS, progress, seq,
                        max_frame_bytes, BUCKETS_NS, counts,
                    )  # fmt: skip
                except Exception:  # out of memory, say: the Python path answers the task
                    log.exception("a compiled run of plain Compute tasks failed")
                    end = index
                ran = end - index
                if ran:
                    frames.append((ran, blob))
                    record_counted("Compute", nanoseconds / 1e9, counts)
                    seq += ran
                    index = end
            if not ran:  # any other task, one at a time
                payload = payloads[index]
                skip = seq >= progress[run_limit]  # a drain: not run, answered SKIPPED
                if skip and not progress[skipped_from]:
                    # Before its claim: should this process die before its SKIPPED message,
                    # the supervisor knows that nothing from this task on ran.
                    progress[skipped_from] = seq + 1
                progress[started_at_ns] = clock_ns()
                if cas is None:
                    progress[started] = seq + 1
                elif not cas(progress, started, seq, seq + 1):
                    # Taken back, with the tasks after it up to `STARTED`: skipped above.
                    taken_through = progress[started]
                    progress[finished] = taken_through
                    continue
                index += 1
                seq += 1
                if skip:  # claimed like any task (not taken back), then marked finished
                    progress[finished] = seq
                    skipped += 1
                    continue
                result = run(payload)
                if len(result) < large:
                    frames.append((1, frame(bytes(result))))
                else:
                    sender.send_large(result)
                progress[finished] = seq
            if index < total:
                if not flusher_on:
                    flusher_on = True
                    busy.set()
                    flushed = clock()
                elif clock() - flushed > FLUSH_AFTER_S:
                    sender.flush()
                    flushed = clock()
        if flusher_on:
            busy.clear()
        sender.flush()
        if skipped:
            sender.send(HEADER.pack(SKIPPED, skipped, 0))
        unsent = True
        if clock() - stats_sent > STATS_EVERY_S:
            _send_stats(sender, runner)
            stats_sent = clock()
            unsent = False


def _timeval(seconds: float) -> bytes:
    """`seconds` as a `struct timeval`, for SO_RCVTIMEO."""
    whole = int(seconds)
    return struct.pack("@ll", whole, round((seconds - whole) * 1e6))


def _send_stats(sender: _ResultSender, runner: TaskRunner) -> None:
    snapshot = runner.stats.snapshot()
    sender.send(HEADER.pack(STATS, 0, len(snapshot)) + snapshot)


def _send_results(sock: socket.socket, results: list[tuple[int, bytes]]) -> None:
    """One RESULTS message of `results`, (count, frames) pairs in order."""
    if len(results) == 1:
        count, blob = results[0]
    else:
        count = sum(count for count, _ in results)
        blob = b"".join([frames for _, frames in results])
    header = HEADER.pack(RESULTS, count, len(blob))
    if len(blob) < 1 << 16:
        sock.sendall(header + blob)
    else:  # no copy of a large blob just to prepend nine bytes
        sock.sendall(header)
        sock.sendall(blob)
