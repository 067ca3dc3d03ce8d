"""The node end to end: a real supervisor process with real workers, joined to the local master."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client import Client
from node.config import Config
from node.dispatch import Dispatcher
from node.master import MasterThread
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder
from tests.nodeproc import NodeProcess
from workers.channel import Frames
from workers.pool import Worker, WorkerStatus

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


class _RecordingPool:
    """Stands in for the WorkerPool: records what the dispatcher sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], bytes]] = []

    def send(self, worker: Worker, ids: list[str], frames: bytes) -> None:
        worker.assigned.extend(ids)
        self.sent.append((ids, frames))


def test_dispatcher_bookkeeping_on_the_compute_fast_path() -> None:
    async def go() -> None:
        delivered: list[tuple[Frames, int]] = []
        dispatcher = Dispatcher(3, lambda blob, count: delivered.append((blob, count)))
        pool = _RecordingPool()
        dispatcher.pool = pool  # type: ignore[assignment]
        worker = Worker(0, None)
        worker.status = WorkerStatus.READY
        dispatcher.worker_ready(worker)
        tasks: list[tuple[str, m.Task]] = [
            ("a", m.Compute("1+1")),
            ("é", m.Compute("2+2")),  # non-ASCII id: found by the search
            ("c", m.GetStorage()),
            ("d", m.Compute("3+3")),
        ]
        payloads = {ident: codec.encode_payload(m.AssignTask(ident, task)) for ident, task in tasks}
        for ident, payload in payloads.items():
            dispatcher.accept(ident, payload)
        dispatcher.accept("a", payloads["a"])  # a repeated id joins its task
        assert not dispatcher.idle.is_set()
        assert dispatcher.held == 4 and dispatcher.pending == 4
        assert dispatcher.joined_duplicates == 1
        assert dispatcher.received_by_type == {"Compute": 3, "GetStorage": 1}
        await asyncio.sleep(0)  # the flush: at most `prefetch` tasks to the worker
        assert [ids for ids, _ in pool.sent] == [["a", "é", "c"]]
        assert FrameDecoder().feed(pool.sent[0][1]) == [payloads[i] for i in ("a", "é", "c")]
        dispatcher.results(worker, 2, b"two results")
        assert delivered == [(b"two results", 2)]
        assert list(worker.assigned) == ["c"]
        await asyncio.sleep(0)
        assert [ids for ids, _ in pool.sent][1:] == [["d"]]
        dispatcher.results(worker, 2, b"the rest")
        assert not worker.assigned
        assert dispatcher.held == 0 and dispatcher.completed == 4
        assert dispatcher.idle.is_set()

    asyncio.run(go())
