"""Masters for fault-injection tests: a ledger of every result a master reads, and a scripted
fake master that misbehaves on cue.

    ResultLedger            every TaskResult a master read, per id, master and connection;
                            flags a task that was answered twice (DESIGN contract 2)
    record_new_masters()    instruments every local master a test starts to fill a ledger
    FakeMaster              asyncio, upstream-like scheduling: after each read from an eligible
                            node it pushes every pending task; `go_silent()` simulates the
                            upstream deadlock (says OK, then nothing), `pause(s)` a master
                            that stalls for s seconds and carries on, `evict(conn)` evicts a
                            node without closing its connection (as upstream does)

How the ledger tells a second answer from a legitimate repeat: until the master confirms a
result (answers a `Heartbeat` written after it), the node may send it again (on a new
connection, or to answer the same id assigned again meanwhile). A result for the id is a
duplicate once masters have confirmed as many of its result frames as they assigned it (at
least one): a node answers a repeated id whose result awaits confirmation with that result, and
the repeat may be read (a restarted master's assignment of a task still running) after the node
wrote a Heartbeat behind the first answer; that second answer, unconfirmed when its master
stops, is rightly sent again to the next one. Whether a task ran
twice shows in the node's own count of the answers it produced (its last log line), and, where
a scenario has one connection, in one result frame per id.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from collections.abc import Iterable
from typing import Any

import pytest

from node.config import format_address
from node.master import MasterServer
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame

ConnKey = tuple[str, int]  # (master name, connection serial)


class ResultLedger:
    """Thread-safe: the local master calls it from its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.frames: collections.Counter[str] = collections.Counter()  # result frames per id
        self.results: dict[str, m.Result] = {}  # latest result per id
        self.masters_of: dict[str, set[str]] = collections.defaultdict(set)
        self.duplicates: list[str] = []  # ids answered twice (see the module docstring)
        self._unconfirmed: dict[ConnKey, list[str]] = collections.defaultdict(list)
        self._confirmed: collections.Counter[str] = collections.Counter()  # frames, per id
        self._assigned: collections.Counter[str] = collections.Counter()  # at every master

    def assigned(self, conn: ConnKey, ident: str) -> None:
        with self._lock:
            self._assigned[ident] += 1

    def result(self, conn: ConnKey, ident: str, result: m.Result) -> None:
        with self._lock:
            if self._confirmed[ident] >= max(1, self._assigned[ident]):
                self.duplicates.append(ident)
            self._unconfirmed[conn].append(ident)
            self.frames[ident] += 1
            self.results[ident] = result
            self.masters_of[ident].add(conn[0])

    def heartbeat(self, conn: ConnKey) -> None:
        """The master is about to answer a Heartbeat: it confirms what it read before."""
        with self._lock:
            self._confirmed.update(self._unconfirmed.pop(conn, ()))  # counts each frame

    def answered(self, ids: Iterable[str]) -> int:
        with self._lock:
            return sum(1 for ident in ids if ident in self.results)

    def missing(self, ids: Iterable[str]) -> list[str]:
        with self._lock:
            return [ident for ident in ids if ident not in self.results]

    def answered_at(self, master: str) -> set[str]:
        with self._lock:
            return {ident for ident, names in self.masters_of.items() if master in names}


def record_new_masters(
    monkeypatch: pytest.MonkeyPatch, ledger: ResultLedger, names: Iterable[str] = ()
) -> None:
    """Instrument every local master started from now on (in this test) to fill `ledger`,
    before it accepts its first connection. Masters are named from `names` in the order they
    start, then `master-N`."""
    named = itertools.chain(names, (f"master-{n}" for n in itertools.count()))
    listen = MasterServer._listen

    async def instrumented_listen(server: MasterServer, *args: Any, **kwargs: Any) -> None:
        _instrument(server, ledger, next(named))
        await listen(server, *args, **kwargs)

    monkeypatch.setattr(MasterServer, "_listen", instrumented_listen)


def _instrument(server: MasterServer, ledger: ResultLedger, name: str) -> None:
    """Wrap the master's `TaskResult` and `Heartbeat` handlers and its pushes of `AssignTask`
    (connections are numbered as they first show up)."""
    serials: dict[Any, int] = {}
    counter = itertools.count(1)

    def key(conn: Any) -> ConnKey:
        if conn not in serials:
            serials[conn] = next(counter)
        return (name, serials[conn])

    handlers = server._handlers
    on_result = handlers[m.TaskResult]
    on_heartbeat = handlers[m.Heartbeat]

    def result(conn: Any, message: m.TaskResult) -> None:
        ledger.result(key(conn), message.id, message.result)
        on_result(conn, message)

    def heartbeat(conn: Any, message: m.Heartbeat) -> None:
        ledger.heartbeat(key(conn))
        on_heartbeat(conn, message)

    handlers[m.TaskResult] = result
    handlers[m.Heartbeat] = heartbeat
    push = server._push
    conn_of_node = server._conn_of_node

    def push_and_record(assignments: list[Any]) -> None:
        for node, entry in assignments:
            ledger.assigned(key(conn_of_node[node]), entry.id)
        push(assignments)

    server._push = push_and_record  # type: ignore[method-assign]


class FakeConnection(asyncio.Protocol):
    def __init__(self, master: FakeMaster, serial: int) -> None:
        self.master = master
        self.serial = serial
        self.key: ConnKey = (master.name, serial)
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.address = "?"
        self.authenticated = False
        self.eligible = False  # sent its first Heartbeat
        self.evicted = False
        self.closed = False
        self.active: dict[str, bytes] = {}  # id -> task JSON, assigned and not answered
        self.heartbeats = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = format_address(peer[0], peer[1])
        self.master.connections.append(self)

    def data_received(self, data: bytes) -> None:
        master = self.master
        for payload in self.decoder.feed(data):
            if not self.authenticated:
                ok = payload.strip() == master.token.encode()
                self.write(frame(b"OK" if ok else b"Invalid token"))
                if not ok:
                    assert self.transport is not None
                    self.transport.close()
                    return
                self.authenticated = True
                continue
            if master.silent:
                continue  # deadlocked: reads, answers nothing
            master._handle(self, payload)
        if not master.silent and self.eligible and not self.evicted:
            master._push(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.master._lost(self)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class FakeMaster:
    """A scripted master on 127.0.0.1 (see the module docstring)."""

    def __init__(self, token: str, ledger: ResultLedger, name: str = "fake") -> None:
        self.token = token
        self.ledger = ledger
        self.name = name
        self.pending: dict[str, bytes] = {}  # id -> task JSON, in push order
        self.results: dict[str, m.Result] = {}
        self.connections: list[FakeConnection] = []
        self.silent = False
        self.pushing = True
        self.behind_nat = False  # ConnectedNodes lists addresses a node cannot recognise
        self.port = 0
        self._serials = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None

    async def start(self, port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FakeConnection(self, next(self._serials)), "127.0.0.1", port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    # --- scripting ---------------------------------------------------------------------------

    def submit(self, tasks: Iterable[tuple[str, m.Task]]) -> None:
        """Queue tasks; they are pushed after the next frame from an eligible node."""
        for ident, task in tasks:
            self.pending[ident] = codec.task_to_json(task)

    def assign(self, conn: FakeConnection, tasks: Iterable[tuple[str, m.Task]]) -> None:
        """Write AssignTask frames to `conn` now, in one write (repeated ids included)."""
        out = []
        for ident, task in tasks:
            task_json = codec.task_to_json(task)
            conn.active[ident] = task_json
            self.ledger.assigned(conn.key, ident)
            out.append(_assign_frame(ident, task_json))
        conn.write(b"".join(out))

    def go_silent(self) -> None:
        """The upstream deadlock: from now on every connection (old or new) gets `OK` to its
        token and then nothing at all."""
        self.silent = True

    def pause(self, seconds: float) -> None:
        """A master that stalls (a long GC pause, an overloaded host) and then carries on: no
        connection is read for `seconds` (the kernel still buffers what the node writes), then
        everything is read and answered as usual."""
        transports = [c.transport for c in self.node_connections() if c.transport is not None]
        for transport in transports:
            transport.pause_reading()

        def resume() -> None:
            for transport in transports:
                if not transport.is_closing():
                    transport.resume_reading()

        asyncio.get_running_loop().call_later(seconds, resume)

    def evict(self, conn: FakeConnection) -> None:
        """What upstream's eviction does: re-queue the node's tasks, stop sending it any,
        leave it out of `ConnectedNodes`, keep the connection (and keep answering)."""
        conn.evicted = True
        self._requeue(conn)

    def node_connections(self) -> list[FakeConnection]:
        return [c for c in self.connections if c.authenticated and not c.closed]

    # --- protocol ----------------------------------------------------------------------------

    def _handle(self, conn: FakeConnection, payload: bytes) -> None:
        message = codec.decode(payload)
        if isinstance(message, m.TaskResult):
            self.ledger.result(conn.key, message.id, message.result)
            self._complete(message.id, message.result)
        elif isinstance(message, m.Heartbeat):
            self.ledger.heartbeat(conn.key)
            conn.heartbeats += 1
            conn.eligible = True
            conn.write(codec.encode(m.HEARTBEAT_ACK))
        elif isinstance(message, m.GetConnectedNodes):
            listed = tuple(
                "10.9.8.7:4321" if self.behind_nat else c.address
                for c in self.node_connections()
                if not c.evicted
            )
            conn.write(codec.encode(m.ConnectedNodes(listed)))
        elif isinstance(message, m.Disconnect):
            conn.active.clear()  # upstream forgets a node's tasks on Disconnect
            assert conn.transport is not None
            conn.transport.close()

    def _push(self, conn: FakeConnection) -> None:
        if not self.pushing or not self.pending:
            return
        out = []
        for ident, task_json in self.pending.items():
            conn.active[ident] = task_json
            self.ledger.assigned(conn.key, ident)
            out.append(_assign_frame(ident, task_json))
        self.pending.clear()
        conn.write(b"".join(out))

    def _complete(self, ident: str, result: m.Result) -> None:
        self.results[ident] = result
        self.pending.pop(ident, None)
        for conn in self.connections:
            conn.active.pop(ident, None)

    def _requeue(self, conn: FakeConnection) -> None:
        requeued = {i: t for i, t in conn.active.items() if i not in self.results}
        conn.active.clear()
        self.pending = {**requeued, **self.pending}

    def _lost(self, conn: FakeConnection) -> None:
        if not self.silent:
            self._requeue(conn)  # like our local master: a closed node's tasks are re-queued
        # Still pushed after the next frame from another eligible node.


def _assign_frame(ident: str, task_json: bytes) -> bytes:
    return frame(b'{"AssignTask":{"id":' + codec.json_str(ident) + b',"task":' + task_json + b"}}")
