"""A scripted master for node tests: pushes exactly the `AssignTask` frames a test asks for,
to whatever role the node registered (a real master routes by role; a direct link does not).

Blocking sockets in the test's own thread: `run(task)` writes one `AssignTask` and reads until
its `TaskResult` arrives, answering the node's heartbeats on the way. Give the node a long
`failover_timeout_ms`: between calls nobody reads its heartbeats.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from node.config import JoinInfo, write_join
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame
from tests.nodeproc import NodeProcess

TOKEN = "scripted-token"

M = TypeVar("M", bound=m.Message)


class ScriptedMaster:
    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._conn: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._ids = itertools.count()
        self.role: m.Role | None = None
        self.ack = codec.encode(m.HEARTBEAT_ACK)  # the frame that answers a Heartbeat

    def write_join(self, path: Path) -> None:
        write_join(path, JoinInfo(TOKEN, "127.0.0.1", self.port))  # mode 0600, as a master does

    def accept(self, timeout: float = 30.0, *, after_ok: bytes = b"") -> None:
        """Take the node's connection and its handshake (token, RegisterRole, Heartbeat);
        `after_ok` goes out in the same write as the "OK", so the node reads it with the OK."""
        if self._conn is not None:
            self._conn.close()
        self._decoder = FrameDecoder()
        self._pending: list[bytes] = []  # what the last connection sent is gone with it
        self._listener.settimeout(timeout)
        self._conn, _ = self._listener.accept()
        self._conn.settimeout(timeout)
        token = self._next_payload(time.monotonic() + timeout)
        assert token == TOKEN.encode(), token
        self._conn.sendall(frame(b"OK") + after_ok)
        deadline = time.monotonic() + timeout
        while self.role is None:
            message = codec.decode(self._next_payload(deadline))
            if isinstance(message, m.RegisterRole):
                self.role = message.role
            self._answer(message)

    def run(self, task: m.Task, timeout: float = 30.0) -> m.Result:
        return self.run_many([task], timeout)[0]

    def run_many(self, tasks: list[m.Task], timeout: float = 60.0) -> list[m.Result]:
        """Push every task at once; return their results in task order."""
        assert self._conn is not None, "accept() first"
        ids = [f"s{next(self._ids)}" for _ in tasks]
        self._conn.sendall(
            b"".join(codec.encode(m.AssignTask(i, t)) for i, t in zip(ids, tasks, strict=True))
        )
        results = self.collect(ids, timeout)
        return [results[i] for i in ids]

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (frames the codec would never make)."""
        assert self._conn is not None, "accept() first"
        self._conn.sendall(data)

    def collect(self, ids: list[str], timeout: float = 30.0) -> dict[str, m.Result]:
        """Read until a result for each of `ids` arrived (answering heartbeats meanwhile)."""
        results: dict[str, m.Result] = {}
        deadline = time.monotonic() + timeout
        while len(results) < len(ids):
            message = codec.decode(self._next_payload(deadline))
            if isinstance(message, m.TaskResult) and message.id in ids:
                results[message.id] = message.result
            self._answer(message)
        return results

    def results_until(self, last: str, timeout: float = 30.0) -> list[tuple[str, m.Result]]:
        """Every `TaskResult` the node sends, (id, result) in arrival order, up to and with the
        one for `last` (answering heartbeats meanwhile)."""
        seen: list[tuple[str, m.Result]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1][0] != last:
            message = codec.decode(self._next_payload(deadline))
            if isinstance(message, m.TaskResult):
                seen.append((message.id, message.result))
            self._answer(message)
        return seen

    def expect(self, kind: type[M], timeout: float = 30.0) -> M:
        """Read until the node sends a `kind` (answering heartbeats meanwhile); return it."""
        deadline = time.monotonic() + timeout
        while True:
            message = codec.decode(self._next_payload(deadline))
            self._answer(message)
            if isinstance(message, kind):
                return message

    def answer_in_background(self, timeout: float = 30.0) -> threading.Thread:
        """Keep answering heartbeats until the node closes the connection (for its drain)."""

        def pump() -> None:
            deadline = time.monotonic() + timeout
            try:
                while True:
                    self._answer(codec.decode(self._next_payload(deadline)))
            except (ConnectionError, TimeoutError, OSError):
                return

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread

    def _answer(self, message: m.Message) -> None:
        assert self._conn is not None
        if isinstance(message, m.Heartbeat):
            self._conn.sendall(self.ack)
        elif isinstance(message, m.GetConnectedNodes):
            peer = self._conn.getpeername()
            self._conn.sendall(codec.encode(m.ConnectedNodes((f"{peer[0]}:{peer[1]}",))))

    def _next_payload(self, deadline: float) -> bytes:
        assert self._conn is not None
        while True:
            payloads = self._decoder.feed(b"")
            if payloads:
                return payloads[0]
            pending = getattr(self, "_pending", [])
            if pending:
                return pending.pop(0)
            if time.monotonic() > deadline:
                raise TimeoutError("the node sent nothing in time")
            data = self._conn.recv(1 << 20)
            if not data:
                raise ConnectionError("the node closed the connection")
            self._pending = self._decoder.feed(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._listener.close()


def start_node(
    tmp_path: Path,
    master: ScriptedMaster,
    node_id: str,
    *,
    workers: int = 2,
    args: Sequence[str] = (),
    **config: object,
) -> NodeProcess:
    """A node joined to `master` (plain TCP, a long failover timeout, `storage_dir` under
    `tmp_path`, `config` on top, `args` on its command line), ready and its children recorded;
    stopped if it never gets there."""
    join = tmp_path / "join.json"
    master.write_join(join)
    settings = {
        "node_id": node_id,
        "failover_timeout_ms": 60_000,
        "master_addresses": [f"127.0.0.1:{master.port}"],
        "storage_dir": str(tmp_path / "storage"),
        **config,
    }
    node = NodeProcess(tmp_path, join, settings, "--workers", str(workers), *args)
    try:
        master.accept()
        node.wait_for_log("node ready")
        node.record_children()
    except BaseException:
        node.close()
        raise
    return node


def stop_node(node: NodeProcess, master: ScriptedMaster) -> int:
    """SIGTERM while the master keeps answering, so the drain can confirm the last results."""
    pump = master.answer_in_background()
    status = node.stop()
    pump.join(10)
    return status
