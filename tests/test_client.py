"""`node.client` and `cpnode-submit` against a master over loopback.

    test ──Client / `python -m node.submit_cli`──▶ master ──AssignTask──▶ FakeNode (one per role)

The master is the real one (`node.master`); the library's tests also run against `FakeMaster`,
and the misbehaviour cases (silence, hang-up, garbage) need it, since it can be scripted. The
tests of a master that goes away mid-batch run `cpnode-master` as a process and SIGTERM it.

TEST FAKES, never used outside this file:
- `FakeMaster`: authenticates, answers `SubmitTask` with `TaskAccepted` and `GetTaskResult` with
  `Pending` for the first few polls, then with the result of `fake_execute`.
- `FakeNode`: a protocol-level node: authenticates, `RegisterRole`, `Heartbeat` every 20 ms, and
  answers every `AssignTask` with `fake_execute` (a lookup and float arithmetic, no evaluator).
The expression `never` is never answered by either, to test deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from node import protocol as p
from node.client import (
    AuthenticationError,
    Client,
    ConnectionClosed,
    MasterProtocolError,
    MasterTimeout,
    MasterUnreachable,
    ResultTimeout,
)
from node.config import JoinInfo
from node.errors import ConfigError
from node.master import MasterThread
from node.submit_cli import ProgressBar, main, rust_display
from tests.conftest import LoopbackGuard

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "client-test-token"
NEVER = "never"  # an expression the fakes never answer


# --- test fakes ----------------------------------------------------------------------------

_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_BINARY = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*")
_COMPLEX = {"(1+2*i)*(3-i)": "5+5i", "1/(1+i)": "0.5-0.5i"}


def fake_execute(task: p.Task, store: dict[str, bytes]) -> p.Result | None:
    """TEST FAKE of a node's executors: `a op b` arithmetic, a few complex products, echoes."""
    match task:
        case p.Compute(expression) if expression == NEVER:
            return None
        case p.Compute(expression):
            match = _BINARY.fullmatch(expression)
            if match is not None:
                left, op, right = match.groups()
                if op == "/" and float(right) == 0:
                    return p.Error("Evaluation error: division by zero (fake)")
                return p.Number(_ARITHMETIC[op](float(left), float(right)))
            if re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", expression):
                return p.Number(float(expression))
            return p.Error(f"Evaluation error: unknown variable `{expression.strip()}`.")
        case p.ComplexMath(expression):
            text = _COMPLEX.get(expression)
            return (
                p.Response(text)
                if text
                else p.Error(f"Parse error: fake cannot read {expression!r}")
            )
        case p.HttpRequest(url):
            return p.Response(f"fake body of {url}")
        case p.Tcp(_, data) | p.Udp(_, data):
            return p.Bytes(b"echo:" + data)
        case p.StoreData(key, data) | p.DiskWrite(key, data):
            store[key] = data
            return p.Stored() if isinstance(task, p.StoreData) else p.Written()
        case p.RetrieveData(key) | p.DiskRead(key):
            return p.Bytes(store[key]) if key in store else p.Error("Key not found")
        case p.GetGlobalRam():
            lines = "".join(f"{k}: {len(v)} bytes\n" for k, v in sorted(store.items()))
            return p.Response(lines or "No entries found\n")
        case p.GetStorage():
            return p.Response("free: 1048576 bytes\nNo entries found\n")
    raise AssertionError(f"fake_execute: unexpected task {task!r}")


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(4)
    return await reader.readexactly(int.from_bytes(header, "big"))


class _Service:
    """The connections a fake holds, so that stopping it closes every one of them."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        for writer in list(self.writers):
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in list(self.writers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


class FakeMaster:
    """TEST FAKE of a CPCluster master, for the client's side of the protocol only.

    `behaviour`: "normal"; "mute" (never answers the token); "silent" (answers the token, then
    nothing); "hangup" (closes at the first request); "garbage" (answers it with a bogus frame).
    A result is `Pending` for the first `pending_polls` polls of its id.
    """

    def __init__(self, behaviour: str = "normal", pending_polls: int = 2) -> None:
        self.behaviour = behaviour
        self.pending_polls = pending_polls
        self.host = "127.0.0.1"
        self.port = 0
        self._service = _Service()
        self._server: asyncio.Server | None = None
        self._tasks: dict[str, p.Task] = {}
        self._polls: dict[str, int] = {}
        self._results: dict[str, p.Result] = {}
        self._store: dict[str, bytes] = {}

    async def start(self) -> FakeMaster:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._service.stop()
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._service.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._service.tasks.add(task)  # type: ignore[arg-type]
        try:
            await self._serve(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._service.tasks.discard(task)  # type: ignore[arg-type]
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        token = await _read_frame(reader)
        if self.behaviour == "mute":
            await reader.read()
            return
        if token.strip() != TOKEN.encode():
            writer.write(p.frame(b"Invalid token"))
            await writer.drain()
            return
        writer.write(p.frame(b"OK"))
        if self.behaviour == "silent":
            await reader.read()
            return
        decoder = p.FrameDecoder()
        while data := await reader.read(1 << 16):
            answers = []
            for payload in decoder.feed(data):
                if self.behaviour == "hangup":
                    return
                if self.behaviour == "garbage":
                    answers.append(p.frame(b'{"Bogus":1}'))
                    continue
                answer = self._answer(p.decode(payload))
                if answer is None:
                    return
                answers.append(p.encode(answer))
            writer.write(b"".join(answers))
            await writer.drain()

    def _answer(self, message: p.Message) -> p.Message | None:
        match message:
            case p.SubmitTask(ident, task):
                self._tasks[ident] = task
                self._polls[ident] = 0
                return p.TaskAccepted(ident)
            case p.GetTaskResult(ident):
                if ident in self._results:
                    return p.TaskResult(ident, self._results[ident])
                self._polls[ident] = self._polls.get(ident, 0) + 1
                if ident not in self._tasks or self._polls[ident] <= self.pending_polls:
                    return p.DirectMessage("Pending")
                result = fake_execute(self._tasks[ident], self._store)
                if result is None:
                    return p.DirectMessage("Pending")
                self._results[ident] = result
                return p.TaskResult(ident, result)
            case p.Disconnect():
                return None
        raise AssertionError(f"FakeMaster: unexpected {message!r}")


class FakeNode:
    """TEST FAKE of a node: joins with a role, heartbeats every 20 ms, answers AssignTask.

    `holding` is set once it was assigned a task it never answers (`never`).
    """

    def __init__(self, role: p.Role) -> None:
        self.role = role
        self.holding = threading.Event()
        self._service = _Service()
        self._store: dict[str, bytes] = {}

    async def start(self, host: str, port: int) -> FakeNode:
        reader, writer = await asyncio.open_connection(host, port)
        self._service.writers.add(writer)
        writer.write(p.frame(TOKEN.encode()))
        answer = await asyncio.wait_for(_read_frame(reader), 5)
        assert answer == b"OK", answer
        writer.write(p.encode(p.RegisterRole(self.role)) + p.encode(p.Heartbeat()))
        self._service.spawn(self._heartbeat(writer))
        self._service.spawn(self._work(reader, writer))
        return self

    async def stop(self) -> None:
        await self._service.stop()

    async def _heartbeat(self, writer: asyncio.StreamWriter) -> None:
        while not writer.is_closing():
            writer.write(p.encode(p.Heartbeat()))
            await asyncio.sleep(0.02)

    async def _work(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = p.FrameDecoder()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                out = []
                for payload in decoder.feed(data):
                    message = p.decode(payload)
                    if isinstance(message, p.AssignTask):
                        result = fake_execute(message.task, self._store)
                        if result is None:
                            self.holding.set()
                        else:
                            out.append(p.encode(p.TaskResult(message.id, result)))
                writer.write(b"".join(out))
                await writer.drain()


class LoopThread:
    """An event loop in a thread of its own, for masters and nodes that tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop")

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "test loop thread did not stop"
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


# --- fixtures and helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    host: str
    port: int
    join_path: Path

    @property
    def join(self) -> JoinInfo:
        return JoinInfo(TOKEN, self.host, self.port)


def write_join(path: Path, host: str, port: int, token: str = TOKEN) -> Path:
    path.write_text(json.dumps({"token": token, "ip": host, "port": port}))
    return path


@contextlib.contextmanager
def fake_master(behaviour: str = "normal") -> Iterator[FakeMaster]:
    with LoopThread() as loop:
        master = loop.call(FakeMaster(behaviour).start())
        try:
            yield master
        finally:
            loop.call(master.stop())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The real master, with one FakeNode per role to run what it assigns."""
    join_path = tmp_path_factory.mktemp("cluster") / "join.json"
    with MasterThread(token=TOKEN, join_path=str(join_path)) as master, LoopThread() as loop:
        nodes = [loop.call(FakeNode(role).start(master.host, master.port)) for role in p.Role]
        try:
            yield Cluster(master.host, master.port, join_path)
        finally:
            for node in nodes:
                loop.call(node.stop())


@pytest.fixture(scope="module", params=["master", "scripted"])
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The library's tests run against the real master and against FakeMaster, whose results
    stay Pending for a few polls, so that the polling rounds are always exercised."""
    if request.param == "master":
        yield request.getfixturevalue("cluster")
        return
    with fake_master() as master:
        join_path = write_join(
            tmp_path_factory.mktemp("scripted") / "join.json", master.host, master.port
        )
        yield Cluster(master.host, master.port, join_path)


@dataclass(frozen=True)
class DoomedMaster:
    """A real `cpnode-master` process that the test stops mid-work, and the nodes it has."""

    process: subprocess.Popen[bytes]
    join_path: Path
    nodes: list[FakeNode]

    def stop(self) -> None:
        """SIGTERM, as a restart would: it closes every connection and exits."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(30) == 0


@pytest.fixture
def doomed_master(tmp_path: Path) -> Iterator[DoomedMaster]:
    """`cpnode-master` as a process of its own (stopped by the test), a FakeNode per role."""
    join_path = tmp_path / "join.json"
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))
    env = dict(os.environ, PYTHONPATH=path, CPCLUSTER_JOIN=str(join_path))
    with (tmp_path / "master.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "node.master.cli", "--no-config", "--listen", "127.0.0.1:0",
             "--tls", "never", "--token", TOKEN, "--state-file", str(tmp_path / "state.jsonl")],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with LoopThread() as loop:
            deadline = time.monotonic() + 30
            while not join_path.exists():  # written once the master listens
                assert process.poll() is None, (tmp_path / "master.log").read_text()
                assert time.monotonic() < deadline, "cpnode-master wrote no join.json in 30 s"
                time.sleep(0.02)
            port = json.loads(join_path.read_text())["port"]
            nodes = [loop.call(FakeNode(role).start("127.0.0.1", port)) for role in p.Role]
            try:
                yield DoomedMaster(process, join_path, nodes)
            finally:
                for node in nodes:
                    loop.call(node.stop())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def read_until(fd: int, text: bytes, timeout: float) -> bytes:
    """Read the terminal `fd` until `text` appears; AssertionError after `timeout` seconds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} did not appear within {timeout} s: {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                raise AssertionError(f"{text!r} never appeared: {seen!r}") from None
    return seen


def read_rest(fd: int) -> bytes:
    """What is left to read on the terminal `fd` once the child on its other side has exited
    (the read ends with EOF, or EIO once the child's side is closed)."""
    rest = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            rest += chunk
    return rest


def run(coro: Coroutine[Any, Any, T], timeout: float = 20) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the library ---------------------------------------------------------------------------


def test_connect_run_and_close(backend: Cluster) -> None:
    async def scenario() -> None:
        async with Client.connect(backend.join) as client:
            assert client.address == f"{backend.host}:{backend.port}"
            assert await client.run(p.Compute("1+2"), timeout=5) == p.Number(3.0)
            assert await client.run(p.Compute("x"), timeout=5) == p.Error(
                "Evaluation error: unknown variable `x`."
            )
        assert client.closed
        with pytest.raises(ConnectionClosed):
            await client.submit(p.Compute("1+1"))
        await client.close()  # idempotent

    run(scenario())


def test_connect_from_join_file_and_overrides(backend: Cluster, tmp_path: Path) -> None:
    wrong = write_join(tmp_path / "join.json", "127.0.0.1", free_port(), token="wrong")

    async def scenario() -> None:
        client = await Client.connect(backend.join_path)
        try:
            task_id = await client.submit(p.ComplexMath("(1+2*i)*(3-i)"))
            assert await client.result(task_id, timeout=5) == p.Response("5+5i")
        finally:
            await client.close()
        async with Client.connect(wrong, port=backend.port, token=TOKEN) as client:
            assert await client.run(p.Compute("2*3"), timeout=5) == p.Number(6.0)

    run(scenario())


def test_bad_token_is_an_authentication_error(backend: Cluster) -> None:
    async def scenario() -> None:
        with pytest.raises(AuthenticationError, match="rejected the token") as caught:
            await Client.connect(host=backend.host, port=backend.port, token="not-the-token")
        assert f"{backend.host}:{backend.port}" in str(caught.value)

    run(scenario())


def test_refused_connection_names_the_address() -> None:
    port = free_port()

    async def scenario() -> None:
        with pytest.raises(MasterUnreachable, match=f"127.0.0.1:{port}"):
            await Client.connect(host="127.0.0.1", port=port, token=TOKEN, timeout=2)

    run(scenario())


def test_a_master_that_is_not_local_needs_a_usable_ca_before_any_connection(
    loopback_only: LoopbackGuard,
) -> None:
    # TLS is chosen by the address alone, so the CA is checked before anything is dialed.
    # `connect()` is not awaited and no event loop runs, so nothing can be dialed; should that
    # change, `loopback_only` refuses a connect to 203.0.113.7 before any packet leaves.
    with pytest.raises(ConfigError, match="`ca_cert` is not a usable PEM certificate"):
        Client.connect(host="203.0.113.7", port=55000, token=TOKEN, ca_cert="not a certificate")
    with pytest.raises(ConfigError, match="no such file"):
        Client.connect(host="127.0.0.1", port=1, token=TOKEN, tls="always", ca_cert_path="/nope")


def test_submit_many_ten_thousand(backend: Cluster) -> None:
    # Its speed is measured in bench/ (bench_master.py, loadgen.py), not asserted here.
    async def scenario() -> None:
        async with Client.connect(backend.join) as client:
            ids = await client.submit_many(p.Compute(f"{i}+1") for i in range(10_000))
            assert len(set(ids)) == 10_000
            results = await client.results(ids, timeout=30)
            assert list(results) == ids
            assert [results[i] for i in ids] == [p.Number(i + 1.0) for i in range(10_000)]

    run(scenario(), timeout=60)


def test_concurrent_requests_share_one_connection(backend: Cluster) -> None:
    async def scenario() -> None:
        async with Client.connect(backend.join) as client:
            results = await asyncio.gather(
                *(client.run(p.Compute(f"{i}*2"), timeout=10) for i in range(50))
            )
            assert results == [p.Number(i * 2.0) for i in range(50)]

    run(scenario())


def test_result_timeout_names_the_id_and_keeps_what_arrived(backend: Cluster) -> None:
    async def scenario() -> None:
        async with Client.connect(backend.join) as client:
            never = await client.submit(p.Compute(NEVER))
            with pytest.raises(ResultTimeout, match=never) as caught:
                await client.result(never, timeout=0.3)
            assert isinstance(caught.value, TimeoutError)
            assert caught.value.pending == [never]
            done = await client.submit(p.Compute("4/2"))
            with pytest.raises(ResultTimeout, match="1 of 2 tasks") as caught:
                await client.results([done, never], timeout=1)
            assert caught.value.done == {done: p.Number(2.0)}
            # The connection is still usable after a result timeout.
            assert await client.run(p.Compute("1-1"), timeout=5) == p.Number(0.0)

    run(scenario())


CLIENT_TIMEOUT = 0.3

MISBEHAVIOUR = [
    pytest.param("mute", MasterTimeout, "did not answer the token", id="mute"),
    pytest.param("silent", MasterTimeout, "sent nothing for 0.3 s", id="silent"),
    pytest.param("hangup", ConnectionClosed, "closed the connection", id="hangup"),
    pytest.param("garbage", MasterProtocolError, "Bogus", id="garbage"),
]


@pytest.mark.parametrize(("behaviour", "error", "message"), MISBEHAVIOUR)
def test_a_misbehaving_master_gives_a_clear_error(
    behaviour: str, error: type[Exception], message: str
) -> None:
    async def scenario(master: FakeMaster) -> None:
        started = time.monotonic()
        with pytest.raises(error, match=message):
            async with Client.connect(
                host=master.host, port=master.port, token=TOKEN, timeout=CLIENT_TIMEOUT
            ) as client:
                await client.submit(p.Compute("1+2"))
        if error is MasterTimeout:
            # The client's own timeout ended the wait: once, not once per step or retry.
            assert time.monotonic() - started < 10 * CLIENT_TIMEOUT

    with fake_master(behaviour) as master:
        run(scenario(master))


def test_a_broken_connection_fails_every_waiting_request() -> None:
    async def scenario(master: FakeMaster) -> None:
        client = await Client.connect(host=master.host, port=master.port, token=TOKEN, timeout=0.3)
        try:
            outcomes = await asyncio.gather(
                *(client.submit(p.Compute("1+2")) for _ in range(5)), return_exceptions=True
            )
            assert all(isinstance(o, MasterTimeout | ConnectionClosed) for o in outcomes)
            assert client.closed
            with pytest.raises(ConnectionClosed, match="is closed"):
                await client.submit(p.Compute("1+2"))
        finally:
            await client.close()

    with fake_master("silent") as master:
        run(scenario(master))


def test_a_lost_connection_hands_over_the_results_that_arrived(tmp_path: Path) -> None:
    # As ResultTimeout does: the error carries the results received and the ids without one.
    join_path = str(tmp_path / "join.json")
    with MasterThread(token=TOKEN, join_path=join_path) as master, LoopThread() as loop:
        nodes = [loop.call(FakeNode(role).start(master.host, master.port)) for role in p.Role]

        async def scenario() -> None:
            arrived = asyncio.Event()

            def progress(done: int, total: int) -> None:
                if done == 2:
                    arrived.set()

            async with Client.connect(host=master.host, port=master.port, token=TOKEN) as client:
                ids = await client.submit_many(
                    [p.Compute("1+1"), p.Compute(NEVER), p.Compute("2*3")]
                )
                waiting = asyncio.create_task(client.results(ids, timeout=60, progress=progress))
                await asyncio.wait_for(arrived.wait(), 10)
                await asyncio.to_thread(master.stop)
                with pytest.raises(ConnectionClosed, match="closed") as caught:
                    await waiting
            assert caught.value.done == {ids[0]: p.Number(2.0), ids[2]: p.Number(6.0)}
            assert caught.value.pending == [ids[1]]

        try:
            run(scenario())
        finally:
            for node in nodes:
                loop.call(node.stop())


def test_a_submission_cut_off_hands_back_its_ids() -> None:
    async def scenario(master: FakeMaster) -> None:
        async with Client.connect(host=master.host, port=master.port, token=TOKEN) as client:
            with pytest.raises(ConnectionClosed) as caught:
                await client.submit_many([p.Compute("1+2"), p.Compute("3+4")])
            assert len(set(caught.value.pending)) == 2
            assert caught.value.done == {}

    with fake_master("hangup") as master:
        run(scenario(master))


# --- the command line ----------------------------------------------------------------------


def submit(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m node.submit_cli ARGS` without any CPCLUSTER_* variable of ours."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CPCLUSTER_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "node.submit_cli", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        cwd=cwd,
        env=environment,
        check=False,
    )


def test_cli_compute_complex_and_json(cluster: Cluster) -> None:
    join = str(cluster.join_path)
    done = submit("--join", join, "compute", "1+2")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"3\n", b"")
    done = submit("complex", "(1+2*i)*(3-i)", "--join", join)
    assert (done.returncode, done.stdout) == (0, b"5+5i\n")
    done = submit("compute", "7/2", "--json", "--join", join)
    line = orjson.loads(done.stdout)
    assert done.returncode == 0
    assert line["result"] == {"Number": 3.5}
    again = submit("result", line["id"], "--join", join)
    assert (again.returncode, again.stdout) == (0, b"3.5\n")
    # An expression that starts with "-" is no option, wherever the options stand; an option
    # (abbreviated too) is no expression.
    cases: list[tuple[list[str], bytes]] = [
        (["compute", "-1+2"], b"1\n"),
        (["compute", "--", "-4"], b"-4\n"),
        (["compute", "--tim", "30", "-2*3"], b"-6\n"),
        (["compute", "--time=30", "2*3"], b"6\n"),
    ]
    for args, expected in cases:
        done = submit("--join", join, *args)
        assert (done.returncode, done.stdout) == (0, expected), (args, done.stderr)
    done = submit("--join", join, "compute", "-1+2", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["result"] == {"Number": 1.0}


def test_cli_task_types_with_data(cluster: Cluster, tmp_path: Path) -> None:
    join = ["--join", str(cluster.join_path)]
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\x00\xffraw")
    cases: list[tuple[list[str], bytes, bytes]] = [
        (["http", "http://127.0.0.1:9/x"], b"", b"fake body of http://127.0.0.1:9/x\n"),
        (["tcp", "127.0.0.1:9", "--text", "@hi"], b"", b"echo:@hi"),
        (["udp", "127.0.0.1:9", f"@{payload}"], b"", b"echo:\x00\xffraw"),
        (["store", "cli-key", "@-"], b"\x01\x02\x03", b"Stored\n"),
        (["retrieve", "cli-key"], b"", b"\x01\x02\x03"),
        (["disk-write", "dir/cli.txt", "plain text"], b"", b"Written\n"),
        (["disk-read", "dir/cli.txt"], b"", b"plain text"),
        (["storage"], b"", b"free: 1048576 bytes\nNo entries found\n"),
    ]
    for args, stdin, expected in cases:
        done = submit(*join, *args, stdin=stdin)
        assert (done.returncode, done.stdout, done.stderr) == (0, expected, b""), args
    done = submit(*join, "ram")
    assert done.returncode == 0
    assert b"cli-key: 3 bytes\n" in done.stdout


def test_cli_error_result_exits_1(cluster: Cluster) -> None:
    done = submit("--join", str(cluster.join_path), "compute", "y")
    assert done.returncode == 1
    assert done.stdout == b""
    assert b"failed: Evaluation error: unknown variable `y`." in done.stderr


def test_cli_result_timeout_exits_1_naming_the_id(cluster: Cluster) -> None:
    done = submit("--join", str(cluster.join_path), "--timeout", "0.5", "compute", NEVER)
    assert done.returncode == 1
    assert re.search(rb"no result for task \S+ within 0.5 s", done.stderr), done.stderr
    done = submit("--join", str(cluster.join_path), "--timeout", "0.2", "--json", "compute", NEVER)
    assert done.returncode == 1
    line = orjson.loads(done.stdout)
    assert line["result"] is None
    assert line["error"] == "timeout: no result within 0.2 s"
    assert line["id"].encode() in done.stderr


def test_cli_batch_prints_results_in_input_order(cluster: Cluster, tmp_path: Path) -> None:
    batch = tmp_path / "tasks.jsonl"
    batch.write_text(
        '{"Compute":{"expression":"1+2"}}\n'
        "\n"
        '{"Compute":{"expression":"z"}}\n'
        '{"ComplexMath":{"expression":"1/(1+i)"}}\n'
        '{"StoreData":{"key":"batch-key","data":[7,8]}}\n'
    )
    done = submit("batch", str(batch), "--join", str(cluster.join_path))
    assert done.returncode == 1, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [line["task_index"] for line in lines] == [0, 1, 2, 3]
    assert [line["result"] for line in lines] == [
        {"Number": 3.0},
        {"Error": "Evaluation error: unknown variable `z`."},
        {"Response": "0.5-0.5i"},
        "Stored",
    ]
    assert len({line["id"] for line in lines}) == 4
    assert done.stderr == b""  # no progress bar: stderr is not a terminal


def test_cli_batch_from_stdin_all_ok(cluster: Cluster) -> None:
    tasks = b"".join(b'{"Compute":{"expression":"%d*3"}}\n' % i for i in range(500))
    done = submit("--join", str(cluster.join_path), "batch", "-", stdin=tasks)
    assert done.returncode == 0, done.stderr
    results = [orjson.loads(line)["result"] for line in done.stdout.splitlines()]
    assert results == [{"Number": i * 3.0} for i in range(500)]


def test_cli_batch_timeout_marks_the_missing_task(cluster: Cluster) -> None:
    tasks = b'{"Compute":{"expression":"1+1"}}\n{"Compute":{"expression":"never"}}\n'
    done = submit("--join", str(cluster.join_path), "--timeout", "1", "batch", "-", stdin=tasks)
    assert done.returncode == 1
    first, second = (orjson.loads(line) for line in done.stdout.splitlines())
    assert first["result"] == {"Number": 2.0}
    assert second["result"] is None
    assert second["error"] == "timeout: no result within 1 s"
    assert b"no result for 1 of 2 tasks" in done.stderr


def test_cli_batch_prints_what_arrived_when_the_master_goes_away(
    doomed_master: DoomedMaster, tmp_path: Path
) -> None:
    # The master stops (SIGTERM, as a restart) after 4 of 6 results reached cpnode-submit, as
    # its progress bar on a terminal shows: those 4 are printed, the 2 others say why they have
    # none and give their ids, and the exit status is 4.
    expressions = ["1+1", NEVER, "2+2", "3+3", NEVER, "4+4"]
    batch = tmp_path / "tasks.jsonl"
    batch.write_bytes(
        b"".join(b'{"Compute":{"expression":"%s"}}\n' % e.encode() for e in expressions)
    )
    command = ["--join", str(doomed_master.join_path), "batch", str(batch)]
    leader, follower = pty.openpty()
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "node.submit_cli", *command],
            stdout=subprocess.PIPE,
            stderr=follower,
            cwd=ROOT,
        ) as process:
            os.close(follower)
            try:
                read_until(leader, b"4/6 tasks", timeout=30)
                doomed_master.stop()
                stdout, _ = process.communicate(timeout=30)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.communicate(timeout=10)
        terminal = read_rest(leader)
    finally:
        os.close(leader)
    assert process.returncode == 4, terminal
    lines = [orjson.loads(line) for line in stdout.splitlines()]
    assert [line["task_index"] for line in lines] == list(range(6))
    assert [line["result"] for line in lines] == [
        {"Number": 2.0}, None, {"Number": 4.0}, {"Number": 6.0}, None, {"Number": 8.0},
    ]  # fmt: skip
    missing = [line for line in lines if line["result"] is None]
    port = json.loads(doomed_master.join_path.read_text())["port"]
    for line in missing:
        assert line["error"].startswith("connection: "), line
        assert f"the master at 127.0.0.1:{port} closed the connection" in line["error"], line
    assert len({line["id"] for line in lines}) == 6
    assert f"the master at 127.0.0.1:{port} closed the connection".encode() in terminal
    assert b"2 tasks have no result (their lines name their ids)" in terminal
    assert b"cpnode-submit result ID" in terminal


def test_cli_single_task_names_its_id_when_the_master_goes_away(
    doomed_master: DoomedMaster,
) -> None:
    # The id is made by cpnode-submit: without it, `cpnode-submit result ID` cannot ask again.
    with subprocess.Popen(
        [sys.executable, "-m", "node.submit_cli", "--join", str(doomed_master.join_path),
         "--json", "compute", NEVER],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    ) as process:  # fmt: skip
        try:
            worker = next(node for node in doomed_master.nodes if node.role is p.Role.Worker)
            assert worker.holding.wait(30), "the task never reached the node"
            doomed_master.stop()
            stdout, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=10)
    assert process.returncode == 4, stderr
    line = orjson.loads(stdout)
    assert line["result"] is None
    assert line["error"].startswith("connection: "), line
    assert f"`cpnode-submit result {line['id']}` fetches it".encode() in stderr


def test_cli_batch_progress_bar_on_a_terminal(cluster: Cluster) -> None:
    tasks = b'{"Compute":{"expression":"1+1"}}\n' * 50
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "node.submit_cli", "--join", str(cluster.join_path), "batch", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=follower,
        cwd=ROOT,
    ) as process:
        os.close(follower)
        try:
            stdout, _ = process.communicate(tasks, timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=10)
            raise
        terminal = read_rest(leader)
        os.close(leader)
    assert process.returncode == 0
    assert len(stdout.splitlines()) == 50
    assert b"[" + b"#" * 30 + b"] 100%  50/50 tasks" in terminal


BAD_INVOCATIONS = [
    pytest.param(["compute", "1+2"], "join.json: join file not found", id="no-join-file"),
    pytest.param(["--join", "{bad}", "compute", "1"], "not valid JSON", id="bad-join-json"),
    pytest.param(["--join", "{missing}", "ram"], "{missing}: join file not found", id="missing"),
    pytest.param(["--join", "{good}", "store", "k"], "missing DATA", id="no-data"),
    pytest.param(["--join", "{good}", "store", "k", "x", "--text", "y"], "not both", id="two-data"),
    pytest.param(
        ["--join", "{good}", "store", "k", "@/nonexistent"], "cannot read data file", id="data-file"
    ),
    pytest.param(
        ["--join", "{good}", "batch", "{badbatch}"], "tasks.jsonl:2: not a task", id="bad-batch"
    ),
    pytest.param(["--join", "{good}", "--timeout", "0", "ram"], "positive number", id="timeout"),
    pytest.param(["frobnicate"], "invalid choice", id="unknown-command"),
    pytest.param(["--host", "bad host", "ram"], "argument --host: expected an IP", id="host"),
    pytest.param(
        ["--ca-cert", "/nonexistent.pem", "ram"],
        "argument --ca-cert: cannot read /nonexistent.pem: No such file",
        id="ca-cert",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_INVOCATIONS)
def test_cli_usage_and_config_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"token": "t", "ip": ')
    write_join(tmp_path / "good.json", "127.0.0.1", free_port())
    (tmp_path / "tasks.jsonl").write_text('"GetGlobalRam"\n{"Compute":{"expr":"1"}}\n')
    paths = {
        "{bad}": str(tmp_path / "bad.json"),
        "{good}": str(tmp_path / "good.json"),
        "{missing}": str(tmp_path / "missing.json"),
        "{badbatch}": str(tmp_path / "tasks.jsonl"),
    }
    for placeholder, path in paths.items():
        message = message.replace(placeholder, path)
    done = submit(*(paths.get(arg, arg) for arg in args), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message.encode() in done.stderr
    assert done.stdout == b""


def test_cli_bad_token_exits_3_and_refused_exits_4(cluster: Cluster, tmp_path: Path) -> None:
    wrong = write_join(tmp_path / "wrong.json", cluster.host, cluster.port, token="nope")
    done = submit("--join", str(wrong), "compute", "1+2")
    assert done.returncode == 3
    assert b"rejected the token" in done.stderr
    port = free_port()
    done = submit("--join", str(cluster.join_path), "--port", str(port), "compute", "1+2")
    assert done.returncode == 4
    assert f"cannot connect to the master at 127.0.0.1:{port}".encode() in done.stderr


def test_cli_token_from_environment(cluster: Cluster, tmp_path: Path) -> None:
    wrong = write_join(tmp_path / "wrong.json", cluster.host, cluster.port, token="nope")
    done = submit("--join", str(wrong), "compute", "2+2", env={"CPCLUSTER_TOKEN": TOKEN})
    assert (done.returncode, done.stdout) == (0, b"4\n")


SUBCOMMANDS = [
    "compute", "complex", "http", "tcp", "udp", "store", "retrieve", "disk-write", "disk-read",
    "ram", "storage", "result", "batch",
]  # fmt: skip
FLAGS = ["--join", "--host", "--port", "--token", "--timeout", "--json", "--help"]


def test_help_mentions_every_subcommand_flag_and_exit_status(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for word in [*SUBCOMMANDS, *FLAGS, "@FILE", "@-", "--text", "exit status", "CPCLUSTER_TOKEN"]:
        assert word in text, word
    for code in range(5):
        assert re.search(rf"^  {code}  ", text, re.MULTILINE), code
    for command in SUBCOMMANDS:
        assert main([command, "--help"]) == 0
        sub_help = capsys.readouterr().out
        assert all(flag in sub_help for flag in FLAGS), command
    assert main(["batch", "--help"]) == 0
    assert "--no-progress" in capsys.readouterr().out


def test_cli_help_as_a_process() -> None:
    done = submit("--help")
    assert done.returncode == 0
    assert b"usage: cpnode-submit" in done.stdout


# --- output formatting ---------------------------------------------------------------------

RUST_DISPLAY = [
    (3.0, "3"),
    (0.5, "0.5"),
    (-0.0, "-0"),
    (1 / 3, "0.3333333333333333"),
    (1e21, "1000000000000000000000"),
    (1.5e-7, "0.00000015"),
    (-2.5, "-2.5"),
    (123456789.125, "123456789.125"),
]


@pytest.mark.parametrize(("value", "text"), RUST_DISPLAY)
def test_numbers_print_as_rust_displays_them(value: float, text: str) -> None:
    assert rust_display(value) == text


def test_progress_bar_redraws_one_line() -> None:
    class Terminal:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> int:
            self.text += text
            return len(text)

        def flush(self) -> None:
            pass

    terminal = Terminal()
    started = time.monotonic()
    bar = ProgressBar(terminal)  # type: ignore[arg-type]
    for done in range(1, 1001):
        bar.update(done, 1000)
    bar.finish()
    elapsed = time.monotonic() - started
    draws = terminal.text.split("\r")
    # Each draw returns to the start of the one line; the line ends only when the bar finishes.
    assert draws[0] == ""
    assert all("\n" not in draw for draw in draws[1:-1])
    assert draws[-1].endswith("\n") and draws[-1].count("\n") == 1
    # The first update and the last are always drawn, the ones between at most ten times a
    # second: 1,000 updates are not 1,000 draws. (Bounded by the time the loop took, which
    # cannot flake: the bar cannot have seen more time pass than this test did.)
    assert draws[1].startswith("[" + "-" * 30 + "]   0%  1/1,000 tasks  ")
    assert re.fullmatch(r"\[#{30}\] 100%  1,000/1,000 tasks  \d+\.\d s\n", draws[-1]), draws[-1]
    assert 2 <= len(draws) - 1 <= 2 + elapsed / 0.1


def test_connect_rejects_a_bad_timeout() -> None:
    with pytest.raises(ValueError, match="positive"):
        Client.connect(host="127.0.0.1", port=1, token=TOKEN, timeout=0)
