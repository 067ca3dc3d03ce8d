"""Frames from the master → batches for workers; worker results → the master link.

    MasterLink ──accept(id, payload)──▶ pending (FIFO) ──flush, once per loop turn──▶ workers
    WorkerPool ──on_results(worker, n, frames)──▶ forget n ids ──▶ MasterLink.send_results

The dispatcher knows where every task is (DESIGN contract 5): waiting in `pending`, or held by
exactly one worker (`Worker.assigned`, oldest first). Each worker holds at most `prefetch`
tasks. Tasks are batched without added latency: `accept` only queues and schedules one flush
for the end of the current loop turn, so everything that arrived in one read goes out in one
write per worker. A repeated id of a task still held here joins it (one execution, one result).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import Callable

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame
from workers.pool import Worker, WorkerPool, WorkerStatus

log = logging.getLogger("cpnode.dispatch")


class Dispatcher:
    def __init__(self, prefetch: int, send_results: Callable[[bytes, int], None]) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        self.prefetch = prefetch
        self._send_results = send_results
        self._pending: collections.deque[tuple[str, bytes]] = collections.deque()
        self._held: set[str] = set()  # ids pending or assigned
        # Payloads of the tasks workers hold, to re-dispatch those a dead worker never started.
        self._running: dict[str, bytes] = {}
        self._retried: set[str] = set()  # ids already retried once after a worker died
        self._workers: list[Worker] = []
        self.pool: WorkerPool | None = None
        # Runs HttpRequest/Tcp/Udp in the event loop (they wait, they do not compute); it
        # answers through `io_finished`. None: those tasks go to workers like any other.
        self.io_runner: Callable[[str, bytes], None] | None = None
        self.io_running = 0
        self.received_by_type: collections.Counter[str] = collections.Counter()
        self._flush_scheduled = False
        self._accepting = True
        self.received = 0
        self.completed = 0
        self.joined_duplicates = 0
        self.idle = asyncio.Event()
        self.idle.set()

    # ------------------------------------------------------------------------------- state

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def held(self) -> int:
        """Tasks accepted and not yet answered (pending + running)."""
        return len(self._held)

    def has_capacity(self) -> bool:
        """True when a worker could start a task now (the node should ask for more)."""
        free = sum(self.prefetch - len(w.assigned) for w in self._ready_workers())
        return free > len(self._pending)

    def _ready_workers(self) -> list[Worker]:
        return [w for w in self._workers if w.status is WorkerStatus.READY]

    # ------------------------------------------------------------------------------- input

    def accept(self, ident: str, payload: bytes) -> None:
        """Queue an `AssignTask` payload (its id read by `codec.peek`)."""
        if ident in self._held:
            self.joined_duplicates += 1
            return
        if not self._accepting:
            # Draining: the master gets it back by evicting us or when we close.
            return
        self._held.add(ident)
        self.received += 1
        self.idle.clear()
        match = _TASK_VARIANT.search(payload, 0, 4096)
        kind = match.group(1).decode() if match is not None else "malformed"
        self.received_by_type[kind] += 1
        if kind in _IO_TASKS and self.io_runner is not None:
            self.io_running += 1
            self.io_runner(ident, payload)
            return
        self._pending.append((ident, payload))
        self._schedule_flush()

    def io_finished(self, ident: str, result_frame: bytes) -> None:
        """The I/O runner's answer for `ident` (a wire-ready `TaskResult` frame)."""
        self.io_running -= 1
        self._held.discard(ident)
        self.completed += 1
        self._send_results(result_frame, 1)
        self._check_idle()

    def stop_accepting(self) -> list[str]:
        """Start a drain: drop tasks not yet started (the master re-queues them); keep the rest."""
        self._accepting = False
        dropped = [ident for ident, _ in self._pending]
        for ident in dropped:
            self._held.discard(ident)
        self._pending.clear()
        self._check_idle()
        return dropped

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        workers = sorted(self._ready_workers(), key=lambda w: len(w.assigned))
        for worker in workers:
            room = self.prefetch - len(worker.assigned)
            if room <= 0 or not pending:
                continue
            take = min(room, len(pending))
            batch = [pending.popleft() for _ in range(take)]
            self._running.update(batch)
            blob = b"".join([frame(payload) for _, payload in batch])
            assert self.pool is not None
            self.pool.send(worker, [ident for ident, _ in batch], blob)

    # ------------------------------------------------------------------------------- workers

    def worker_ready(self, worker: Worker) -> None:
        if worker not in self._workers:
            self._workers.append(worker)
        self._schedule_flush()

    def results(self, worker: Worker, count: int, blob: bytes) -> None:
        assigned = worker.assigned
        held = self._held
        running = self._running
        for _ in range(count):
            ident = assigned.popleft()
            held.discard(ident)
            del running[ident]
        if self._retried:  # rare: only after a worker died
            self._retried.intersection_update(held)
        self.completed += count
        self._send_results(blob, count)
        if self._pending:
            self._schedule_flush()
        else:
            self._check_idle()

    def worker_lost(self, worker: Worker, how: str) -> None:
        """Answer or retry the task the dead worker was running; re-queue the ones behind it.

        The oldest task a worker holds is the one it was running (it answers in order). A task
        that is safe to repeat is retried once; any other gets an `Error` naming the cause.
        """
        assigned = worker.assigned
        requeue: list[tuple[str, bytes]] = []
        if assigned:
            suspect = assigned.popleft()
            payload = self._running.pop(suspect)
            if _is_idempotent(payload) and suspect not in self._retried:
                self._retried.add(suspect)
                requeue.append((suspect, payload))
                log.warning(
                    "retrying task %s once: worker %d died (%s)", suspect, worker.index, how
                )
            else:
                self._retried.discard(suspect)
                self._held.discard(suspect)
                error = m.Error(f"worker {worker.index} died while running this task: {how}")
                self._send_results(frame(codec.task_result_payload(suspect, error)), 1)
                self.completed += 1
        requeue.extend((ident, self._running.pop(ident)) for ident in assigned)
        assigned.clear()
        self._pending.extendleft(reversed(requeue))
        if requeue:
            log.warning("re-dispatching %d tasks held by worker %d", len(requeue), worker.index)
        self._schedule_flush()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._held:
            self.idle.set()


_IDEMPOTENT = frozenset(
    {b"Compute", b"ComplexMath", b"RetrieveData", b"DiskRead", b"GetGlobalRam", b"GetStorage"}
)
_IO_TASKS = frozenset({"HttpRequest", "Tcp", "Udp"})
_TASK_VARIANT = re.compile(rb'"task"\s*:\s*(?:\{\s*)?"([A-Za-z]+)"')


def _is_idempotent(payload: bytes) -> bool:
    """True for the task types that are safe to run twice (read-only or pure)."""
    match = _TASK_VARIANT.search(payload, 0, 4096)
    return match is not None and match.group(1) in _IDEMPOTENT
