"""The dispatcher's queue of runs, driven by random reads, results and flushes: tasks reach
workers in the order they arrived (each new id once), a worker holds at most `prefetch` tasks
and `PREFETCH_BYTES` of payloads (one task alone when it held none, however big), no worker
is left empty while tasks wait, `Worker.inflight_bytes` is always the bytes of the tasks it
holds, and `has_capacity` counts free bytes as well as free places.

The workers here are `Worker` handles whose sends are recorded (what a worker process does with
its tasks is covered by the tests with real processes in test_node.py); the queue logic is what
is exercised, with the compiled `claim_tasks` and its Python reference. A result lost on its way
comes through a `WorkerPool` that starts no process.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import dispatch
from node.dispatch import Dispatcher
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder
from workers.pool import Worker, WorkerPool, WorkerStatus
from workers.tasks import WorkerSettings
from workers.worker import PROGRESS_FIELDS, STARTED_AT_NS


class Recorder:
    """Stands in for `WorkerPool.send`: records what each worker is sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.running_workers: set[int] = set()  # indexes of the workers that run a task

    def send(self, worker: Worker, ids: list[str], frames: bytes) -> None:
        worker.assigned.extend(ids)
        self.sent += ids

    can_take_back = False  # (test_node.py takes tasks back from real workers)

    def running(self, worker: Worker) -> bool:
        return worker.index in self.running_workers


def payload(ident: str, size: int) -> bytes:
    return codec.encode_payload(m.AssignTask(ident, m.Compute("1" + " " * size)))


STEPS = st.lists(
    st.one_of(
        # a read: (existing id number or a new one, payload padding)
        st.lists(st.tuples(st.integers(0, 40), st.integers(0, 700)), min_size=1, max_size=12),
        # a worker answers its k oldest tasks
        st.tuples(st.sampled_from([0, 1]), st.integers(1, 8)),
        st.just("flush"),
    ),
    max_size=40,
)


@pytest.mark.parametrize("claim", ["compiled", "python"])
@settings(max_examples=300, deadline=None)
@given(steps=STEPS, prefetch=st.integers(1, 6), limit=st.integers(30, 1500))
def test_the_queue_keeps_order_and_bounds(
    claim: str, steps: list[object], prefetch: int, limit: int
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        if claim == "python":
            patch.setattr(dispatch, "claim_tasks", dispatch.python_claim_tasks)
        patch.setattr(dispatch, "PREFETCH_BYTES", limit)
        asyncio.run(run_steps(steps, prefetch, limit))


async def run_steps(steps: list[object], prefetch: int, limit: int) -> None:
    dispatcher = Dispatcher(prefetch, lambda blob, ids: None)
    recorder = Recorder()
    dispatcher.pool = recorder  # type: ignore[assignment]
    workers = [Worker(i, None) for i in range(2)]
    for worker in workers:
        worker.status = WorkerStatus.READY
        dispatcher.worker_ready(worker)
    arrived: list[str] = []  # ids of the tasks that will run, in the order they arrived
    for step in steps:
        if isinstance(step, list):
            ids = [f"t{n}" for n, _ in step]
            payloads = [payload(i, size) for i, (_, size) in zip(ids, step, strict=True)]
            held = set(dispatcher._held)  # a held id joins its task; any other runs (again)
            for ident in ids:
                if ident not in held:
                    arrived.append(ident)
                    held.add(ident)
            dispatcher.accept_from_master(ids, payloads)
        elif isinstance(step, tuple):
            worker = workers[step[0]]
            count = min(step[1], len(worker.assigned))
            if count:
                dispatcher.results(worker, count, b"")
        before = {w.index: len(w.assigned) for w in workers}
        dispatcher._flush()
        for worker in workers:
            held_bytes = sum(len(dispatcher._held[i]) for i in worker.assigned)
            assert worker.inflight_bytes == held_bytes
            assert len(worker.assigned) <= prefetch
            grew = len(worker.assigned) > before[worker.index]
            if grew and held_bytes > limit:  # only a lone task sent to an empty worker
                assert before[worker.index] == 0 and len(worker.assigned) == 1
            if dispatcher._pending:  # no worker idles while tasks wait: its results will
                assert worker.assigned  # bring the next flush
        # Every task sent so far went out in the order it arrived.
        assert recorder.sent == arrived[: len(recorder.sent)]
        assert dispatcher.pending == sum(len(ids) for ids, _ in dispatcher._pending)
        waiting = [p for _, payloads in dispatcher._pending for p in payloads]
        assert dispatcher._pending_bytes == sum(map(len, waiting))
        if not waiting:  # the node asks for more exactly while some worker has room
            roomy = [w for w in workers if len(w.assigned) < prefetch and w.inflight_bytes < limit]
            assert dispatcher.has_capacity() == bool(roomy)
        elif not any(len(w.assigned) < prefetch for w in workers):
            assert not dispatcher.has_capacity()


def test_capacity_counts_payload_bytes_and_offload_takes_what_does_not_fit() -> None:
    """Tasks of 200 KB: each worker holds what fits in PREFETCH_BYTES, far fewer than
    `prefetch`; the node stops asking for more once the queue holds what no worker has bytes
    for, and a dialed peer is offered the tasks instead of the queue growing."""

    async def run() -> tuple[list[Worker], Dispatcher, list[str]]:
        dispatcher = Dispatcher(1024, lambda blob, ids: None)
        dispatcher.pool = Recorder()  # type: ignore[assignment]
        workers = [Worker(i, None) for i in range(2)]
        for worker in workers:
            worker.status = WorkerStatus.READY
            dispatcher.worker_ready(worker)
        offered: list[str] = []
        dispatcher.offload = lambda ident, payload: offered.append(ident) is None
        for i in range(100):
            dispatcher.accept_from_master([f"t{i}"], [payload(f"t{i}", 200_000)])
            await asyncio.sleep(0)  # the flush
        return workers, dispatcher, offered

    workers, dispatcher, offered = asyncio.run(run())
    per_worker = dispatch.PREFETCH_BYTES // len(payload("t0", 200_000))
    assert [len(w.assigned) for w in workers] == [per_worker, per_worker]
    assert dispatcher.pending <= 2 and not dispatcher.has_capacity()
    assert len(offered) == 100 - 2 * per_worker - dispatcher.pending


class Unwalkable(list):  # type: ignore[type-arg]
    """A run whose payloads may be looked at one by one but not walked through."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("walked a run that could not fit")


def test_fitting_a_worker_with_no_room_left_looks_at_one_payload() -> None:
    dispatcher = Dispatcher(1024, lambda blob, ids: None)
    big = [payload(f"t{i}", 1000) for i in range(1000)]
    dispatcher._pending.append(([f"t{i}" for i in range(1000)], Unwalkable(big)))
    assert dispatcher._fitting(1000, len(big[0]) - 1) == 0


def test_a_worker_busy_with_a_long_task_gets_no_more_and_is_no_capacity() -> None:
    """Worker 0 runs a task that has run TAKE_BACK_AFTER_S: a read goes to worker 1 whole, and
    once worker 1 is full the node has no capacity, though worker 0 has free places."""

    async def run() -> None:
        dispatcher = Dispatcher(8, lambda blob, ids: None)
        recorder = Recorder()
        dispatcher.pool = recorder  # type: ignore[assignment]
        workers = [Worker(i, array("q", [0] * PROGRESS_FIELDS)) for i in range(2)]
        for worker in workers:
            worker.status = WorkerStatus.READY
            dispatcher.worker_ready(worker)
        dispatcher.accept_from_master(["long"], [payload("long", 0)])
        await asyncio.sleep(0)
        busy = next(w for w in workers if w.assigned)
        recorder.running_workers.add(busy.index)
        busy.progress[STARTED_AT_NS] = time.monotonic_ns() - 2 * dispatch.TAKE_BACK_AFTER_NS
        other = workers[1 - busy.index]
        ids = [f"t{i}" for i in range(8)]
        dispatcher.accept_from_master(ids, [payload(i, 0) for i in ids])
        await asyncio.sleep(0)
        assert list(other.assigned) == ids and list(busy.assigned) == ["long"]
        assert not dispatcher.has_capacity()
        recorder.running_workers.clear()  # its task ended: it counts again
        assert dispatcher.has_capacity()

    asyncio.run(run())


def test_a_drain_counts_the_errors_it_answers_direct_links_with_under_their_type() -> None:
    """Draining, the dispatcher answers a direct link's tasks itself ("the node is stopping"):
    those it had queued, one its worker did not start (`skipped`) and one that arrives; each is
    counted once under its type, answered and failed. The master's queued task is handed back,
    not answered."""
    replies: dict[str, m.Result] = {}

    def reply(blob: bytes | memoryview, ids: list[str]) -> None:
        for ident, frame_payload in zip(ids, FrameDecoder().feed(bytes(blob)), strict=True):
            result = codec.decode(frame_payload)
            assert isinstance(result, m.TaskResult) and result.id == ident
            replies[ident] = result.result

    async def run() -> Dispatcher:
        dispatcher = Dispatcher(1, lambda blob, ids: None)
        dispatcher.pool = Recorder()  # type: ignore[assignment]
        worker = Worker(0, None)
        worker.status = WorkerStatus.READY
        dispatcher.worker_ready(worker)
        dispatcher.accept("d0", payload("d0", 0), reply=reply)
        store = m.AssignTask("d1", m.StoreData("key", b"data"))
        dispatcher.accept("d1", codec.encode_payload(store), reply=reply)
        dispatcher.accept("m0", payload("m0", 0))
        await asyncio.sleep(0)  # the flush: `prefetch` 1, the worker holds d0
        assert list(worker.assigned) == ["d0"]
        assert dispatcher.stop_accepting() == ["m0"]
        dispatcher.skipped(worker, 1)
        dispatcher.accept("d2", payload("d2", 0), reply=reply)
        return dispatcher

    dispatcher = asyncio.run(run())
    assert replies == {ident: m.Error("the node is stopping") for ident in ("d0", "d1", "d2")}
    assert dispatcher.completed == 3
    assert dispatcher.answered_here == {"Compute": 2, "StoreData": 1}
    assert dispatcher.failed_here == {"Compute": 2, "StoreData": 1}
    assert dispatcher.handed_back == 1 and dispatcher.held == 0


def test_a_result_lost_on_its_way_is_answered_once_with_an_error_and_counted(
    tmp_path: Path,
) -> None:
    """A worker's result segment that cannot be mapped: the pool answers the task with an
    `Error` saying so, through the dispatcher, which counts it as failed under its type (the
    worker counted it as run, not failed). The task is answered once, the one behind it as its
    worker answered it, and the dispatcher holds nothing after."""
    answers: list[tuple[str, m.Result]] = []

    def send_results(blob: bytes | memoryview, ids: list[str]) -> None:
        for ident, frame_payload in zip(ids, FrameDecoder().feed(bytes(blob)), strict=True):
            result = codec.decode(frame_payload)
            assert isinstance(result, m.TaskResult) and result.id == ident
            answers.append((ident, result.result))

    async def run() -> tuple[Dispatcher, Worker]:
        dispatcher = Dispatcher(2, send_results)
        dispatcher.pool = Recorder()  # type: ignore[assignment]
        # The pool as the supervisor wires it, for its handling of a worker's results only
        # (no process is started).
        pool = WorkerPool(
            1,
            WorkerSettings(node_id="lost", storage_dir=str(tmp_path), shm_dir=str(tmp_path)),
            on_results=dispatcher.results,
            on_worker_ready=dispatcher.worker_ready,
            on_worker_lost=dispatcher.worker_lost,
            on_result_lost=dispatcher.result_lost,
            start_method="spawn",
        )
        worker = pool.workers[0]
        worker.status = WorkerStatus.READY
        dispatcher.worker_ready(worker)
        store = m.AssignTask("s0", m.StoreData("key", b"data"))
        dispatcher.accept_from_master(["s0", "c1"], [codec.encode_payload(store), payload("c1", 0)])
        await asyncio.sleep(0)  # the flush
        assert list(worker.assigned) == ["s0", "c1"]
        pool._result_segment(worker, "cpnode-lost-gone")  # s0's: no such segment
        pool._results(worker, 1, codec.encode(m.TaskResult("c1", m.Number(1.0))))
        return dispatcher, worker

    dispatcher, worker = asyncio.run(run())
    assert [ident for ident, _ in answers] == ["s0", "c1"]
    lost = answers[0][1]
    assert isinstance(lost, m.Error)
    assert lost.message.startswith("the task's result was lost on its way from worker 0: ")
    assert "cpnode-lost-gone" in lost.message
    assert answers[1] == ("c1", m.Number(1.0))
    assert dispatcher.failed_here == {"StoreData": 1}
    assert dispatcher.answered_here == {}  # answered by the pool's Error, not here
    assert dispatcher.completed == 2
    assert dispatcher.held == 0 and dispatcher.pending == 0
    assert not worker.assigned and worker.inflight_bytes == 0
    assert dispatcher.idle.is_set()
