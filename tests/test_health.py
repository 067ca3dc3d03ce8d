"""The health endpoint, JSON logs and cpnode-status, against real node processes."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from node import health, status_cli
from node.client import Client
from node.config import Config, JoinInfo
from node.master import MasterThread
from node.protocol import messages as m
from node.supervisor import Node
from shm.diskstore import DIRECTORY_BYTES
from tests.netservers import HttpServer
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster, start_node, stop_node
from tests.test_node import run_tasks
from workers.logformat import HeldRecords, JsonFormatter, configure_logging

FAILOVER_MS = 400
TOKEN = "health-test-token"
# Each takes about a millisecond in a worker: enough to keep one worker busy for seconds.
SLOW_BODY = "+".join(f"sin({k})*cos({k})" for k in range(150))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def wait_for(port: int, path: str, code: int, node: NodeProcess, timeout: float = 30.0) -> bytes:
    """Poll `path` until it answers `code`; fail if the node exits or the time runs out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise AssertionError(f"node exited with {node.proc.returncode}:\n{node.log}")
        try:
            status, body = get(port, path, timeout=2)
        except OSError as exc:
            last = exc
        else:
            if status == code:
                return body
            last = (status, body)
        time.sleep(0.05)
    raise AssertionError(f"{path} did not answer {code} within {timeout} s (last: {last!r})")


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    status, body = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def submit(join: Path, tasks: list[m.Task]) -> None:
    async def go() -> None:
        async with Client.connect(join, timeout=30) as client:
            await client.submit_many(tasks)

    asyncio.run(go())


class Running:
    def __init__(self, tmp: Path, master: MasterThread, node: NodeProcess, port: int) -> None:
        self.tmp = tmp
        self.join = tmp / "join.json"
        self.master = master
        self.node = node
        self.port = port


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One master and one node with JSON logs and the health endpoint, for the read-only tests."""
    tmp = tmp_path_factory.mktemp("health")
    port = free_port()
    with MasterThread(
        Config(failover_timeout_ms=FAILOVER_MS), join_path=str(tmp / "join.json")
    ) as master:
        node = NodeProcess(
            tmp, tmp / "join.json",
            {"failover_timeout_ms": FAILOVER_MS, "master_addresses": [master.address]},
            "--workers", "2", "--log-format", "json", "--health-port", str(port),
        )  # fmt: skip
        try:
            wait_for(port, "/readyz", 200, node)
            node.record_children()
            yield Running(tmp, master, node, port)
            assert node.stop() == 0
            assert node.leftover_children() == []
        finally:
            node.close()


def test_readyz_is_false_before_the_master_and_during_drain(tmp_path: Path) -> None:
    master_port, port = free_port(), free_port()
    join = tmp_path / "join.json"
    join.write_text(json.dumps({"token": TOKEN, "ip": "127.0.0.1", "port": master_port}))
    node = NodeProcess(
        tmp_path, join,
        {"failover_timeout_ms": 1000, "master_addresses": [f"127.0.0.1:{master_port}"]},
        "--workers", "1", "--health-port", str(port),
    )  # fmt: skip
    master: MasterThread | None = None
    try:
        wait_for(port, "/healthz", 200, node)
        # Workers up, no master yet: alive but not ready.
        body = json.loads(wait_for(port, "/readyz", 503, node))
        deadline = time.monotonic() + 30
        while body["status"] != "connecting" and time.monotonic() < deadline:
            time.sleep(0.05)
            status, raw = get(port, "/readyz")
            assert status == 503
            body = json.loads(raw)
        assert body["status"] == "connecting"
        assert body["workers_ready"] == 1
        assert get(port, "/healthz")[0] == 200

        master = MasterThread(Config(failover_timeout_ms=1000), port=master_port, token=TOKEN)
        master.start()
        body = json.loads(wait_for(port, "/readyz", 200, node))
        assert body["master"] == f"127.0.0.1:{master_port}"
        assert "node ready" in node.log

        # Keep the node busy, then ask it to stop: it drains (finishes what its worker holds,
        # then waits for the master to take back the rest), not ready all along.
        submit(join, [m.Compute(f"{i}+{SLOW_BODY}") for i in range(3000)])
        deadline = time.monotonic() + 30
        while json.loads(get(port, "/status")[1])["tasks"]["held"] == 0:
            assert time.monotonic() < deadline, "the node never received the tasks"
            time.sleep(0.02)
        node.proc.send_signal(signal.SIGTERM)
        seen: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while node.proc.poll() is None and time.monotonic() < deadline:
            try:
                status, raw = get(port, "/readyz", timeout=2)
            except OSError:  # the endpoint closes as the process ends
                break
            seen.append((status, json.loads(raw)["status"]))
            time.sleep(0.02)
        assert node.proc.wait(30) == 0
        # The signal takes a moment to arrive; from then on the node is never ready again.
        assert (503, "draining") in seen, seen
        since_signal = seen[seen.index((503, "draining")) :]
        assert all(status == 503 for status, _ in since_signal), seen
        assert {status for _, status in since_signal} <= {"draining", "stopped"}, seen
        # The drain ran its course before the process ended: it handed back what the worker
        # had not started and stayed (not ready) until the master took it back. Its steps are
        # logged in order.
        log = node.log
        steps = [
            "stop requested: draining",
            "draining (at most",
            "for the master to evict this node",
            "drain ended after",
        ]
        at = [log.index(step) for step in steps]
        assert at == sorted(at), log
        handed_back = re.search(r"drain ended after [\d.]+ s: (\d+) tasks handed back", log)
        assert handed_back is not None and int(handed_back.group(1)) > 0, log
    finally:
        node.close()
        if master is not None:
            master.stop()


EXPECTED_METRICS = {
    "cpnode_node_info",
    "cpnode_status",
    "cpnode_ready",
    "cpnode_uptime_seconds",
    "cpnode_health_connections_refused_total",
    "cpnode_event_loop_lag_seconds_count",
    "cpnode_tasks_received_total",
    "cpnode_tasks_completed_total",
    "cpnode_tasks_failed_total",
    "cpnode_task_execution_seconds_bucket",
    "cpnode_tasks_answered_total",
    "cpnode_tasks_taken_back_total",
    "cpnode_tasks_queued",
    "cpnode_tasks_held",
    "cpnode_worker_tasks_in_flight",
    "cpnode_worker_up",
    "cpnode_master_connected",
    "cpnode_master_reconnects_total",
    "cpnode_master_failovers_total",
    "cpnode_heartbeat_rtt_seconds_count",
    "cpnode_heartbeat_lateness_seconds_count",
    "cpnode_link_frames_received_total",
    "cpnode_link_frames_sent_total",
    "cpnode_link_bytes_received_total",
    "cpnode_link_bytes_sent_total",
    "cpnode_disk_store_quota_bytes",
    "cpnode_shm_bytes",
    "process_resident_memory_bytes",
}


def test_metrics_parse_and_counters_move_when_tasks_run(running: Running) -> None:
    before = scrape(running.port)
    assert before[("cpnode_ready", ())] == 1
    assert before[("cpnode_worker_up", (("worker", "0"),))] == 1
    assert before[("cpnode_worker_replacements_total", ())] == 0  # there before any restart
    compute = (("type", "Compute"),)

    def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], key: tuple) -> float:
        return samples.get(key, 0.0)

    tasks: list[m.Task] = [m.Compute(f"{i}*3") for i in range(500)]
    tasks += [m.Compute("1/")] * 5  # a syntax error: answered with Error, counted as failed
    results = run_tasks(running.join, tasks)
    assert sum(isinstance(r, m.Error) for r in results) == 5

    # Workers report their per-type stats within about half a second of going idle.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(running.port)
        completed = ("cpnode_tasks_completed_total", compute)
        if value(after, completed) - value(before, completed) >= 505:
            break
        assert time.monotonic() < deadline, (value(before, completed), value(after, completed))
        time.sleep(0.1)

    missing = EXPECTED_METRICS - {name for name, _ in after}
    assert not missing

    def moved(name: str, labels: tuple = ()) -> float:
        return value(after, (name, labels)) - value(before, (name, labels))

    assert moved("cpnode_tasks_received_total", compute) == 505
    assert moved("cpnode_tasks_failed_total", compute) == 5
    assert moved("cpnode_tasks_answered_total") == 505
    assert moved("cpnode_tasks_taken_back_total") == 0  # no task ran long: nothing taken back
    assert moved("cpnode_task_execution_seconds_count", compute) == 505
    assert moved("cpnode_task_execution_seconds_bucket", (("le", "+Inf"), *compute)) == 505
    done = sum(moved("cpnode_worker_tasks_done_total", (("worker", str(i)),)) for i in range(2))
    assert done == 505
    assert moved("cpnode_link_frames_received_total") >= 505
    assert moved("cpnode_link_frames_sent_total") >= 505
    assert moved("cpnode_link_bytes_received_total") > 0
    assert moved("cpnode_link_bytes_sent_total") > 0
    assert value(after, ("cpnode_heartbeat_rtt_seconds_count", ())) > 0
    assert value(after, ("cpnode_tasks_held", ())) == 0
    assert value(after, ("cpnode_master_reconnects_total", ())) == 0


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def by_type(samples: Samples, name: str) -> dict[str, float]:
    """The samples of the counter `name` (labelled by task type), by type."""
    return {dict(labels)["type"]: value for (n, labels), value in samples.items() if n == name}


def counted(samples: Samples) -> tuple[dict[str, float], dict[str, float]]:
    """`cpnode_tasks_completed_total` and `cpnode_tasks_failed_total`, by type."""
    return (
        by_type(samples, "cpnode_tasks_completed_total"),
        by_type(samples, "cpnode_tasks_failed_total"),
    )


def settled(port: int, answered: float, timeout: float = 15.0) -> Samples:
    """/metrics once `answered` tasks were answered and the counts by type add up to them
    (workers report theirs within half a second of going idle); at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        completed, failed = counted(samples)
        now = samples[("cpnode_tasks_answered_total", ())]
        if now == answered and sum(completed.values()) == answered:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(
                f"answered {now} (expected {answered}); by type, completed {completed}, "
                f"failed {failed}"
            )
        time.sleep(0.1)


def written_pids(path: Path) -> list[int]:
    """The pids `pid PATH` tasks wrote to `path` (whole lines only)."""
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().splitlines(keepends=True) if line[-1] == "\n"]


def slow_node(
    tmp: Path, master: MasterThread, port: int, workers: int, **config: object
) -> NodeProcess:
    """A node whose `Compute` knows the test expressions of tests/slowtasks.py."""
    settings = {"failover_timeout_ms": FAILOVER_MS, "master_addresses": [master.address], **config}
    node = NodeProcess(
        tmp, tmp / "join.json", settings,
        "--workers", str(workers), "--health-port", str(port),
        slow_compute=True,
    )  # fmt: skip
    wait_for(port, "/readyz", 200, node)
    return node


def test_a_task_past_task_timeout_ms_counts_as_failed_under_its_type(tmp_path: Path) -> None:
    """The supervisor answers a task past `task_timeout_ms` with an `Error` (its worker, killed,
    counted nothing): the task is counted once under its type, completed and failed, and the
    counts by type add up to `cpnode_tasks_answered_total`."""
    port = free_port()
    join = tmp_path / "join.json"
    with MasterThread(Config(failover_timeout_ms=FAILOVER_MS), join_path=str(join)) as master:
        node = slow_node(tmp_path, master, port, 2, task_timeout_ms=300)
        try:
            results = run_tasks(
                join, [m.Compute(f"{i}*3") for i in range(50)] + [m.Compute("1/")] * 3
            )
            assert sum(isinstance(r, m.Error) for r in results) == 3
            # Reported before the kill (a killed worker takes what it had not reported with it).
            assert counted(settled(port, 53)) == ({"Compute": 53}, {"Compute": 3})

            (timed_out,) = run_tasks(join, [m.Compute("sleep 30")])
            assert isinstance(timed_out, m.Error)
            assert "task_timeout_ms = 300 ms" in timed_out.message
            after = settled(port, 54)
            assert counted(after) == ({"Compute": 54}, {"Compute": 4})
            assert (
                after[("cpnode_worker_restarts_total", (("cause", "task_timeout_ms = 300"),))] == 1
            )
            assert node.stop() == 0
        finally:
            node.close()


def test_a_task_whose_worker_was_killed_counts_as_failed_under_its_type_once(
    tmp_path: Path,
) -> None:
    """A `Compute` whose worker is SIGKILLed while it runs is retried once (it is safe to
    repeat); its second worker SIGKILLed too, the supervisor answers it with an `Error` naming
    the signal: counted once under its type, completed and failed, and the counts by type add
    up to `cpnode_tasks_answered_total`."""
    port = free_port()
    join = tmp_path / "join.json"
    pids = tmp_path / "pids"
    with MasterThread(Config(failover_timeout_ms=FAILOVER_MS), join_path=str(join)) as master:
        node = slow_node(tmp_path, master, port, 1)
        try:
            results = run_tasks(join, [m.Compute(f"{i}+1") for i in range(20)] + [m.Compute("1/")])
            assert sum(isinstance(r, m.Error) for r in results) == 1
            assert counted(settled(port, 21)) == ({"Compute": 21}, {"Compute": 1})

            async def killed_twice() -> m.Result:
                async with Client.connect(join, timeout=30) as client:
                    (ident,) = await client.submit_many([m.Compute(f"pid {pids}")])
                    for run in (1, 2):  # the run, then its retry
                        async with asyncio.timeout(30):
                            while len(ran_by := written_pids(pids)) < run:
                                await asyncio.sleep(0.02)
                        os.kill(ran_by[-1], signal.SIGKILL)
                    return (await client.results([ident], timeout=30))[ident]

            result = asyncio.run(killed_twice())
            assert isinstance(result, m.Error)
            assert "died while running this task: signal SIGKILL" in result.message
            after = settled(port, 22)
            assert counted(after) == ({"Compute": 22}, {"Compute": 2})
            assert by_type(after, "cpnode_tasks_received_total") == {"Compute": 22}
            assert after[("cpnode_worker_replacements_total", ())] == 2
            assert node.stop() == 0
        finally:
            node.close()


def test_io_tasks_count_under_their_type(running: Running) -> None:
    """`HttpRequest` tasks run in the supervisor's event loop, not in a worker: the supervisor
    counts them, a refused connection's `Error` as failed."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    closed = free_port()
    completed, failed = counted(scrape(running.port))
    with HttpServer({"/ok": ok}) as http:
        tasks: list[m.Task] = [
            m.HttpRequest(http.url("/ok")),
            m.HttpRequest(f"http://127.0.0.1:{closed}/"),
        ]
        response, refused = run_tasks(running.join, tasks)
    assert isinstance(response, m.Response) and isinstance(refused, m.Error)
    answered = scrape(running.port)[("cpnode_tasks_answered_total", ())]
    completed_after, failed_after = counted(settled(running.port, answered))
    assert completed_after["HttpRequest"] - completed.get("HttpRequest", 0) == 2
    assert failed_after["HttpRequest"] - failed.get("HttpRequest", 0) == 1


def test_json_logs_are_valid_json_lines(running: Running) -> None:
    lines = [line for line in running.node.log.splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys(), record
        assert record["level"] in {"error", "warn", "info", "debug", "trace"}
        assert record["ts"].endswith("Z")
    messages = [r["message"] for r in records]
    assert any(message.startswith("node ready") for message in messages)
    assert any(message.startswith("health endpoint on http://") for message in messages)


def test_json_formatter_keeps_extra_fields_and_tracebacks() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("cpnode.test-json")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter({"worker": 3}))
    logger.addHandler(handler)
    try:
        logger.warning("quota refused %s", "k1", extra={"task_id": "abc", "bytes": 7})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "quota refused k1"
    assert first["level"] == "warn"
    assert first["logger"] == "cpnode.test-json"
    assert (first["task_id"], first["bytes"], first["worker"]) == ("abc", 7, 3)
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exc"]


@pytest.mark.parametrize(
    ("configured", "expected"),
    [("error", ["at it"]), ("info", ["held at info", "below error", "at it"])],
)
def test_records_held_until_logging_is_configured_come_out_once_at_its_level_and_format(
    configured: str, expected: list[str]
) -> None:
    # At "info", the info record was lost: the root logger's default WARNING dropped it
    # before the block held it.
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    logger = logging.getLogger("cpnode.test-held")
    try:
        with HeldRecords():
            logger.info("held at info")
            logger.warning("below error")
            logger.error("at it")
            configure_logging(configured, "json", stream=stream)
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [line["message"] for line in lines] == expected
        assert lines[-1] | {"ts": ""} == {
            "ts": "",
            "level": "error",
            "logger": "cpnode.test-held",
            "message": "at it",
            "pid": os.getpid(),
        }
        assert not [h for h in root.handlers if isinstance(h, HeldRecords)]
    finally:
        for handler in root.handlers[:]:
            if handler.get_name() == "cpnode-stderr":
                root.removeHandler(handler)
        root.setLevel(level)


def test_configure_logging_supports_trace_and_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    try:
        configure_logging("info", "text", stream=io.StringIO())
        configure_logging("trace", "json", stream=stream)
        ours = [h for h in root.handlers if h.get_name() == "cpnode-stderr"]
        assert len(ours) == 1
        logging.getLogger("cpnode.test-trace").log(5, "very fine")
        assert json.loads(stream.getvalue())["level"] == "trace"
        with pytest.raises(ValueError, match="log format"):
            configure_logging("info", "xml")
    finally:
        for handler in root.handlers[:]:
            if handler.get_name() == "cpnode-stderr":
                root.removeHandler(handler)
        root.setLevel(level)


def test_cpnode_status_prints_the_summary(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    run_tasks(running.join, [m.Compute("2+2")])
    code = status_cli.main([f"127.0.0.1:{running.port}", "--interval", "0.3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "role Worker" in out
    assert f"master    {running.master.address}" in out
    assert "ready (healthy, ready)" in out
    assert "workers   2 ready of 2" in out
    assert "/s" in out
    for child in json.loads(get(running.port, "/status")[1])["workers"]:
        assert str(child["pid"]) in out
    assert len(out.splitlines()) < 40

    assert status_cli.main([str(running.port), "--interval", "0", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["ready"] is True
    assert document["role"] == "Worker"
    assert document["tasks"]["taken_back"] == 0


def test_cpnode_status_names_an_unreachable_node(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert status_cli.main([f"127.0.0.1:{port}", "--interval", "0", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the node's health endpoint" in err
    assert str(port) in err


def test_cpnode_status_into_a_closed_pipe_exits_quietly(running: Running) -> None:
    # `cpnode-status | head -1`: the reader goes away before the summary is written.
    command = [sys.executable, "-m", "node.status_cli", str(running.port), "--interval", "0"]
    reader, writer = os.pipe()
    os.close(reader)
    try:
        done = subprocess.run(command, stdout=writer, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(writer)
    assert done.returncode == 0
    assert done.stderr == b""


def test_cpnode_status_refuses_what_is_not_a_cpnode_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def not_ours(request: web.Request) -> web.Response:
        return web.json_response({"a": 1})

    routes = {path: not_ours for path in ("/status", "/healthz", "/readyz")}
    with HttpServer(routes) as server:
        assert status_cli.main([str(server.port), "--interval", "0"]) == 2
    err = capsys.readouterr().err
    assert (
        f"127.0.0.1:{server.port}/status is not a cpnode status document (KeyError: 'tasks')" in err
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--interval", "-1"], "--interval: must be 0 or more seconds, got -1"),
        (["--timeout", "0"], "--timeout: must be a positive number of seconds, got 0"),
        (["--timeout", "nan"], "--timeout: must be a positive number of seconds, got nan"),
    ],
)
def test_cpnode_status_refuses_bad_durations(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        status_cli.main(["9655", *args])
    assert stopped.value.code == 2
    assert needle in capsys.readouterr().err


def test_http_answers_bad_requests_plainly(running: Running) -> None:
    assert get(running.port, "/nowhere")[0] == 404
    assert get(running.port, "/readyz", method="POST")[0] == 405
    status, body = get(running.port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
        raw.sendall(b"GET /" + b"x" * 20000 + b" HTTP/1.1\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 431 ")


def test_healthz_fails_while_the_loop_lags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "LAG_LIMIT_S", 0.2)
    monkeypatch.setattr(health, "LAG_TICK_S", 0.1)

    async def ask(port: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await writer.wait_closed()
        return int(line.split()[1])

    async def go() -> None:
        node = Node(
            Config(workers=1, health_listen=f"127.0.0.1:{free_port()}"),
            JoinInfo("t", "127.0.0.1", 1),
            start_method="spawn",
        )
        server = node.health
        assert server is not None
        await server.start()
        try:
            await asyncio.sleep(0.2)
            assert await ask(server.port) == 200
            time.sleep(0.4)  # the loop is blocked: the next timer fires 0.4 s late
            await asyncio.sleep(0.01)
            assert server.loop_lag > 0.2
            assert not server.healthy()[0]
            assert await ask(server.port) == 503
            await asyncio.sleep(0.3)  # timers on time again
            assert await ask(server.port) == 200
            problems = server.problems
            logging.getLogger("cpnode.test").warning("something odd")
            assert problems.records[-1]["message"] == "something odd"
            assert server.status()["recent_problems"][-1]["level"] == "warn"
        finally:
            await server.close()
        assert server.problems not in logging.getLogger().handlers

    asyncio.run(go())


def test_health_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "join.json").write_text(
            f'{{"token":"t","ip":"127.0.0.1","port":{free_port()}}}'
        )
        node = NodeProcess(
            tmp_path, tmp_path / "join.json", {}, "--workers", "1", "--health-port", str(port)
        )
        try:
            assert node.proc.wait(30) == 1  # a port in use: not the config's fault
            assert f"cannot listen on 127.0.0.1:{port} for the health endpoint" in node.log
        finally:
            node.close()


def nested(top: Path, depth: int = 600) -> Path:
    """A directory `depth` levels below `top`: as deep as a walk that recursed (two calls a
    level) could not go. Made level by level: os.makedirs recurses too."""
    directory = top
    for _ in range(depth):
        directory = directory / "d"
        directory.mkdir()
    return directory


def test_store_sizes_count_this_nodes_files_only(tmp_path: Path) -> None:
    storage, shm = tmp_path / "storage", tmp_path / "shm"
    (storage / "sub").mkdir(parents=True)
    (storage / "k1").write_bytes(b"x" * 100)
    (storage / "sub" / "k2").write_bytes(b"x" * 20)
    (nested(storage / "sub") / "k3").write_bytes(b"x" * 3)
    (storage / "link").symlink_to(tmp_path)  # never followed
    (storage / ".cpnode-tmp-1-x").write_bytes(b"x" * 50)  # a write in progress: not yet
    (storage / ".cpnode-tmp-1-y").mkdir()  # (as the quota counts)
    (shm / "cpnode-a" / "mem").mkdir(parents=True)
    (shm / "cpnode-a" / "mem" / "key").write_bytes(b"x" * 7)
    (nested(shm / "cpnode-a" / "mem") / "deep").write_bytes(b"x" * 2)
    (shm / "cpnode-a-seg-1234").write_bytes(b"x" * 5)
    (shm / "cpnode-ab").mkdir()
    (shm / "cpnode-ab" / "other").write_bytes(b"x" * 1000)
    found = health._read_resources(str(storage), str(shm), "cpnode-a", [(0, 1 << 30)])
    # Directories count 4 KiB each below storage_dir, as for the quota: sub/ and 600 nested.
    assert found.disk_store_bytes == 123 + 601 * DIRECTORY_BYTES
    assert found.shm_bytes == 14
    assert found.shm_free_bytes is not None and found.shm_free_bytes > 0
    assert found.worker_rss == {}  # no such process
    missing = health._read_resources(str(tmp_path / "none"), str(shm), "cpnode-z", [])
    assert (missing.disk_store_bytes, missing.shm_bytes) == (0, 0)  # nothing written yet


def test_a_deep_disk_write_leaves_metrics_answering(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """A DiskWrite 600 directories deep once made every scrape drop its connection: the size
    walk recursed into a RecursionError, the scrape died of it, and the next scrape read again.
    The store refuses such paths now (64 parts at most); a tree made before, or by hand, is
    still walked."""
    port = free_port()
    blob = b"x" * 1000
    (tmp_path / "storage").mkdir()
    (nested(tmp_path / "storage") / "f").write_bytes(blob)
    node = start_node(
        tmp_path, scripted, f"test-deep-{os.getpid()}",
        role="Disk", shm_dir="/dev/shm", health_listen=f"127.0.0.1:{port}",
    )  # fmt: skip
    try:
        deep = m.DiskWrite("/".join(["d"] * 600) + "/g", blob)
        assert scripted.run(deep) == m.Error("Invalid path")
        # The first scrape starts the read and waits a second at most for it; the figure shows
        # once the read has finished. Every scrape answers meanwhile.
        stored = ("cpnode_disk_store_bytes", ())
        deadline = time.monotonic() + 30
        while stored not in (samples := scrape(port)):
            assert time.monotonic() < deadline, "the store size never showed in /metrics"
            time.sleep(0.1)
        assert samples[stored] == len(blob) + 600 * DIRECTORY_BYTES
        assert samples[("cpnode_disk_store_quota_bytes", ())] > samples[stored]
        assert "Traceback" not in node.log
        assert "reading store sizes" not in node.log  # the read did not fail
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_a_failing_store_read_is_logged_once_and_scrapes_still_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read of store sizes can fail with more than an OSError (here a ValueError: a NUL in
    `storage_dir`, which the config refuses since, set behind its back to stand for any failure
    the read may meet). A scrape answers without the figure, and a failure that repeats is
    logged once. STORAGE_SCAN_EVERY_S = 0 makes every scrape read again."""
    monkeypatch.setattr(health, "STORAGE_SCAN_EVERY_S", 0.0)

    async def scrape_status(port: int) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            response = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            await writer.wait_closed()
        assert response, "the connection closed without an answer"
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    async def go() -> None:
        node = Node(
            Config(workers=1, health_listen=f"127.0.0.1:{free_port()}"),
            JoinInfo("t", "127.0.0.1", 1),
            start_method="spawn",
        )
        object.__setattr__(node.config, "storage_dir", str(tmp_path / "bad\x00name"))
        server = node.health
        assert server is not None
        await server.start()
        try:
            for _ in range(3):
                status, body = await scrape_status(server.port)
                assert status == 200
                assert b"cpnode_disk_store_quota_bytes" in body
                assert b"cpnode_disk_store_bytes " not in body  # no figure, not a made-up one
            logged = [r["message"] for r in server.problems.records]
        finally:
            await server.close()
        failures = [line for line in logged if "reading store sizes" in str(line)]
        assert len(failures) == 1, logged
        assert "ValueError: embedded null byte" in str(failures[0])

    asyncio.run(go())


def idle_connection(port: int) -> socket.socket:
    """A connection to 127.0.0.1:`port` that sends nothing, non-blocking from now on."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)  # a timeout would make recv wait for data, MSG_DONTWAIT or not
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed the non-blocking `sock` (without sending anything)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_connections_over_the_cap_are_closed_and_hold_no_descriptor(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    """Each connection to the health endpoint may stay open REQUEST_TIMEOUT_S; unbounded, a
    client opening them faster than they time out took every descriptor the node had. Hold
    MAX_CONNECTIONS idle connections, then open more one at a time: they are closed unanswered,
    and the node's open descriptors never grow by more than MAX_CONNECTIONS (and a few)."""
    cap, wanted = health.MAX_CONNECTIONS, 16  # `wanted`: refused connections to see
    port = free_port()
    node = start_node(
        tmp_path, scripted, f"test-cap-{os.getpid()}", workers=1, health_listen=f"127.0.0.1:{port}"
    )
    held: list[socket.socket] = []
    try:
        process = psutil.Process(node.proc.pid)
        before = most = process.num_fds()

        def settle(opened: list[socket.socket]) -> list[socket.socket]:
            """Wait until the node holds or has closed each of `opened`; return those closed."""
            nonlocal most
            deadline = time.monotonic() + 30
            while True:
                peers = {
                    c.raddr.port
                    for c in process.net_connections(kind="tcp")
                    if c.raddr and c.laddr.port == port
                }
                most = max(most, process.num_fds())
                closed = [s for s in opened if closed_by_peer(s)]
                if all(s in closed or s.getsockname()[1] in peers for s in opened):
                    return closed
                assert time.monotonic() < deadline, "the node neither took nor closed a connection"
                time.sleep(0.01)

        held += [idle_connection(port) for _ in range(cap)]
        settle(held)
        # A held connection times out after REQUEST_TIMEOUT_S and frees its place, so the next
        # one may be taken rather than closed: go on until `wanted` were closed.
        refused = 0
        for _ in range(2 * cap + wanted):
            held.append(idle_connection(port))
            refused += len(settle(held[-1:]))
            if refused == wanted:
                break
        assert most <= before + cap + 4, (before, most)
        assert refused == wanted

        for sock in held:
            sock.close()
        wait_for(port, "/healthz", 200, node)  # the places are free again
        assert scrape(port)[("cpnode_health_connections_refused_total", ())] >= wanted
        assert node.log.count("new ones are closed unanswered") == 1, node.log  # one warning
        assert stop_node(node, scripted) == 0
    finally:
        for sock in held:
            sock.close()
        node.close()
