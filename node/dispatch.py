"""Frames from the master → batches for workers; worker results → the master link.

    MasterLink ──accept_from_master(ids, payloads)──▶ pending (FIFO, in runs) ──flush, once per
                                                              loop turn──▶ workers
    WorkerPool ──on_results(worker, n, frames)──▶ forget n ids ──▶ MasterLink.send_results

The dispatcher knows where every task is (DESIGN contract 5): waiting in `pending`, or held by
exactly one worker (`Worker.assigned`, oldest first). Each worker holds at most `prefetch` tasks
and `PREFETCH_BYTES` of payloads, the waiting tasks shared out evenly. Tasks a worker holds
behind one that has run `TAKE_BACK_AFTER_S` go back to `pending`, first in line, when another
worker idles (`_take_back`: each still runs once, see `WorkerPool.take_back`), and that worker
gets no more until its task ends. Tasks are batched without added latency: `accept` only queues
and schedules one flush for the end of the current loop turn, so everything that arrived in one
read goes out in one write per worker. A repeated id of a task still held here joins it (one
execution, one result). So does a repeated id whose result is still on its way to the master
(not confirmed yet): a master that restarted, or re-queued a task while its result was in
transit, assigns it again before it reads that result; the result is sent once more instead of
running the task again.

When a worker dies, `WorkerLoss` says which of its tasks it had started: the one it was running
gets an `Error` naming the cause (the time limit, or the exit code or signal) unless it is safe
to repeat and was not retried yet; finished tasks whose results died with it are retried the
same way; the tasks it never started are dispatched again, first in line. While draining,
tasks are no longer accepted: `handed_back` counts those the master must take back.

Metrics cost nothing per task here: workers count the tasks they answer, by type, and report
now and then (`workers.stats`). What the dispatcher answers itself it counts by type as it
answers (`answered_here`, `failed_here`: a dead worker's `Error`s, the I/O tasks' results, the
`Error`s of a drain for direct links), on those rare paths only, so that every answered task is
counted once under its type.

Direct links (node/direct.py) hand tasks in with a `reply` sink: their results go back on that
link instead of to the master (`_replies`, looked at only while it is not empty, so the master's
path pays nothing). With `offload` set, a master task that arrives while the workers have no
room may be taken by a dialed direct peer; it is answered through `io_finished` like an I/O
task, or handed back with `run_locally` when the peer is lost.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import time
from collections.abc import Callable
from typing import Final, Protocol

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame, frames_of
from shm import native
from shm.segments import spilled
from workers.channel import Frames
from workers.pool import Worker, WorkerLoss, WorkerPool, WorkerStatus
from workers.worker import STARTED, STARTED_AT_NS

log = logging.getLogger("cpnode.dispatch")


ResultSink = Callable[[Frames, list[str]], None]
"""Where result frames go: wire-ready frames back to back, and their ids in the same order."""


class ResultOutbox(Protocol):
    """What the dispatcher asks the master link about results it handed over."""

    results_sent: int  # results handed to the link so far (cumulative)
    results_confirmed: int  # of those, confirmed by the master (always the oldest)

    def find_result(self, ident: str) -> Frames | None:
        """The result frame for `ident` while it awaits confirmation, else None."""
        ...


class Dispatcher:
    def __init__(self, prefetch: int, send_results: ResultSink) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be >= 1")
        self.prefetch = prefetch
        self._send_results = send_results
        # Tasks not yet sent to a worker, oldest first, in runs: (ids, payloads) of the same
        # length (a read's new Computes are one run), `_pending_count` tasks in all, their
        # payloads `_pending_bytes` long.
        self._pending: collections.deque[tuple[list[str], list[bytes]]] = collections.deque()
        self._pending_count = 0
        self._pending_bytes = 0
        # Payloads of the tasks pending or held by a worker, by id: a repeated id joins its task,
        # and a dead worker's tasks are dispatched again from here.
        self._held: dict[str, bytes] = {}
        self._retried: set[str] = set()  # ids already retried once after a worker died
        # Called with each payload dropped without being run (a repeat, a task handed back):
        # the node removes the segment a spilled one refers to, in a thread.
        self.discard: Callable[[bytes], None] = lambda payload: None
        self._workers: list[Worker] = []
        self.pool: WorkerPool | None = None
        # Runs HttpRequest/Tcp/Udp in the event loop (they wait, they do not compute); it
        # answers through `io_finished`. None: those tasks go to workers like any other.
        self.io_runner: Callable[[str, bytes], None] | None = None
        self.io_running = 0
        # Where the results of direct-link tasks go, by id (node/direct.py).
        self._replies: dict[str, ResultSink] = {}
        # Takes a master task the workers have no room for (True) or declines it (False); it
        # answers through `io_finished` or gives the task back with `run_locally`.
        self.offload: Callable[[str, bytes], bool] | None = None
        # Tasks received by type, but for `Compute`: the common kind is `received` less these.
        self._received_other_types: collections.Counter[str] = collections.Counter()
        self._flush_scheduled = False
        self._accepting = True
        self.handed_back = 0  # tasks dropped while draining (the master re-queues them)
        self.last_handed_back_at = 0.0  # time.monotonic() of the latest
        self.received = 0
        self.completed = 0  # tasks answered, by a worker's result or here
        # By type, for the metrics (workers count what they answer): the tasks answered here,
        # not by a worker's result; and the `Error`s no worker counted (those answered here,
        # and the one for a worker's result lost on its way, `result_lost`).
        self.answered_here: collections.Counter[str] = collections.Counter()
        self.failed_here: collections.Counter[str] = collections.Counter()
        self.joined_duplicates = 0
        # Payloads of answered tasks whose results may still await confirmation, in two
        # generations: everything in `_answered_before` is confirmed once the link has
        # confirmed `_rotate_at` results (see `forget_confirmed`).
        self.outbox: ResultOutbox | None = None
        self._answered: dict[str, bytes] = {}
        self._answered_before: dict[str, bytes] = {}
        self._rotate_at = 0
        self.results_resent = 0  # repeated ids answered with their unconfirmed result
        self.idle = asyncio.Event()
        self.idle.set()
        self.taken_back = 0  # tasks taken back from a worker busy with a long one (`_take_back`)
        self._take_back_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------- state

    @property
    def pending(self) -> int:
        return self._pending_count

    @property
    def received_by_type(self) -> collections.Counter[str]:
        """Tasks accepted so far, by type (a fresh count)."""
        counts = collections.Counter(self._received_other_types)
        compute = self.received - sum(counts.values())  # the common form, counted only here
        if compute:
            counts["Compute"] += compute
        return counts

    @property
    def held(self) -> int:
        """Tasks accepted and not yet answered (pending + running)."""
        return len(self._held)

    def has_capacity(self) -> bool:
        """True when the workers could take more than the queue holds (the node should ask for
        more): more free places (`prefetch`) and more free payload bytes (`PREFETCH_BYTES`)
        than the queue's tasks need, on workers not busy with a long task (which get none)."""
        free = room = 0
        now = time.monotonic_ns()
        for worker in self._ready_workers():
            places = self._places(worker, now)
            if places > 0:
                free += places
                room += max(PREFETCH_BYTES - worker.inflight_bytes, 0)
        return free > self._pending_count and room > self._pending_bytes

    def _places(self, worker: Worker, now_ns: int) -> int:
        """How many more tasks `worker` may be sent: none while it is busy with a task that
        has run TAKE_BACK_AFTER_S (they would wait behind it), else up to `prefetch` held and
        its process's task budget."""
        if worker.assigned and self._busy_with_a_long_task(worker, now_ns):
            return 0
        return min(self.prefetch - len(worker.assigned), worker.budget)

    def _ready_workers(self) -> list[Worker]:
        return [w for w in self._workers if w.takes_tasks]

    # ------------------------------------------------------------------------------- input

    def accept_from_master(self, ids: list[str], payloads: list[bytes]) -> None:
        """`accept` for the AssignTasks of one read from the master, ids and payloads in
        order: runs of new `Compute`s go straight to the queue (`claim_tasks`, in C where
        built); anything else (a repeated id, another task type, a drain, offloading) takes
        `accept`."""
        if not self._accepting or self.offload is not None:
            for ident, payload in zip(ids, payloads, strict=True):
                self.accept(ident, payload)
            return
        held = self._held
        count = len(ids)
        start = 0
        while start < count:
            end = claim_tasks(ids, payloads, start, held, self._answered, self._answered_before)
            if end > start:
                # Counted and scheduled before the next `accept`, which may raise.
                if end - start == count:  # the whole read, the common case
                    self._enqueue(ids, payloads)
                else:
                    self._enqueue(ids[start:end], payloads[start:end])
                self.received += end - start
                self.idle.clear()
                self._schedule_flush()
            if end < count:
                self.accept(ids[end], payloads[end])
            start = end + 1

    def accept(self, ident: str, payload: bytes, reply: ResultSink | None = None) -> None:
        """Queue an `AssignTask` payload (its id read by `codec.peek`); its result goes to
        `reply` when given (a direct link), else to the master."""
        held = self._held
        if ident in held:
            self.joined_duplicates += 1
            self.discard(payload)
            return
        if (ident in self._answered or ident in self._answered_before) and self._resend(
            ident, payload
        ):
            self.discard(payload)
            return
        if reply is not None and not self._accepting:
            self._answer_stopping(ident, payload, reply)
            self.discard(payload)
            return
        if not self._accepting:
            # Draining: the master gets it back by evicting us or when we close.
            self.handed_back += 1
            self.last_handed_back_at = time.monotonic()
            self.discard(payload)
            return
        if not held:
            self.idle.clear()
        held[ident] = payload
        self.received += 1
        kind = task_type(payload)
        if kind != "Compute":
            self._received_other_types[kind] += 1
        if reply is not None:
            self._replies[ident] = reply
        if kind in _IO_TASKS and self.io_runner is not None:
            self.io_running += 1
            self.io_runner(ident, payload)  # a spilled one is read in the runner's thread
            return
        offload = self.offload
        if (
            offload is not None
            and reply is None
            and kind in _LENDABLE
            and spilled(payload) is None  # a peer gets small tasks only
            and not self.has_capacity()
            and offload(ident, payload)
        ):
            self.io_running += 1
            return
        self._queue(ident, payload)

    def _queue(self, ident: str, payload: bytes) -> None:
        """Put one task at the end of the queue."""
        self._enqueue([ident], [payload])
        self._schedule_flush()

    def _enqueue(self, ids: list[str], payloads: list[bytes], *, first: bool = False) -> None:
        """Add a run to the queue, at its end or `first` in line, counted."""
        if first:
            self._pending.appendleft((ids, payloads))
        else:
            self._pending.append((ids, payloads))
        self._pending_count += len(ids)
        self._pending_bytes += sum(map(len, payloads))

    def _resend(self, ident: str, payload: bytes) -> bool:
        """Answer a repeated `ident` with its result awaiting confirmation, when it is the same
        task (a different task under that id runs). True when answered."""
        previous = self._answered.get(ident) or self._answered_before.get(ident)
        if previous is None or previous != payload or self.outbox is None:
            return False
        result_frame = self.outbox.find_result(ident)
        if result_frame is None:  # confirmed meanwhile: a new request, run it
            return False
        self.results_resent += 1
        self.joined_duplicates += 1
        self._send_results(result_frame, [ident])
        return True

    def forget_confirmed(self) -> None:
        """Let go of answered payloads whose results the master has confirmed: called with
        each batch of results, and by the link at each confirmation (so that a burst's
        payloads, up to a MiB each, do not stay after it, however long the node then idles)."""
        outbox = self.outbox
        if outbox is None:
            self._answered.clear()
        elif outbox.results_confirmed == outbox.results_sent:  # everything is confirmed
            self._answered.clear()
            self._answered_before.clear()
            self._rotate_at = outbox.results_sent
        elif outbox.results_confirmed >= self._rotate_at:
            self._answered_before = self._answered
            self._answered = {}
            self._rotate_at = outbox.results_sent

    def io_finished(self, ident: str, result_frame: bytes) -> None:
        """The answer for `ident` from the I/O runner or a direct peer (a wire-ready
        `TaskResult` frame)."""
        self.io_running -= 1
        payload = self._held.pop(ident, None)
        if payload is not None:  # as a worker's result: a repeat before the ack is re-sent
            self._answered[ident] = payload
            failed = _ERROR_RESULT.search(result_frame, 0, _VARIANT_WINDOW) is not None
            self._count_here(payload, failed)
        self.completed += 1
        reply = self._replies.pop(ident, None) if self._replies else None
        (reply or self._send_results)(result_frame, [ident])
        self.forget_confirmed()
        self._check_idle()

    def run_locally(self, ident: str, payload: bytes) -> None:
        """Take back an offloaded task (its peer was lost) and queue it for the workers."""
        self.io_running -= 1
        self._queue(ident, payload)

    def _route(self, blob: Frames, idents: list[str]) -> None:
        """Send result frames (one per id, in order) to the master or the links they came
        from; runs of frames with the same destination go out in one write."""
        replies = self._replies
        destination: ResultSink | None = None
        run: list[Frames] = []
        run_ids: list[str] = []
        position = 0
        for ident in idents:
            size = int.from_bytes(blob[position : position + 4], "big") + 4
            piece = blob[position : position + size]
            position += size
            target = replies.pop(ident, None) or self._send_results
            if target is not destination and run:
                assert destination is not None
                destination(b"".join(run), run_ids)
                run, run_ids = [], []
            destination = target
            run.append(piece)
            run_ids.append(ident)
        if run:
            assert destination is not None
            destination(b"".join(run), run_ids)

    def stop_accepting(self) -> list[str]:
        """Start a drain: drop tasks not yet sent to a worker (the master re-queues them); keep
        the rest (`WorkerPool.stop_starting` has the workers answer those they did not start
        through `skipped`)."""
        self._accepting = False
        dropped = [ident for ids, _ in self._pending for ident in ids]
        for ident in dropped:
            payload = self._held.pop(ident, None)
            if payload is not None:
                self.discard(payload)
        if self._replies:  # a direct peer has no master to take its tasks back: answer them
            for ids, payloads in self._pending:
                for ident, payload in zip(ids, payloads, strict=True):
                    reply = self._replies.pop(ident, None)
                    if reply is not None:
                        self._answer_stopping(ident, payload, reply)
                        dropped.remove(ident)
        self._pending.clear()
        self._pending_count = 0
        self._pending_bytes = 0
        if dropped:
            self.handed_back += len(dropped)
            self.last_handed_back_at = time.monotonic()
        self._check_idle()
        return dropped

    def skipped(self, worker: Worker, count: int) -> None:
        """A draining worker did not start its `count` oldest tasks: hand them back."""
        assigned = worker.assigned
        idents = [assigned.popleft() for _ in range(count)]
        worker.inflight_bytes -= sum(len(self._held[ident]) for ident in idents)
        self._give_back(idents)

    def io_not_started(self, tasks: list[tuple[str, bytes]]) -> None:
        """Draining: the I/O runner dropped these tasks, (id, payload), before starting them;
        hand them back."""
        self.io_running -= len(tasks)
        for _, payload in tasks:
            self.discard(payload)
        self._give_back([ident for ident, _ in tasks])

    def _give_back(self, idents: list[str]) -> None:
        """Forget held tasks that will not run: the master takes them back by evicting us (a
        direct link, which has no master to take them back, gets an `Error` for each)."""
        handed_back = 0
        for ident in idents:
            payload = self._held.pop(ident)
            self._retried.discard(ident)
            reply = self._replies.pop(ident, None) if self._replies else None
            if reply is not None:
                self._answer_stopping(ident, payload, reply)
            else:
                handed_back += 1
        if handed_back:
            self.handed_back += handed_back
            self.last_handed_back_at = time.monotonic()
        self._check_idle()

    def _answer_stopping(self, ident: str, payload: bytes, reply: ResultSink) -> None:
        """Answer a direct link's task that will not run: the node is draining."""
        reply(frame(codec.task_result_payload(ident, NOT_STARTED)), [ident])
        self.completed += 1
        self._count_here(payload, failed=True)

    def _count_here(self, payload: bytes, failed: bool) -> None:
        """Count a task answered here (not by a worker's result) under its type."""
        kind = task_type(payload)
        self.answered_here[kind] += 1
        if failed:
            self.failed_here[kind] += 1

    def result_lost(self, ident: str) -> None:
        """A worker's result for `ident` was lost on its way and the pool answers the task
        with an `Error` instead: the worker counted the task, but not as failed."""
        payload = self._held.get(ident)
        if payload is not None:
            self.failed_here[task_type(payload)] += 1

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        # The waiting tasks are shared out so that the workers hold about as many each (the
        # least loaded first, none above `prefetch`): a batch of slow tasks smaller than
        # `prefetch` keeps every worker busy instead of queueing behind one (see `_places`).
        workers = sorted(self._ready_workers(), key=lambda w: len(w.assigned))
        now = time.monotonic_ns()
        rooms = [(worker, self._places(worker, now)) for worker in workers]
        rooms = [(worker, room) for worker, room in rooms if room > 0]
        held = sum(len(worker.assigned) for worker, _ in rooms)
        left = len(rooms)
        for worker, room in rooms:
            if not self._pending:
                break
            holds = len(worker.assigned)
            share = -(-(self._pending_count + held) // left) - holds  # up to the even level
            held -= holds
            left -= 1
            if share <= 0:
                continue
            # At least one task for a worker that holds none, however big.
            count = self._fitting(min(room, share), PREFETCH_BYTES - worker.inflight_bytes)
            if not count and worker.assigned:
                continue
            ids, payloads, size = self._take(max(count, 1))
            worker.inflight_bytes += size
            assert self.pool is not None
            self.pool.send(worker, ids, frames_of(payloads))

    def _busy_with_a_long_task(self, worker: Worker, now_ns: int) -> bool:
        assert self.pool is not None
        return (
            self.pool.running(worker)
            and now_ns - worker.progress[STARTED_AT_NS] >= TAKE_BACK_AFTER_NS
        )

    def _arm_take_back_for_idle(self) -> None:
        """A worker idles with nothing queued here: look again once a task another worker
        holds tasks behind may have run long enough."""
        if not self._pending and any(len(w.assigned) > 1 for w in self._workers):
            self._arm_take_back(TAKE_BACK_AFTER_S)

    def _arm_take_back(self, delay: float) -> None:
        if self._take_back_timer is None and self.pool is not None and self.pool.can_take_back:
            loop = asyncio.get_running_loop()
            self._take_back_timer = loop.call_later(delay, self._take_back)

    def _take_back(self) -> None:
        """While a worker idles and no task waits: take back the tasks queued behind a task
        that has run TAKE_BACK_AFTER_S on another worker (not started, so run once wherever
        they go), and share them out."""
        self._take_back_timer = None
        pool = self.pool
        if pool is None or not self._accepting or self._pending:
            return
        if all(worker.assigned for worker in self._ready_workers()):
            return
        now = time.monotonic_ns()
        soonest_ns = 0  # until the next worker's task has run long enough, when one may
        queues = False  # a worker holds tasks behind another
        taken: list[tuple[list[str], list[bytes]]] = []
        for worker in self._workers:
            # A retiring worker (recycled after its last tasks) is robbed too: it gets no more.
            if worker.status not in (WorkerStatus.READY, WorkerStatus.RETIRING):
                continue
            if len(worker.assigned) < 2:
                continue
            queues = True
            # The task numbered `started`, read before its start time (which a worker writes
            # before it claims a task), is the one taken back behind: none if it moved on.
            started = worker.progress[STARTED]
            if not pool.running(worker):  # between two tasks: look again
                continue
            ran_ns = now - worker.progress[STARTED_AT_NS]
            if ran_ns < TAKE_BACK_AFTER_NS:
                left_ns = TAKE_BACK_AFTER_NS - ran_ns
                soonest_ns = min(soonest_ns, left_ns) if soonest_ns else left_ns
                continue
            count = pool.take_back(worker, started)
            if not count:
                continue
            assigned = worker.assigned
            ids = [assigned.pop() for _ in range(count)]
            ids.reverse()
            payloads = [self._held[ident] for ident in ids]
            size = sum(map(len, payloads))
            worker.inflight_bytes -= size
            taken.append((ids, payloads))
            self.taken_back += count
            log.debug(  # counted in cpnode_tasks_taken_back_total
                "took back %d tasks from worker %d: its task has run %.0f ms",
                count,
                worker.index,
                ran_ns / 1e6,
            )
        for ids, payloads in reversed(taken):  # first in line, in the workers' order
            self._enqueue(ids, payloads, first=True)
        if self._pending:
            self._flush()
        elif queues:  # not yet long enough, between tasks, or claimed meanwhile: look again
            self._arm_take_back(soonest_ns / 1e9 if soonest_ns else TAKE_BACK_AFTER_S)

    def _fitting(self, most: int, room_bytes: int) -> int:
        """How many of the oldest pending tasks, at most `most`, have payloads that fit in
        `room_bytes` together. On the loop for every worker with room at each flush, so its
        work is the tasks it counts: a whole run's sizes are summed in C, and a run that does
        not fit is walked only as far as it fits."""
        count = 0
        for _, payloads in self._pending:
            if len(payloads[0]) > room_bytes:  # a worker whose bytes are full, most often
                break
            take = min(len(payloads), most - count)
            size = sum(map(len, itertools.islice(payloads, take)))
            if size > room_bytes:
                for size in map(len, payloads):
                    room_bytes -= size
                    if room_bytes < 0:
                        break
                    count += 1
                break
            count += take
            room_bytes -= size
            if count >= most:
                break
        return count

    def _take(self, most: int) -> tuple[list[str], list[bytes], int]:
        """Up to `most` of the oldest pending tasks, off the queue: (ids, payloads, the
        payloads' bytes)."""
        pending = self._pending
        ids, payloads = pending.popleft()
        if len(ids) > most:  # the rest of the run stays first in line
            pending.appendleft((ids[most:], payloads[most:]))
            ids, payloads = ids[:most], payloads[:most]
        elif len(ids) < most and pending:
            ids, payloads = list(ids), list(payloads)
            while pending and len(ids) < most:
                more_ids, more_payloads = pending.popleft()
                room = most - len(ids)
                if len(more_ids) > room:
                    pending.appendleft((more_ids[room:], more_payloads[room:]))
                    more_ids, more_payloads = more_ids[:room], more_payloads[:room]
                ids += more_ids
                payloads += more_payloads
        size = sum(map(len, payloads))
        self._pending_count -= len(ids)
        self._pending_bytes -= size
        return ids, payloads, size

    # ------------------------------------------------------------------------------- workers

    def worker_ready(self, worker: Worker) -> None:
        if worker not in self._workers:
            self._workers.append(worker)
        self._schedule_flush()
        self._arm_take_back_for_idle()

    def results(self, worker: Worker, count: int, blob: Frames) -> None:
        assigned = worker.assigned
        held = self._held
        if count == len(assigned):
            ids = list(assigned)
            assigned.clear()
        else:
            popleft = assigned.popleft
            ids = [popleft() for _ in range(count)]
        payloads = list(map(held.pop, ids))
        worker.inflight_bytes -= sum(map(len, payloads))
        self._answered.update(zip(ids, payloads, strict=True))
        if self._retried:  # rare: only after a worker died
            self._retried.intersection_update(held)
        self.completed += count
        if self._replies:
            self._route(blob, ids)
        else:
            self._send_results(blob, ids)
        self.forget_confirmed()
        if self._pending:
            self._schedule_flush()
        else:
            self._check_idle()
            if not assigned:
                self._arm_take_back_for_idle()

    def worker_lost(self, worker: Worker, loss: WorkerLoss) -> None:
        """Answer or retry the tasks the dead worker started; re-queue the ones it never did.

        A worker answers in order, so the `loss.started` oldest tasks it held are the ones it
        started: the last was running (a time-limit kill answers it with an `Error` naming the
        limit), the others had finished but their results died with the process. A task safe to
        repeat is retried once; any other gets an `Error` naming the cause: for a worker the
        pool killed for the limit, that limit (its exit, SIGKILL, would suggest running out of
        memory).
        """
        assigned = worker.assigned
        requeue: list[tuple[str, bytes]] = []
        errors: list[bytes] = []
        errored: list[str] = []
        limit = f"task_timeout_ms = {loss.timeout_ms} ms"
        if loss.timeout_ms:
            # Without a running task, the overdue one finished as it was killed: it is one of
            # the finished tasks.
            overdue = "another task" if loss.running else "a task"
            died = f"was killed because {overdue} ran longer than {limit}"
        else:
            died = f"died ({loss.how})"
        for position in range(loss.started):
            ident = assigned.popleft()
            payload = self._held[ident]
            running = loss.running and position == loss.started - 1
            if running and loss.timeout_ms:
                error = m.Error(
                    f"task ran longer than {limit}; worker {worker.index} was killed and replaced"
                )
            elif _is_idempotent(payload) and ident not in self._retried:
                self._retried.add(ident)
                requeue.append((ident, payload))
                continue
            elif loss.timeout_ms:
                error = m.Error(
                    f"worker {worker.index} {died}; this task had finished, but its result was "
                    "lost with the worker"
                )
            else:
                when = "while running" if running else "after running (its result was lost)"
                error = m.Error(f"worker {worker.index} died {when} this task: {loss.how}")
            self._retried.discard(ident)
            del self._held[ident]
            self._answered[ident] = payload  # a repeat before the ack gets this Error again
            self._count_here(payload, failed=True)
            errors.append(frame(codec.task_result_payload(ident, error)))
            errored.append(ident)
        if requeue:
            log.warning("retrying %d tasks once: worker %d %s", len(requeue), worker.index, died)
        if errors:
            self.completed += len(errors)
            self._route(b"".join(errors), errored)
        never_started = [(ident, self._held[ident]) for ident in assigned]
        assigned.clear()
        worker.inflight_bytes = 0
        if never_started:
            log.warning(
                "re-dispatching %d tasks worker %d never started", len(never_started), worker.index
            )
        requeue.extend(never_started)
        if requeue:
            self._enqueue([i for i, _ in requeue], [p for _, p in requeue], first=True)
        self._schedule_flush()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._held:
            self.idle.set()


_IDEMPOTENT = frozenset(
    {b"Compute", b"ComplexMath", b"RetrieveData", b"DiskRead", b"GetGlobalRam", b"GetStorage"}
)
PREFETCH_BYTES = 8 << 20
"""Payload bytes in flight per worker, at most (and `prefetch` tasks): at least one task is
sent, however big (a payload of 1 MiB or more travels as a reference to its segment)."""
TAKE_BACK_AFTER_S = 0.05
"""A task that has run this long is long: the tasks queued behind it on its worker are taken
back when another worker idles, and its worker is sent no more until it is done."""
TAKE_BACK_AFTER_NS = round(TAKE_BACK_AFTER_S * 1e9)
_COMPUTE_MARK = b'"task":{"Compute":'
_ID_START = len(b'{"AssignTask":{"id":"')
_COMPUTE_AFTER_ID = b'",' + _COMPUTE_MARK
# The answer a draining node gives a direct link's task it will not start. A node that lent
# the task to it (node/direct.py, `DirectPeer`) runs it itself instead: it never started there.
NOT_STARTED: Final = m.Error("the node is stopping")
_IO_TASKS = frozenset({"HttpRequest", "Tcp", "Udp"})
# What a `connect_to` peer may be lent: tasks that need no data of this node's. A StoreData run
# there would store its key in the peer's store, where this node's RetrieveData never looks
# (and a DiskWrite its file in the peer's storage_dir; a listing would list the peer's).
_LENDABLE = frozenset({"Compute", "ComplexMath"})
# How far into a payload its task's variant is looked for: past an id of any sane length (the
# search stops at the first match, right after the id, in every payload but a malformed one).
_VARIANT_WINDOW = 64 * 1024
_TASK_VARIANT = re.compile(rb'"task"\s*:\s*(?:\{\s*)?"([A-Za-z]+)"')
# A `TaskResult` whose result is an `Error` (quotes inside a JSON string are escaped, so only
# the result's own variant can match).
_ERROR_RESULT = re.compile(rb'"result"\s*:\s*\{\s*"Error"')


def task_type(payload: bytes) -> str:
    """The type an `AssignTask` payload is counted under, as `Dispatcher.accept` files it:
    its task's variant, "malformed" when none can be read. Without the regex for the common
    task: quotes inside a JSON string are escaped, so the mark can only be the task's own."""
    if payload.find(_COMPUTE_MARK, 0, 512) >= 0:
        return "Compute"
    match = _TASK_VARIANT.search(payload, 0, _VARIANT_WINDOW)
    return match.group(1).decode() if match is not None else "malformed"


def python_claim_tasks(
    ids: list[str],
    payloads: list[bytes],
    start: int,
    held: dict[str, bytes],
    answered: dict[str, bytes],
    answered_before: dict[str, bytes],
) -> int:
    """Claim the run of new `Compute`s from `start`: hold each (``held[id] = payload``) until
    one is not, and return its index (``len(ids)`` when all were). Not one: an id held,
    answered or repeated within the run, another task type, or an id whose wire form is longer
    than its text (escapes, non-ASCII: as the master writes it, the variant follows the id).
    The reference of the compiled `claim_tasks`."""
    for index in range(start, len(ids)):
        ident = ids[index]
        if (
            ident in held
            or ident in answered
            or ident in answered_before
            or not payloads[index].startswith(_COMPUTE_AFTER_ID, _ID_START + len(ident))
        ):
            return index
        held[ident] = payloads[index]
    return len(ids)


_speedups = native.load("node.protocol._speedups")
claim_tasks: Callable[
    [list[str], list[bytes], int, dict[str, bytes], dict[str, bytes], dict[str, bytes]], int
] = python_claim_tasks if _speedups is None else _speedups.claim_tasks
"""`python_claim_tasks`, in C where `_speedups` was built."""


def _is_idempotent(payload: bytes) -> bool:
    """True for the task types that are safe to run twice (read-only or pure)."""
    match = _TASK_VARIANT.search(payload, 0, _VARIANT_WINDOW)
    return match is not None and match.group(1) in _IDEMPOTENT
