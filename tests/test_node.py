"""The node end to end: a real supervisor process with real workers, joined to the local master."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node import dispatch
from node.client import Client
from node.config import Config
from node.dispatch import PREFETCH_BYTES, Dispatcher
from node.master import MasterThread
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder
from shm import native
from tests.nodeproc import NodeProcess
from workers.expr import evaluate_compute
from workers.pool import WorkerPool
from workers.stats import COMPLETED
from workers.tasks import WorkerSettings
from workers.worker import STATS_EVERY_S

DATA = Path(__file__).parent / "data"
FAILOVER_MS = 400


@pytest.fixture
def master(tmp_path: Path) -> Iterator[MasterThread]:
    config = Config(failover_timeout_ms=FAILOVER_MS)
    with MasterThread(config, join_path=str(tmp_path / "join.json")) as running:
        yield running


@pytest.fixture
def node(tmp_path: Path, master: MasterThread) -> Iterator[NodeProcess]:
    process = NodeProcess(
        tmp_path,
        tmp_path / "join.json",
        {"failover_timeout_ms": FAILOVER_MS, "master_addresses": [master.address]},
        "--workers",
        "2",
    )
    try:
        process.wait_for_log("node ready")
        process.record_children()
        yield process
    finally:
        process.close()


def run_tasks(join: Path, tasks: list[m.Task], timeout: float = 60.0) -> list[m.Result]:
    async def go() -> list[m.Result]:
        async with Client.connect(join, timeout=timeout) as client:
            ids = await client.submit_many(tasks)
            results = await client.results(ids, timeout=timeout)
            return [results[i] for i in ids]

    return asyncio.run(go())


def test_node_runs_10000_compute_tasks_correctly(tmp_path: Path, node: NodeProcess) -> None:
    tasks: list[m.Task] = [m.Compute(f"{i}*2+{i % 5}") for i in range(10_000)]
    results = run_tasks(tmp_path / "join.json", tasks)
    assert results == [m.Number(float(i * 2 + i % 5)) for i in range(10_000)]
    # The start-up line says which compiled hot paths run (all of them, in this install).
    node.wait_for_log("compiled hot paths in use")
    if not native.skipped_on_purpose():
        assert f"compiled hot paths in use: {', '.join(native.MODULES)}\n" in node.log


def test_every_compute_vector_through_the_node(tmp_path: Path, node: NodeProcess) -> None:
    lines = [json.loads(line) for line in (DATA / "compute_vectors.jsonl").read_text().splitlines()]
    tasks: list[m.Task] = [
        m.Compute(v["task"]["Compute"]["expression"])
        if "Compute" in v["task"]
        else m.ComplexMath(v["task"]["ComplexMath"]["expression"])
        for v in lines
    ]
    results = run_tasks(tmp_path / "join.json", tasks)
    assert len(results) == 80
    for vector, result in zip(lines, results, strict=True):
        ((kind, expected),) = vector["result"].items()
        if kind == "Number":
            assert isinstance(result, m.Number), (vector, result)
            assert result.value == expected
            assert math.copysign(1, result.value) == math.copysign(1, expected)
        elif kind == "Response":
            assert result == m.Response(expected), vector
        else:
            assert isinstance(result, m.Error), (vector, result)
            if expected is not None:
                assert result.message == expected
            else:  # non-finite: an Error naming the value, never a null Number
                assert "which has no JSON form" in result.message


def test_tasks_for_later_issues_are_answered_not_dropped(tmp_path: Path, node: NodeProcess) -> None:
    results = run_tasks(tmp_path / "join.json", [m.HttpRequest("http://127.0.0.1:9/")], timeout=30)
    assert isinstance(results[0], m.Error)
    assert "HttpRequest" in results[0].message


def test_node_is_not_evicted_while_every_worker_computes(
    tmp_path: Path, master: MasterThread, node: NodeProcess, caplog: pytest.LogCaptureFixture
) -> None:
    # Long unique expressions: each takes about a millisecond, so two workers stay busy for
    # well over 3 x failover_timeout_ms while the master's eviction clock runs.
    body = "+".join(f"sin({k})*cos({k})" for k in range(150))
    tasks: list[m.Task] = [m.Compute(f"{i}+{body}") for i in range(3000)]
    started = time.monotonic()
    results = run_tasks(tmp_path / "join.json", tasks, timeout=120)
    assert time.monotonic() - started > 3 * FAILOVER_MS / 1000
    assert all(isinstance(r, m.Number) for r in results)
    assert not [r for r in caplog.records if "evicted" in r.getMessage()]
    assert "connection to master" not in node.log
    assert master.stats().eligible_nodes == 1


def test_a_late_heartbeat_is_logged(tmp_path: Path, node: NodeProcess) -> None:
    # A supervisor stopped for longer than a heartbeat interval (failover_timeout_ms / 2) but
    # not long enough to be evicted: its next heartbeat leaves late, and it says so.
    assert node.proc.pid is not None
    os.kill(node.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.45)
    finally:
        os.kill(node.proc.pid, signal.SIGCONT)
    node.wait_for_log("left", timeout=10)
    (line,) = [line for line in node.log.splitlines() if "heartbeat to master" in line]
    assert "WARNING" in line and "ms late (every 200 ms planned; 1 late" in line
    assert "the event loop was blocked or the host is overloaded" in line
    results = run_tasks(tmp_path / "join.json", [m.Compute("1+1")], timeout=30)
    assert results == [m.Number(2.0)]


def test_sigterm_stops_cleanly_with_no_children_left(node: NodeProcess) -> None:
    assert len(node.children) >= 2  # the workers (and forkserver)
    assert node.stop(signal.SIGTERM) == 0
    assert node.leftover_children() == []
    assert "node stopped" in node.log


def test_bad_config_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "join.json").write_text('{"token":"t","ip":"127.0.0.1","port":1}')
    process = NodeProcess(tmp_path, tmp_path / "join.json", {"disk_space_mb": -5})
    try:
        assert process.proc.wait(30) == 2
        assert "`disk_space_mb`" in process.log
        assert "-5" in process.log
    finally:
        process.close()


def test_upstream_scheduling_burst_of_100000(tmp_path: Path) -> None:
    join = tmp_path / "join.json"
    config = Config(failover_timeout_ms=2000)
    with MasterThread(config, join_path=str(join), scheduling="upstream") as master:
        process = NodeProcess(
            tmp_path, join, {"failover_timeout_ms": 2000, "master_addresses": [master.address]},
            "--workers", "2",
        )  # fmt: skip
        try:
            process.wait_for_log("node ready")
            tasks: list[m.Task] = [m.Compute(f"{i}+1") for i in range(100_000)]
            results = run_tasks(join, tasks, timeout=240)
            assert results == [m.Number(float(i + 1)) for i in range(100_000)]
            assert master.stats().completed >= 100_000
            process.record_children()
            assert process.stop() == 0
        finally:
            process.close()


async def slow_worker_dispatcher(
    prefetch: int, workers: int = 1, settings: WorkerSettings | None = None
) -> tuple[Dispatcher, WorkerPool, list[bytes]]:
    """A dispatcher with real worker processes (started) whose `Compute` knows `sleep S`
    (tests/slowtasks.py) unless `settings` say otherwise, and the list the result payloads are
    delivered to; stop the pool."""
    delivered: list[bytes] = []
    dispatcher = Dispatcher(prefetch, lambda blob, ids: delivered.extend(FrameDecoder().feed(blob)))
    if settings is None:
        settings = WorkerSettings(executors={"Compute": "tests.slowtasks:compute"})
    pool = WorkerPool(
        workers,
        settings,
        on_results=dispatcher.results,
        on_worker_ready=dispatcher.worker_ready,
        on_worker_lost=dispatcher.worker_lost,
        start_method="spawn",
    )
    dispatcher.pool = pool
    try:
        await pool.start()
    except BaseException:
        await pool.stop()  # the workers that did start
        raise
    return dispatcher, pool, delivered


def test_a_batch_smaller_than_prefetch_is_shared_by_the_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six slow tasks in one read, two real workers, `prefetch` 1024: each worker gets three
    (not all six to the first), and each runs its three (taking back is off here: a worker
    that started late could otherwise lose a task to the other)."""
    monkeypatch.setattr(dispatch, "TAKE_BACK_AFTER_S", 3600.0)
    monkeypatch.setattr(dispatch, "TAKE_BACK_AFTER_NS", 3600 * 10**9)

    async def go() -> None:
        dispatcher, pool, delivered = await slow_worker_dispatcher(1024, workers=2)
        try:
            ids = [f"s{i}" for i in range(6)]
            payloads = [codec.encode_payload(m.AssignTask(i, m.Compute("sleep 0.1"))) for i in ids]
            dispatcher.accept_from_master(ids, payloads)
            await asyncio.sleep(0)  # the flush
            assert sorted(len(w.assigned) for w in pool.workers) == [3, 3]
            async with asyncio.timeout(30):
                await dispatcher.idle.wait()
            assert sorted(codec.decode(p).id for p in delivered) == ids  # type: ignore[attr-defined]
            assert [w.tasks_done for w in pool.workers] == [3, 3]
        finally:
            await pool.stop()

    asyncio.run(go())


async def _ran_by_each(pool: WorkerPool, expected: int) -> list[float]:
    """`Compute` tasks each worker process counted as run, once their stats (sent after half a
    second idle) add up to `expected`, and a stats interval later (a run twice would show
    then); at most 10 s."""

    def ran() -> list[float]:
        return [w.stats.get("Compute", [0.0])[COMPLETED] for w in pool.workers]

    async with asyncio.timeout(10):
        while sum(ran()) < expected:
            await asyncio.sleep(0.05)
        await asyncio.sleep(STATS_EVERY_S + 0.2)
    return ran()


def test_tasks_queued_behind_a_long_task_are_taken_back_by_an_idle_worker(
    tmp_path: Path,
) -> None:
    """One worker gets a long task and four quick ones behind it, the other five quick ones:
    once the other idles and the long task has run TAKE_BACK_AFTER_S, the four are taken back
    and run by the other, each once, while the long task still runs (it ends when the test
    makes a file, after the four are answered)."""
    if native.load("workers._fastpath") is None:
        pytest.skip("installed with CPNODE_NO_EXTENSION: nothing is taken back")
    done = tmp_path / "done"

    async def go() -> None:
        dispatcher, pool, delivered = await slow_worker_dispatcher(1024, workers=2)
        try:
            ids = ["long", *(f"q{i}" for i in range(9))]
            tasks = [m.Compute(f"wait {done}"), *(m.Compute(f"{i}+1") for i in range(9))]
            payloads = [
                codec.encode_payload(m.AssignTask(i, t)) for i, t in zip(ids, tasks, strict=True)
            ]
            dispatcher.accept_from_master(ids, payloads)
            await asyncio.sleep(0)  # the flush: the first worker ready gets the first five
            slow = next(i for i, w in enumerate(pool.workers) if "long" in w.assigned)
            assert sorted(len(w.assigned) for w in pool.workers) == [5, 5]
            async with asyncio.timeout(30):
                while len(delivered) < 9:
                    await asyncio.sleep(0.01)
            answered = [codec.decode(p).id for p in delivered]  # type: ignore[attr-defined]
            assert sorted(answered) == ids[1:]  # every quick one, the long one still running
            assert dispatcher.taken_back == 4
            done.touch()
            async with asyncio.timeout(30):
                await dispatcher.idle.wait()
            assert codec.decode(delivered[-1]).id == "long"  # type: ignore[attr-defined]
            expected = [1, 9] if slow == 0 else [9, 1]
            assert [w.tasks_done for w in pool.workers] == expected
            assert await _ran_by_each(pool, 10) == expected  # none ran twice
        finally:
            done.touch()
            await pool.stop()

    asyncio.run(go())


def test_taking_back_under_churn_runs_every_task_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain Computes (run in C runs) mixed with slow ones (about 3 ms each, in Python), two
    workers, tasks taken back after 1 ms: every task is answered once and run once, whichever
    of the claims (compiled run, Python loop) meets a take-back. Reads of a slower task (about
    10 ms) and quick ones follow until one is taken back, at most 20."""
    if native.load("workers._fastpath") is None:
        pytest.skip("installed with CPNODE_NO_EXTENSION: nothing is taken back")
    monkeypatch.setattr(dispatch, "TAKE_BACK_AFTER_S", 0.001)
    monkeypatch.setattr(dispatch, "TAKE_BACK_AFTER_NS", 1_000_000)
    slow = "+".join(f"sin({k})*cos({k})" for k in range(150))
    slower = "+".join(f"sin({k})*cos({k})" for k in range(500))

    async def go() -> None:
        # The built-in executors: plain Computes take the compiled runs.
        dispatcher, pool, delivered = await slow_worker_dispatcher(64, 2, WorkerSettings())
        try:
            expected: dict[str, float] = {}

            def read_of(read: int, texts: list[str]) -> None:
                ids = [f"r{read}-{i}" for i in range(len(texts))]
                payloads = [codec.encode_payload(m.AssignTask(ident, m.Compute(text)))
                            for ident, text in zip(ids, texts, strict=True)]  # fmt: skip
                expected.update(zip(ids, map(evaluate_compute, texts), strict=True))
                dispatcher.accept_from_master(ids, payloads)

            for read in range(40):
                read_of(read, [f"{i}+{slow}" if (read + i) % 7 == 0 else f"{read}*{i}+1"
                               for i in range(25)])  # fmt: skip
                await asyncio.sleep(0.002 * (read % 3))
            async with asyncio.timeout(60):
                await dispatcher.idle.wait()
            for read in range(40, 60):
                if dispatcher.taken_back:
                    break
                read_of(read, [f"0+{slower}", *(f"{read}+{i}" for i in range(11))])
                async with asyncio.timeout(60):
                    await dispatcher.idle.wait()
            results = [codec.decode(p) for p in delivered]
            answers = {r.id: r.result for r in results}  # type: ignore[attr-defined]
            assert len(results) == len(expected) == len(answers)
            assert answers == {i: m.Number(v) for i, v in expected.items()}
            assert dispatcher.taken_back > 0
            assert sum(await _ran_by_each(pool, len(expected))) == len(expected)
        finally:
            await pool.stop()

    asyncio.run(go())


def test_dispatcher_bookkeeping_on_the_compute_fast_path() -> None:
    """Ids, types, duplicates, the prefetch bound and idle, with a real worker process (its
    first task sleeps, so what the dispatcher holds can be looked at before any result)."""

    async def go() -> None:
        dispatcher, pool, delivered = await slow_worker_dispatcher(3)
        try:
            tasks: list[tuple[str, m.Task]] = [
                ("a", m.Compute("sleep 0.5")),
                ("é", m.Compute("2+2")),  # non-ASCII id: found by the search
                ("c", m.GetStorage()),
                ("d", m.Compute("3+3")),
            ]
            payloads = {i: codec.encode_payload(m.AssignTask(i, task)) for i, task in tasks}
            # One read's worth from the master, a repeated id in it: it joins its task.
            dispatcher.accept_from_master([*payloads, "a"], [*payloads.values(), payloads["a"]])
            assert not dispatcher.idle.is_set()
            assert dispatcher.held == 4 and dispatcher.pending == 4
            assert dispatcher.joined_duplicates == 1
            assert dispatcher.received_by_type == {"Compute": 3, "GetStorage": 1}
            await asyncio.sleep(0.1)  # flushed: `prefetch` tasks to the worker, one waits
            assert list(pool.workers[0].assigned) == ["a", "é", "c"]
            assert dispatcher.pending == 1
            await asyncio.wait_for(dispatcher.idle.wait(), 30)
        finally:
            await pool.stop()
        results = {r.id: r.result for r in map(codec.decode, delivered)}  # type: ignore[union-attr]
        assert results == {
            "a": m.Number(0.0),
            "é": m.Number(4.0),
            "c": m.Error("No disk store configured"),
            "d": m.Number(6.0),
        }
        assert len(delivered) == 4
        assert dispatcher.held == 0 and dispatcher.completed == 4

    asyncio.run(go())


def test_dispatcher_queues_reads_in_runs_and_hands_them_out_in_order() -> None:
    """Reads from the master queue as runs of tasks; a worker's batch splits a long run and
    joins short ones, and every task reaches the worker in the order it arrived (a real worker
    process, prefetch 3; its first task sleeps so the batches can be looked at)."""

    async def go() -> None:
        dispatcher, pool, delivered = await slow_worker_dispatcher(3)
        reads = [
            [("t0", "sleep 0.3"), *[(f"t{i}", f"{i}+0") for i in range(1, 5)]],
            [("s", None), ("t5", "5+0")],  # a GetStorage between runs: a run of its own
            [(f"t{i}", f"{i}+0") for i in range(6, 10)],
        ]
        order = [ident for read in reads for ident, _ in read]
        try:
            for read in reads:
                ids = [ident for ident, _ in read]
                tasks = [m.Compute(e) if e else m.GetStorage() for _, e in read]
                payloads = [
                    codec.encode_payload(m.AssignTask(i, t))
                    for i, t in zip(ids, tasks, strict=True)
                ]
                dispatcher.accept_from_master(ids, payloads)
            assert dispatcher.pending == len(order) and dispatcher.held == len(order)
            await asyncio.sleep(0.1)  # flushed: the first 3 of the first run, the rest waits
            assert list(pool.workers[0].assigned) == order[:3]
            assert dispatcher.pending == len(order) - 3
            await asyncio.wait_for(dispatcher.idle.wait(), 30)
        finally:
            await pool.stop()
        answered = [codec.decode(p) for p in delivered]
        assert [r.id for r in answered] == order  # type: ignore[union-attr]
        assert [r.result for r in answered if r.id != "s"] == [  # type: ignore[union-attr]
            m.Number(0.0),
            *[m.Number(float(i)) for i in range(1, 10)],
        ]
        assert dispatcher.pending == 0 and dispatcher.held == 0 and dispatcher.completed == 11

    asyncio.run(go())


def test_a_failing_slow_path_leaves_the_queued_run_counted() -> None:
    """A run claimed from a read stays counted and scheduled when handling a later task of
    that read raises (here the removal of a repeated task's payload)."""

    async def go() -> None:
        dispatcher = Dispatcher(4, lambda blob, ids: None)

        def discard(payload: bytes) -> None:
            raise OSError("segment removal failed")

        dispatcher.discard = discard
        ids = ["a", "b", "a"]  # the repeated "a" takes the slow path, which raises
        payloads = [codec.encode_payload(m.AssignTask(i, m.Compute("1+1"))) for i in ids]
        with pytest.raises(OSError, match="segment removal failed"):
            dispatcher.accept_from_master(ids, payloads)
        assert dispatcher.pending == 2 and dispatcher.held == 2 and dispatcher.received == 2
        assert not dispatcher.idle.is_set() and dispatcher._flush_scheduled

    asyncio.run(go())


def test_dispatcher_bounds_the_payload_bytes_in_flight_per_worker() -> None:
    """Besides `prefetch` tasks, a worker holds at most PREFETCH_BYTES of payloads (and at
    least one task): big inline payloads go a few at a time (a real worker process; its first
    task sleeps so what it holds can be looked at)."""

    async def go() -> None:
        dispatcher, pool, delivered = await slow_worker_dispatcher(1000)
        pad = " " * (PREFETCH_BYTES // 3)  # two such payloads fit, three do not
        expressions = ["sleep 0.3" + pad, *["1" + pad] * 4]
        ids = [f"t{i}" for i in range(len(expressions))]
        payloads = [
            codec.encode_payload(m.AssignTask(i, m.Compute(e)))
            for i, e in zip(ids, expressions, strict=True)
        ]
        try:
            dispatcher.accept_from_master(ids, payloads)
            await asyncio.sleep(0.1)
            worker = pool.workers[0]
            assert list(worker.assigned) == ["t0", "t1"]
            assert worker.inflight_bytes == len(payloads[0]) + len(payloads[1])
            dispatcher._flush()  # another flush (a read, say) sends nothing that does not fit
            assert list(worker.assigned) == ["t0", "t1"]
            await asyncio.wait_for(dispatcher.idle.wait(), 30)
            assert worker.inflight_bytes == 0
        finally:
            await pool.stop()
        assert sorted(codec.decode(p).id for p in delivered) == ids  # type: ignore[union-attr]

    asyncio.run(go())
