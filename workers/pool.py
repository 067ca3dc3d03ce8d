"""The worker pool, seen from the supervisor's event loop.

    WorkerPool.start() ─ spawn N processes (forkserver) ─ each sends READY ─ pool is up
    WorkerPool.send(worker, ids, frames) ──socketpair──▶ worker process
    worker process ──RESULTS──▶ on_results(worker, count, blob)      (in completion order)
    process sentinel readable ──▶ on_worker_lost(worker, description) ─ respawn with backoff

Each worker owns one Unix socket pair, driven on the supervisor side by an asyncio transport,
so a send never blocks the loop (the transport buffers while the worker is busy). A worker's
death is noticed through its process sentinel at once, not by a timeout; `describe_exit` names
the exit code or signal for the log and for the `Error` of the task it was running.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import multiprocessing
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext

import orjson

from workers.channel import HEADER, READY, RESULTS, STATS
from workers.stats import merge
from workers.tasks import WorkerSettings
from workers.worker import worker_main

log = logging.getLogger("cpnode.pool")

_RESPAWN_BACKOFF_MAX_S = 5.0
_STABLE_AFTER_S = 10.0


class WorkerStatus(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"
    STOPPING = "stopping"


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

    def __init__(self, index: int) -> None:
        self.index = index
        self.status = WorkerStatus.STARTING
        self.process: multiprocessing.process.BaseProcess | None = None
        self.pid: int | None = None
        self.transport: asyncio.Transport | None = None
        # Ids sent to this worker and not yet answered, oldest first: the worker answers in
        # order, so a RESULTS message of `count` frames answers the `count` oldest.
        self.assigned: collections.deque[str] = collections.deque()
        self.ready: asyncio.Future[None] | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.tasks_done = 0
        self.stats: dict[str, list[float]] = {}  # latest snapshot from the live process

    def __repr__(self) -> str:
        return f"<Worker {self.index} pid={self.pid} {self.status.value} held={len(self.assigned)}>"


class _Channel(asyncio.Protocol):
    """Parses the worker's messages (see `workers.channel`)."""

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self._pool = pool
        self._worker = worker
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        size = HEADER.size
        pos = 0
        while len(buffer) - pos >= size:
            kind, count, length = HEADER.unpack_from(buffer, pos)
            end = pos + size + length
            if len(buffer) < end:
                break
            body = bytes(buffer[pos + size : end])
            pos = end
            if kind == RESULTS:
                self._pool._results(self._worker, count, body)
            elif kind == READY:
                self._pool._ready(self._worker, int(body))
            elif kind == STATS:
                self._worker.stats = orjson.loads(body)
        if pos:
            del buffer[:pos]

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
        on_results: Callable[[Worker, int, bytes], None],
        on_worker_ready: Callable[[Worker], None],
        on_worker_lost: Callable[[Worker, str], None],
        start_method: str = "forkserver",
    ) -> None:
        if size < 1:
            raise ValueError("a pool needs at least one worker")
        self.settings = settings
        self.workers = [Worker(i) for i in range(size)]
        self._on_results = on_results
        self._on_worker_ready = on_worker_ready
        self._on_worker_lost = on_worker_lost
        self._context: BaseContext = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._context.set_forkserver_preload(["workers.forkserver_init", "workers.worker"])
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._respawns: set[asyncio.TimerHandle] = set()
        self.restarts_by_cause: collections.Counter[str] = collections.Counter()
        self._retired_stats: dict[str, list[float]] = {}  # of processes that are gone

    def task_stats(self) -> dict[str, list[float]]:
        """Per task type: completed, failed, seconds, histogram (see `workers.stats`)."""
        return merge([self._retired_stats, *(w.stats for w in self.workers)])

    # ------------------------------------------------------------------------------- lifecycle

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn every worker and wait until each has answered READY."""
        self._loop = asyncio.get_running_loop()
        started = time.monotonic()
        for worker in self.workers:
            await self._spawn(worker)
        waits = [w.ready for w in self.workers if w.ready is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout)
        except TimeoutError:
            late = [w.index for w in self.workers if w.status is not WorkerStatus.READY]
            raise RuntimeError(f"workers {late} did not start within {timeout:.0f} s") from None
        log.info(
            "%d workers ready in %.0f ms (start method %s)",
            len(self.workers),
            (time.monotonic() - started) * 1000,
            self._context.get_start_method(),
        )

    async def _spawn(self, worker: Worker) -> None:
        assert self._loop is not None
        ours, theirs = socket.socketpair()
        process = self._context.Process(  # type: ignore[attr-defined]
            target=worker_main,
            args=(theirs, self.settings, worker.index),
            name=f"cpnode-worker-{worker.index}",
            daemon=True,
        )
        try:
            process.start()
        finally:
            theirs.close()
        worker.process = process
        worker.pid = process.pid
        worker.status = WorkerStatus.STARTING
        worker.started_at = time.monotonic()
        worker.ready = self._loop.create_future()
        transport, _ = await self._loop.create_connection(lambda: _Channel(self, worker), sock=ours)
        worker.transport = transport
        self._loop.add_reader(process.sentinel, self._sentinel, worker)

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every channel (workers exit at EOF), then terminate and kill stragglers."""
        self._stopping = True
        for handle in self._respawns:
            handle.cancel()
        self._respawns.clear()
        for worker in self.workers:
            if worker.status is not WorkerStatus.DEAD:
                worker.status = WorkerStatus.STOPPING
            if worker.transport is not None:
                worker.transport.close()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            process = worker.process
            if process is None:
                continue
            while process.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            if process.is_alive():
                # Workers ignore SIGTERM (the supervisor owns shutdown), so no polite signal.
                log.warning("worker %d did not exit in time; killing it", worker.index)
                process.kill()
            await asyncio.to_thread(process.join, 2.0)
            self._forget_process(worker)
            process.close()
            worker.process = None

    # ------------------------------------------------------------------------------- traffic

    def send(self, worker: Worker, ids: list[str], frames: bytes) -> None:
        """Hand `ids` (already framed back to back in `frames`) to `worker`."""
        assert worker.transport is not None
        worker.assigned.extend(ids)
        worker.transport.write(frames)

    @property
    def ready_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.status is WorkerStatus.READY]

    def _ready(self, worker: Worker, pid: int) -> None:
        worker.pid = pid
        worker.status = WorkerStatus.READY
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_result(None)
        self._on_worker_ready(worker)

    def _results(self, worker: Worker, count: int, blob: bytes) -> None:
        worker.tasks_done += count
        self._on_results(worker, count, blob)

    # ------------------------------------------------------------------------------- failures

    def _forget_process(self, worker: Worker) -> None:
        if self._loop is not None and worker.process is not None:
            self._loop.remove_reader(worker.process.sentinel)

    def _sentinel(self, worker: Worker) -> None:
        process = worker.process
        assert process is not None
        self._forget_process(worker)
        process.join(0)
        how = describe_exit(process.exitcode)
        self._retired_stats = merge([self._retired_stats, worker.stats])
        worker.stats = {}
        was_stopping = worker.status is WorkerStatus.STOPPING or self._stopping
        worker.status = WorkerStatus.DEAD
        if worker.transport is not None:
            worker.transport.close()
            worker.transport = None
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.index} died at start: {how}"))
        if was_stopping:
            return
        log.error("worker %d (pid %s) died: %s", worker.index, worker.pid, how)
        self.restarts_by_cause[how] += 1
        self._on_worker_lost(worker, how)
        process.close()
        worker.process = None
        self._schedule_respawn(worker)

    def _schedule_respawn(self, worker: Worker) -> None:
        assert self._loop is not None
        lived = time.monotonic() - worker.started_at
        worker.restarts = 0 if lived > _STABLE_AFTER_S else worker.restarts + 1
        delay = min(_RESPAWN_BACKOFF_MAX_S, 0.05 * (2 ** max(0, worker.restarts - 1)))
        if worker.restarts > 1:
            log.warning("worker %d keeps dying; respawning in %.2f s", worker.index, delay)

        def respawn() -> None:
            self._respawns.discard(handle)
            if not self._stopping:
                task = asyncio.ensure_future(self._spawn(worker))
                task.add_done_callback(_log_failure)

        handle = self._loop.call_later(delay, respawn)
        self._respawns.add(handle)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("respawning a worker failed: %s", task.exception())
