"""The worker pool, seen from the supervisor's event loop.

    WorkerPool.start() ─ spawn N processes (forkserver) ─ each sends READY ─ pool is up
    WorkerPool.send(worker, ids, frames) ──socketpair──▶ worker process
    worker process ──RESULTS──▶ on_results(worker, count, blob)      (in completion order)
                   ──RESULT_SEGMENT──▶ map + unlink ──▶ on_results(worker, 1, mapped view)
    process sentinel readable ──▶ on_worker_lost(worker, WorkerLoss) ─ respawn (backoff if
                                                                       it keeps dying)
    watchdog timer ─ progress slots ──▶ a task past task_timeout_ms: SIGKILL its worker
                   ─ psutil USS     ──▶ a worker above its memory limit: retire it
    take_back(worker) ─ compare-and-swap of its slot's STARTED ──▶ its unstarted tasks, for
                                                                    another worker

Each worker owns one Unix socket pair, driven on the supervisor side by an asyncio transport,
so a send never blocks the loop (the transport buffers while the worker is busy). A worker's
death is noticed through its process sentinel at once, not by a timeout; `describe_exit` names
the exit code or signal for the log and for the `Error` of the task it was running. Its
progress slot (shared memory, see `workers.worker`) says how many of the tasks it was sent it
had started, so `WorkerLoss` tells the dispatcher exactly which tasks ran and which never did;
tasks taken back from it (`take_back`) count as received, as if answered, and it skips them.

Recycling happens between tasks: a worker that reached `max_tasks_per_child` tasks, or whose
USS passed `memory_limit_mb`, is RETIRING: it is sent nothing more, finishes what it holds, then
its channel is closed (it exits at EOF) and a fresh process takes its place.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any, Final

import orjson
import psutil

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame
from shm.nodedir import node_prefix
from shm.segments import PayloadSegment, sweep_segments
from workers.channel import HEADER, READY, RESULT_SEGMENT, RESULTS, SKIPPED, STATS, Frames
from workers.stats import merge
from workers.tasks import WorkerSettings, sweep_dead_worker_files
from workers.worker import (
    FINISHED,
    NO_RUN_LIMIT,
    PROGRESS_FIELDS,
    RUN_LIMIT,
    SKIPPED_FROM,
    STARTED,
    STARTED_AT_NS,
    compare_and_swap,
    worker_main,
)

log = logging.getLogger("cpnode.pool")

FORKSERVER_PRELOAD: Final = ["workers.forkserver_init", "workers.worker"]
"""Imported by the forkserver before it forks a worker: signal handling first, then the worker's
own modules (each worker would import them again otherwise)."""

START_ATTEMPTS: Final = 3
"""Processes a worker may go through while the pool starts: one killed at start (by the OOM
killer, or an operator's stray kill) is replaced, as it would be later; one that dies every time
(a broken install, an executor that cannot load) fails the start, which names the cause."""
_RESPAWN_BACKOFF_MAX_S = 5.0
_STABLE_AFTER_S = 10.0
# A dead worker's exit code is looked for every _REAP_RETRY_S, for at most _REAP_WAIT_S.
_REAP_RETRY_S = 0.005
_RECYCLED: Final = "recycled: "  # the causes of replacements that are no death
_REAP_WAIT_S = 1.0
MEMORY_CHECK_S = 1.0


class WorkerStatus(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RETIRING = "retiring"  # takes no new task; replaced once it has answered what it holds
    DEAD = "dead"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    """When a worker is killed or recycled; 0 turns a limit off."""

    task_timeout_ms: int = 0  # a task running longer: SIGKILL the worker, Error for the task
    max_tasks_per_child: int = 0  # recycle a worker after this many tasks
    memory_limit_mb: int = 0  # recycle a worker whose USS is above this (checked every second)


@dataclass(frozen=True, slots=True)
class WorkerLoss:
    """What a dead worker took with it, for the dispatcher.

    Of the tasks the worker held (oldest first), the first `started` were started by the
    process; the last of those was `running` when it died, the ones before it finished but
    their results never arrived. The rest never started. `timeout_ms` is set when the pool
    killed the worker because its running task passed `task_timeout_ms`.
    """

    how: str
    started: int
    running: bool
    timeout_ms: int = 0


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL (possibly out of memory)'."""
    if exitcode is None:
        return "unknown exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        hint = " (possibly out of memory)" if exitcode == -signal.SIGKILL else ""
        return f"signal {name}{hint}"
    return f"exit code {exitcode}"


class Worker:
    """The supervisor's handle on one worker process and the tasks it holds."""

    def __init__(self, index: int, progress: Any) -> None:
        self.index = index
        self.status = WorkerStatus.STARTING
        self.process: multiprocessing.process.BaseProcess | None = None
        self.pid: int | None = None
        self.transport: asyncio.Transport | None = None
        # The channel once its supervisor end is half-closed (`_close_channel`): nothing more
        # goes to the process, and what it still says (its last STATS) is read until it exits.
        self.draining: asyncio.Transport | None = None
        # Ids sent to this worker and not yet answered, oldest first: the worker answers in
        # order, so a RESULTS message of `count` frames answers the `count` oldest.
        self.assigned: collections.deque[str] = collections.deque()
        self.ready: asyncio.Future[None] | None = None
        self.start_deaths = 0  # processes that died before READY while the pool started
        self.started_at = 0.0
        self.restarts = 0  # processes that replaced an earlier one in this slot, any cause
        self.crashes_in_a_row = 0  # of processes that got nothing done (backs respawns off)
        self.tasks_done = 0
        self.stats: dict[str, list[float]] = {}  # latest snapshot from the live process
        # Shared with the process (see `workers.worker.PROGRESS_FIELDS`); zeroed per process.
        self.progress = progress
        self.received = 0  # tasks answered (results, SKIPPED) or taken back, current process
        self.skipped = 0  # of `received`: tasks answered with SKIPPED (a drain)
        # After tasks were taken back (`WorkerPool.take_back`): `STARTED` was moved from
        # `taken_after` (the task then running) to `taken_through` (the last one taken).
        self.taken_after = 0
        self.taken_through = 0
        self.taken_back = 0  # of `received`: tasks taken back, not answered
        # Payload bytes of the tasks in `assigned` (kept by the dispatcher, which bounds it).
        self.inflight_bytes = 0
        self.budget = sys.maxsize  # tasks the current process may still be sent
        self.killed_for_timeout = 0  # the limit (ms) when the pool killed it for a timeout
        self.retired_for = ""  # why the pool recycles the current process (see `retire`)

    @property
    def takes_tasks(self) -> bool:
        """Ready, and its channel not closing. The channel closes as the process dies, a
        moment before the death is read off the process sentinel (which the forkserver
        reports, late when it is busy): tasks sent in between would only wait to be
        dispatched again."""
        transport = self.transport
        return self.status is WorkerStatus.READY and not (transport and transport.is_closing())

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={self.pid} {self.status.value} held={len(self.assigned)}>"


class _Channel(asyncio.Protocol):
    """Parses the worker's messages (see `workers.channel`)."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self._pool = pool
        self._worker = worker
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        # Usually `data` holds whole messages: read them from it, each body copied once; a
        # message split across reads waits in `_buffer`.
        buffer = self._buffer
        if buffer:
            buffer += data
        chunk = buffer if buffer else data
        view = memoryview(chunk)
        size = HEADER.size
        pos = 0
        try:
            while len(chunk) - pos >= size:
                kind, count, length = HEADER.unpack_from(chunk, pos)
                end = pos + size + length
                if len(chunk) < end:
                    break
                body = view[pos + size : end].tobytes()
                pos = end
                if kind == RESULTS:
                    self._pool._results(self._worker, count, body)
                elif kind == RESULT_SEGMENT:
                    self._pool._result_segment(self._worker, body.decode())
                elif kind == READY:
                    self._pool._ready(self._worker, int(body))
                elif kind == STATS:
                    self._worker.stats = orjson.loads(body)
                elif kind == SKIPPED:
                    self._pool._skipped(self._worker, count)
        finally:
            # Also when a handler raised: the messages before it were handled (its own too,
            # `pos` is past it), and must not be handled again with the next read.
            view.release()
            if chunk is buffer:
                del buffer[:pos]
            elif pos < len(data):
                buffer += memoryview(data)[pos:]

    def connection_lost(self, exc: Exception | None) -> None:
        # Death is handled through the process sentinel, which also covers a worker that
        # closed its socket but has not exited yet.
        pass


class WorkerPool:
    """Spawns, watches and respawns `size` worker processes."""

    def __init__(
        self,
        size: int,
        settings: WorkerSettings,
        *,
        on_results: Callable[[Worker, int, Frames], None],
        on_worker_ready: Callable[[Worker], None],
        on_worker_lost: Callable[[Worker, WorkerLoss], None],
        on_skipped: Callable[[Worker, int], None] = lambda worker, count: None,
        on_result_lost: Callable[[str], None] = lambda ident: None,
        start_method: str = "forkserver",
        limits: WorkerLimits | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one worker")
        self.settings = settings
        self.limits = limits if limits is not None else WorkerLimits()
        self._context: BaseContext = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(FORKSERVER_PRELOAD)
        # Progress slots live in the context's shared heap: passed to each process at start
        # (as a file descriptor), and a file that is unlinked at once, so nothing outlives us.
        self.workers = [
            Worker(i, self._context.RawArray("q", PROGRESS_FIELDS)) for i in range(size)
        ]
        self._on_results = on_results
        self._on_worker_ready = on_worker_ready
        self._on_worker_lost = on_worker_lost
        self._on_skipped = on_skipped
        self._on_result_lost = on_result_lost
        self._starting_allowed = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._respawns: set[asyncio.TimerHandle] = set()
        self._watchdog: asyncio.Task[None] | None = None
        # Where the forkserver's socket goes (see `_keep_forkserver_socket_in`); None: /tmp.
        self.run_dir: str | None = None
        # Every replacement by cause ("recycled: ..." included; see `deaths`).
        self.restarts_by_cause: collections.Counter[str] = collections.Counter()
        self._spawning = 0  # process starts under way in threads
        self._retired_stats: dict[str, list[float]] = {}  # of processes that are gone
        self.result_segments = 0  # results that came back through a payload segment

    def task_stats(self) -> dict[str, list[float]]:
        """Per task type: completed, failed, seconds, histogram (see `workers.stats`)."""
        return merge([self._retired_stats, *(w.stats for w in self.workers)])

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn every worker and wait until each has answered READY; a worker that dies
        before it does is replaced, up to START_ATTEMPTS processes in all (RuntimeError when
        the last dies too, or `timeout` passes first)."""
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        if self.run_dir is not None and self._context.get_start_method() == "forkserver":
            _keep_forkserver_socket_in(self.run_dir)
        for worker in self.workers:
            worker.ready = self._loop.create_future()
            worker.start_deaths = 0
            await self._spawn(worker)
        waits = [w.ready for w in self.workers if w.ready is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            late = [w.index for w in self.workers if w.status is not WorkerStatus.READY]
            raise RuntimeError(f"workers {late} did not start within {timeout:.0f} s") from None
        finally:
            for worker in self.workers:
                worker.ready = None
        limits = self.limits
        if limits.task_timeout_ms or limits.memory_limit_mb:
            self._watchdog = asyncio.ensure_future(self._watch())
        log.info(
            "%d workers ready in %.0f ms (start method %s)",
            len(self.workers),
            (time.monotonic() - started) * 1000,
            self._context.get_start_method(),
        )

    async def _spawn(self, worker: Worker) -> None:
        assert self._loop is not None
        worker.started_at = time.monotonic()
        worker.received = worker.skipped = 0
        worker.taken_after = worker.taken_through = worker.taken_back = 0
        ours, theirs = socket.socketpair()
        process = None
        try:
            progress = worker.progress
            for field in range(PROGRESS_FIELDS):
                progress[field] = 0
            progress[RUN_LIMIT] = NO_RUN_LIMIT if self._starting_allowed else 0
            process = self._context.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(theirs, self.settings, worker.index, progress),
                name=f"cpnode-worker-{worker.index}",
                daemon=True,
            )
            try:
                # In a thread: `start()` waits for the forkserver to fork, and a forkserver
                # that died (its workers die with it) is first started again, a new interpreter
                # importing the preloaded modules: 0.2 s the event loop must not wait.
                # `start()` also polls the other children (multiprocessing's `_cleanup`), so
                # no sentinel is read on the loop meanwhile (see `_reap`).
                self._spawning += 1
                try:
                    await asyncio.to_thread(process.start)
                finally:
                    self._spawning -= 1
            finally:
                theirs.close()
            if self._stopping:  # stop() ran meanwhile and would not see this process
                raise asyncio.CancelledError
            worker.process = process
            worker.pid = process.pid
            worker.status = WorkerStatus.STARTING
            worker.killed_for_timeout = 0
            limit = self.limits.max_tasks_per_child
            worker.budget = limit if limit > 0 else sys.maxsize
            transport, _ = await self._loop.create_connection(
                lambda: _Channel(self, worker), sock=ours
            )
        except BaseException:
            # Nothing half-made is left: the socket, and a process no channel would reach.
            ours.close()
            if process is not None and process.pid is not None:
                process.kill()
                self._loop.call_later(1.0, process.join, 0)  # reaped later, off the loop's path
            worker.status = WorkerStatus.DEAD
            raise
        worker.transport = transport
        self._loop.add_reader(process.sentinel, self._sentinel, worker)

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every channel (workers exit at EOF), then terminate and kill stragglers."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        for handle in self._respawns:
            handle.cancel()
        self._respawns.clear()
        for worker in self.workers:
            if worker.status is not WorkerStatus.DEAD:
                worker.status = WorkerStatus.STOPPING
            self._close_channel(worker)
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if process.is_alive():
                # Workers ignore SIGTERM (the supervisor owns shutdown), so no polite signal.
                if timeout > 0:
                    log.warning("worker %d did not exit in time; killing it", worker.index)
                process.kill()
            await asyncio.to_thread(process.join, 2.0)
            self._forget_process(worker)
            self._end_channel(worker)
            process.close()
            worker.process = None

    # ------------------------------------------------------------------------------- traffic

    def send(self, worker: Worker, ids: list[str], frames: bytes) -> None:
        """Hand `ids` (already framed back to back in `frames`) to `worker`; at most
        `worker.budget` of them."""
        assert worker.transport is not None
        worker.assigned.extend(ids)
        worker.transport.write(frames)
        worker.budget -= len(ids)
        if worker.budget <= 0:
            self.retire(worker, f"max_tasks_per_child = {self.limits.max_tasks_per_child}")

    @property
    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.takes_tasks]

    def _ready(self, worker: Worker, pid: int) -> None:
        worker.pid = pid
        worker.status = WorkerStatus.READY
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_result(None)
        self._on_worker_ready(worker)

    @staticmethod
    def running(worker: Worker) -> bool:
        """Whether `worker` runs a task now, by its progress slot."""
        progress = worker.progress
        started, finished = progress[STARTED], progress[FINISHED]
        if started <= finished:
            return False
        # After a take-back `STARTED` names the last task taken, none of which runs: once the
        # task running then has finished, nothing runs until the worker claims another.
        return not (started == worker.taken_through and finished >= worker.taken_after)

    @property
    def can_take_back(self) -> bool:
        return compare_and_swap is not None

    def take_back(self, worker: Worker, started: int) -> int:
        """Take back the tasks `worker` holds behind task number `started` (its `STARTED` as
        the caller read it) while it runs that task (work stealing): how many, the newest of
        `worker.assigned`, which the caller takes out and sends elsewhere; the worker skips
        them unanswered. 0 when there are none, the worker moved on meanwhile, the install
        has no compiled module, or a drain began (`stop_starting`: then the worker skips them
        itself, and a task it skips is never one taken back, see `_worker_died`)."""
        if compare_and_swap is None or not self._starting_allowed or not self.running(worker):
            return 0
        progress = worker.progress
        last = worker.received + len(worker.assigned)  # the number of the last task sent
        count = last - started
        if count <= 0 or not compare_and_swap(progress, STARTED, started, last):
            return 0  # all started, or the worker claimed one meanwhile
        if started != worker.taken_through:  # else more taken while the same task runs
            worker.taken_after = started
        worker.taken_through = last
        worker.received += count
        worker.taken_back += count
        worker.budget += count
        return count

    def stop_starting(self) -> None:
        """Start no task not already started (a drain): each worker finishes the one it runs and
        answers the ones it holds with `SKIPPED` (`on_skipped`)."""
        self._starting_allowed = False
        for worker in self.workers:
            progress = worker.progress
            progress[RUN_LIMIT] = progress[STARTED]

    def _skipped(self, worker: Worker, count: int) -> None:
        worker.received += count
        worker.skipped += count
        self._on_skipped(worker, count)
        if worker.status is WorkerStatus.RETIRING and not worker.assigned:
            self._close_channel(worker)

    def _result_segment(self, worker: Worker, name: str) -> None:
        """A result the worker wrote to a segment: take the segment over (the file goes now,
        the mapping when the last view of it does) and pass the mapped frame on. A segment
        that cannot be mapped still answers the task, with an `Error`."""
        try:
            segment = PayloadSegment.open(self.settings.shm_dir, name, unlink=True)
        except (OSError, ValueError) as error:
            log.error("worker %d: cannot map its result segment %s: %s", worker.index, name, error)
            ident = worker.assigned[0] if worker.assigned else ""
            lost = m.Error(
                f"the task's result was lost on its way from worker {worker.index}: {error}"
            )
            self._on_result_lost(ident)  # counted as failed (the worker counted it as run)
            self._results(worker, 1, frame(codec.task_result_payload(ident, lost)))
            return
        self.result_segments += 1
        self._results(worker, 1, segment.detach())

    def _results(self, worker: Worker, count: int, blob: Frames) -> None:
        worker.tasks_done += count
        worker.received += count
        self._on_results(worker, count, blob)
        if worker.status is WorkerStatus.RETIRING and not worker.assigned:
            self._close_channel(worker)

    # ------------------------------------------------------------------------------- limits

    def retire(self, worker: Worker, reason: str) -> None:
        """Recycle `worker` between tasks: send it nothing more, let it answer what it holds,
        then close its channel (it exits) and start a fresh process in its place."""
        if worker.status is not WorkerStatus.READY:
            return
        worker.status = WorkerStatus.RETIRING
        log.info("recycling worker %d (pid %s): %s", worker.index, worker.pid, reason)
        worker.retired_for = f"{_RECYCLED}{reason.split(' ')[0]}"  # counted once it is gone
        if not worker.assigned:
            self._close_channel(worker)

    @property
    def deaths(self) -> int:
        """Replacements of workers that died or were killed (recycling left out)."""
        return sum(
            n for cause, n in self.restarts_by_cause.items() if not cause.startswith(_RECYCLED)
        )

    def _count_replacement(self, worker: Worker, cause: str) -> None:
        self.restarts_by_cause[cause] += 1
        worker.restarts += 1

    def _close_channel(self, worker: Worker) -> None:
        """Send the worker nothing more: it sees the end of its input, sends what it still
        holds (the stats of its last tasks, which a recycled worker's metrics once lost) and
        exits."""
        transport = worker.transport
        if transport is None:
            return
        worker.transport = None
        if transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            worker.draining = transport
        else:
            transport.close()

    def _end_channel(self, worker: Worker) -> None:
        """The process is gone: read what it wrote last, then close its channel."""
        transport = worker.transport or worker.draining
        if transport is None:
            return
        # Results the worker wrote just before it died may still wait in the socket; take
        # them now, so they count as answered rather than lost.
        self._read_remaining(transport)
        worker.transport = worker.draining = None
        transport.close()

    async def _watch(self) -> None:
        """Kill workers whose running task passed `task_timeout_ms`; retire workers above
        `memory_limit_mb` (checked every MEMORY_CHECK_S, off the loop)."""
        limits = self.limits
        timeout_ns = limits.task_timeout_ms * 1_000_000
        step = MEMORY_CHECK_S
        if timeout_ns:
            step = min(step, max(0.01, limits.task_timeout_ms / 4000))
        memory_due = time.monotonic() + MEMORY_CHECK_S
        while True:
            await asyncio.sleep(step)
            if timeout_ns:
                self._kill_overdue(timeout_ns)
            if limits.memory_limit_mb and time.monotonic() >= memory_due:
                memory_due = time.monotonic() + MEMORY_CHECK_S
                await self._check_memory(limits.memory_limit_mb << 20)

    def _kill_overdue(self, timeout_ns: int) -> None:
        now = time.monotonic_ns()
        for worker in self.workers:
            if worker.status not in (WorkerStatus.READY, WorkerStatus.RETIRING):
                continue
            if not self.running(worker) or now - worker.progress[STARTED_AT_NS] <= timeout_ns:
                continue
            if worker.killed_for_timeout or worker.process is None:
                continue
            worker.killed_for_timeout = self.limits.task_timeout_ms
            log.error(
                "worker %d (pid %s): a task has run longer than task_timeout_ms = %d ms; "
                "killing the worker",
                worker.index,
                worker.pid,
                self.limits.task_timeout_ms,
            )
            worker.process.kill()

    async def _check_memory(self, limit_bytes: int) -> None:
        ready = [w for w in self.workers if w.status is WorkerStatus.READY and w.pid is not None]
        usage = await asyncio.to_thread(_unique_memory, [w.pid for w in ready if w.pid])
        for worker in ready:
            used = usage.get(worker.pid or 0, 0)
            if used > limit_bytes and worker.status is WorkerStatus.READY:
                self.retire(
                    worker,
                    f"memory_limit_mb = {limit_bytes >> 20} (it uses {used / 2**20:.0f} MiB USS)",
                )

    # ------------------------------------------------------------------------------- failures

    def _forget_process(self, worker: Worker) -> None:
        if self._loop is not None and worker.process is not None:
            self._loop.remove_reader(worker.process.sentinel)

    def _sentinel(self, worker: Worker) -> None:
        process = worker.process
        assert process is not None
        self._forget_process(worker)
        self._reap(worker, process, time.monotonic() + _REAP_WAIT_S)

    def _reap(
        self, worker: Worker, process: multiprocessing.process.BaseProcess, deadline: float
    ) -> None:
        """Read the dead worker's exit code without blocking the event loop: the sentinel can
        turn readable a moment before the process can be reaped (its pipe closes as it exits),
        so look again shortly, until `deadline`."""
        if worker.process is not process:  # stop() reaped it meanwhile
            return
        assert self._loop is not None
        if self._spawning:  # a `start()` in a thread may be polling this process: not both
            self._loop.call_later(
                _REAP_RETRY_S, self._reap, worker, process, deadline + _REAP_RETRY_S
            )
            return
        process.join(0)
        if process.exitcode is None and time.monotonic() < deadline:
            assert self._loop is not None
            self._loop.call_later(_REAP_RETRY_S, self._reap, worker, process, deadline)
            return
        self._worker_died(worker, process)

    def _worker_died(self, worker: Worker, process: multiprocessing.process.BaseProcess) -> None:
        how = describe_exit(process.exitcode)
        self._end_channel(worker)
        # A worker that exited by itself (status 0: its channel closed, at a stop or a retire)
        # left nothing half-written; one that died or was killed may have.
        if worker.pid is not None and process.exitcode != 0:
            # A result segment it was still writing (its message never came) is nobody's now,
            # and so are the temporary files of a store entry or disk file it was writing:
            # removed in a thread (freeing a big segment takes the kernel tens of ms, and with
            # a quota, finding a temporary file recounts the whole storage_dir).
            assert self._loop is not None
            sweep = self._loop.run_in_executor(None, _sweep_dead_worker, self.settings, worker.pid)
            sweep.add_done_callback(functools.partial(_log_sweep, worker.index))
        self._retired_stats = merge([self._retired_stats, worker.stats])
        worker.stats = {}
        was_stopping = worker.status is WorkerStatus.STOPPING or self._stopping
        retired = worker.status is WorkerStatus.RETIRING and not worker.assigned
        worker.status = WorkerStatus.DEAD
        if worker.ready is not None and not worker.ready.done():
            # Replaced below, up to START_ATTEMPTS processes: `ready` waits for the next one.
            worker.start_deaths += 1
            if was_stopping or worker.start_deaths >= START_ATTEMPTS:
                times = f" ({worker.start_deaths} times)" if worker.start_deaths > 1 else ""
                error = RuntimeError(f"worker {worker.index} died at start: {how}{times}")
                worker.ready.set_exception(error)
        if was_stopping:
            return
        process.close()
        worker.process = None
        if retired:
            log.debug("worker %d (pid %s) retired: %s", worker.index, worker.pid, how)
            self._count_replacement(worker, worker.retired_for)
            self._schedule_respawn(worker, crashed=False)
            return
        # Of the tasks numbered up to `STARTED` (claimed, or taken back), `received` were
        # answered or taken back; the rest, the oldest the worker holds, had started. In a
        # drain, tasks from `SKIPPED_FROM` on were claimed only to be skipped (the field is
        # written before the first is claimed), so count up to the one before it: the tasks
        # answered with results or taken back are all numbered below it (nothing is taken back
        # once a drain began), the ones answered SKIPPED all from it on.
        progress = worker.progress
        claimed, answered = progress[STARTED], worker.received
        skipped_from = progress[SKIPPED_FROM]
        if skipped_from:
            claimed = min(claimed, skipped_from - 1)
            answered -= worker.skipped
        started = min(len(worker.assigned), max(0, claimed - answered))
        loss = WorkerLoss(
            how=how,
            started=started,
            # A worker skipping had finished every task it ran.
            running=started > 0 and not skipped_from and self.running(worker),
            timeout_ms=worker.killed_for_timeout,
        )
        if loss.timeout_ms:
            self._count_replacement(worker, f"task_timeout_ms = {loss.timeout_ms}")
        else:
            log.error("worker %d (pid %s) died: %s", worker.index, worker.pid, how)
            self._count_replacement(worker, how)
        self._on_worker_lost(worker, loss)
        self._schedule_respawn(worker, crashed=not loss.timeout_ms)

    def _read_remaining(self, transport: asyncio.Transport) -> None:
        channel = transport.get_protocol()
        sock = transport.get_extra_info("socket")
        if sock is None or not isinstance(channel, _Channel):
            return
        while True:
            try:
                data = os.read(sock.fileno(), 1 << 20)
            except OSError:  # BlockingIOError: nothing more; any other: nothing to read
                return
            if not data:
                return
            channel.data_received(data)

    def _respawned(self, worker: Worker, task: asyncio.Future[None]) -> None:
        """A respawn that failed (no socket or process to be had, say) is tried again, backing
        off as after a crash: a worker slot is never given up while the node runs."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("respawning worker %d failed: %s; trying again", worker.index, task.exception())
        if not self._stopping:
            self._schedule_respawn(worker, crashed=True)

    def _schedule_respawn(self, worker: Worker, *, crashed: bool) -> None:
        """Start a new process for `worker`: at once after a retirement or a time-limit kill,
        after a delay doubling with each crash in a row (a crash loop backs off)."""
        assert self._loop is not None
        if crashed:
            # A crash loop is a worker dying before it gets anything done: one that answered
            # tasks (and was killed, say) comes back at once.
            lived = time.monotonic() - worker.started_at
            stable = worker.received > worker.taken_back or lived > _STABLE_AFTER_S
            worker.crashes_in_a_row = 0 if stable else worker.crashes_in_a_row + 1
            delay = min(_RESPAWN_BACKOFF_MAX_S, 0.05 * (2 ** max(0, worker.crashes_in_a_row - 1)))
        else:
            delay = 0.0
        if crashed and worker.crashes_in_a_row > 1:
            log.warning("worker %d keeps dying; respawning in %.2f s", worker.index, delay)

        def respawn() -> None:
            self._respawns.discard(handle)
            if not self._stopping:
                task = asyncio.ensure_future(self._spawn(worker))
                task.add_done_callback(functools.partial(self._respawned, worker))

        handle = self._loop.call_later(delay, respawn)
        self._respawns.add(handle)


def _keep_forkserver_socket_in(directory: str) -> None:
    """multiprocessing puts the forkserver's listening socket in a `pymp-*` directory in /tmp
    that only a clean exit of this process removes: a supervisor killed by SIGKILL would leave it
    behind for good. In `directory` (the node's own, which a clean stop removes and a restart with
    the same node_id clears) it goes with the node. `tempdir` is multiprocessing's cache of that
    directory: set before the forkserver starts, nothing is created in /tmp and no clean-up of
    its own is registered. A path too long for a Unix socket keeps the default."""
    config = multiprocessing.process.current_process()._config  # type: ignore[attr-defined]
    if config.get("tempdir") is None and len(os.fsencode(directory)) + len("/listener-") + 8 < 108:
        config["tempdir"] = directory


def _unique_memory(pids: list[int]) -> dict[int, int]:
    """USS (bytes) of each live pid: memory that would be freed if it exited."""
    usage = {}
    for pid in pids:
        try:
            usage[pid] = psutil.Process(pid).memory_full_info().uss
        except (psutil.Error, OSError):
            continue
    return usage


def _sweep_dead_worker(settings: WorkerSettings, pid: int) -> tuple[list[str], list[str]]:
    """What the dead worker ``pid`` left half-written: (its result segments, its store files),
    removed; each sweep is tried even when the other fails (the error says which)."""
    try:
        orphans = sweep_segments(settings.shm_dir, node_prefix(settings.node_id), creator=pid)
    except OSError as error:
        log.error("could not remove the unfinished result segments of pid %d: %s", pid, error)
        orphans = []
    return orphans, sweep_dead_worker_files(settings, pid)


def _log_sweep(index: int, sweep: asyncio.Future[tuple[list[str], list[str]]]) -> None:
    if sweep.cancelled():
        return
    error = sweep.exception()
    if error is not None:  # cleaning up never keeps the dead worker's tasks from an answer
        log.error("could not remove the temporary store files of worker %d: %s", index, error)
        return
    orphans, unfinished = sweep.result()
    if orphans:
        log.warning("removed %d unfinished result segments of worker %d", len(orphans), index)
    if unfinished:
        log.warning(
            "removed %d unfinished store files of worker %d: %s",
            len(unfinished),
            index,
            ", ".join(unfinished),
        )
