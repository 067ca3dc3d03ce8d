"""The local master's network side: one asyncio Protocol per connection, all on one event loop.

    socket ─data_received─▶ FrameDecoder ─payloads─▶ token check, then decode() ─▶ handler
        handler ─▶ Scheduler (submit, complete, heartbeat, ...) and Journal (one record each)
        handler ─▶ replies appended to that connection's outbox
    after each batch of input ─▶ Scheduler.dispatch() ─▶ AssignTask frames into nodes' outboxes
                              ─▶ one write per connection with anything to send (paced)
                              ─▶ Journal.flush(): this batch's records to the writer thread
    timer, every failover_timeout_ms ─▶ evict silent nodes, expire results, compact the journal

Everything runs in the loop's thread and no handler awaits, so there is nothing to lock and no
order in which two connections could wait on each other. Frames for one connection that arise
while one chunk of input is handled go out in a single write: a burst of 100,000 submissions
becomes a few hundred writes, not 100,000.

Back-pressure: a client connection (one that only submits and polls) whose replies pile up in
its write buffer past `_CLIENT_HIGH_WATER` stops being read until the buffer drains, so a client
cannot make the master buffer without bound. Node connections are never paused: a node that
blocks writing its results while the master waits for it to read its tasks would deadlock; what
the master writes to a node is bounded by the window (fifo) or the pending queue (upstream).

`start_master()` is the API for tests and benchmarks; `MasterThread` runs one on its own loop in a
thread for synchronous code. The command line is in `cli.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import hmac
import ipaddress
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import orjson

from node.config import Config, JoinInfo, format_address, write_join
from node.master.journal import (
    Journal,
    Replayed,
    check_writable,
    keep_upstream_original,
    replay,
)
from node.master.scheduler import Assignment, NodeState, Policy, Scheduler, role_of
from node.pacing import PacedWriter
from node.protocol import (
    FrameDecoder,
    FrameTooLarge,
    RemoteProtocolError,
    decode,
    encode,
    frame,
    result_to_json,
    task_to_json,
)
from node.protocol import messages as m
from node.tls import ServerTls, TlsListener

__all__ = [
    "MasterServer",
    "MasterStats",
    "MasterThread",
    "new_event_loop",
    "new_token",
    "start_master",
]

_log = logging.getLogger("cpnode.master")

_dumps = orjson.dumps

# Before authentication only a token may arrive; a longer first frame is not one (a TLS
# ClientHello read as a length asks for ~370 MB), so it is refused before it is buffered.
_TOKEN_FRAME_LIMIT: Final = 4096
# Upstream waits forever for the token; a connection that never sends one only holds a socket.
_AUTH_TIMEOUT_S: Final = 30.0
# After close() a peer that does not read could keep the transport open; abort it after this.
_CLOSE_GRACE_S: Final = 5.0
_CLIENT_HIGH_WATER: Final = 64 << 20

_OK_FRAME: Final = frame(b"OK")
_INVALID_TOKEN_FRAME: Final = frame(b"Invalid token")
_HEARTBEAT_ACK_FRAME: Final = encode(m.HEARTBEAT_ACK)
_PENDING_FRAME: Final = encode(m.DirectMessage("Pending"))


def new_token() -> str:
    """A fresh join token, in upstream's format (a random UUID, `Uuid::new_v4().to_string()`)."""
    return str(uuid.uuid4())


def _id_json(ident: str) -> bytes:
    """The JSON string of a task id, for keeping: orjson returns a bytes object whose buffer was
    sized for growth (about 4 KiB), and 100,000 pending ids would hold 400 MB; a copy is sized
    to its content."""
    return bytes(memoryview(_dumps(ident)))


def _assign_frame(id_json: bytes, task_json: bytes) -> bytes:
    # AssignTask{id, task} built from the JSON forms the scheduler already holds; a test checks
    # that it equals encode(AssignTask(...)) byte for byte.
    return frame(b'{"AssignTask":{"id":' + id_json + b',"task":' + task_json + b"}}")


def _result_frame(id_json: bytes, result_json: bytes) -> bytes:
    return frame(b'{"TaskResult":{"id":' + id_json + b',"result":' + result_json + b"}}")


@dataclass(frozen=True, slots=True)
class MasterStats:
    pending: int
    active: int
    completed: int
    nodes: int
    eligible_nodes: int
    connections: int


class _PortPool:
    """Ports for `ConnectionInfo`, lowest free first; O(log n) per allocation and release."""

    def __init__(self, low: int, high: int) -> None:
        self._next = low
        self._high = high
        self._released: list[int] = []

    def allocate(self) -> int | None:
        if self._released:
            return heapq.heappop(self._released)
        if self._next <= self._high:
            port = self._next
            self._next += 1
            return port
        return None

    def release(self, port: int) -> None:
        heapq.heappush(self._released, port)


class _Connection(asyncio.Protocol):
    """One TCP connection; all decisions are the MasterServer's."""

    __slots__ = (
        "address",
        "authenticated",
        "closing",
        "decoder",
        "master",
        "node",
        "out",
        "ports",
        "reading_paused",
        "timer",
        "transport",
        "writer",
    )

    def __init__(self, master: MasterServer) -> None:
        self.master = master
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.writer: PacedWriter = None  # type: ignore[assignment]  # set on connect
        self.address = "?"
        self.decoder = FrameDecoder(master.max_frame_bytes)
        self.authenticated = False
        self.closing = False
        self.node: NodeState | None = None
        self.out: list[bytes] = []
        self.ports: list[int] = []
        self.reading_paused = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        # Big AssignTask frames over TLS: encrypted a slice per loop turn (see node/pacing.py).
        self.writer = PacedWriter(self.transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.address = format_address(str(peer[0]), int(peer[1]))
        self.master._connected(self)

    def data_received(self, data: bytes) -> None:
        self.master._received(self, data)

    def eof_received(self) -> bool | None:
        return None  # close our side too: the peer will send nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.master._lost(self, exc)

    def pause_writing(self) -> None:
        if self.node is None and not self.closing:
            self.transport.pause_reading()
            self.reading_paused = True

    def resume_writing(self) -> None:
        if self.reading_paused and not self.closing:
            self.transport.resume_reading()
        self.reading_paused = False


class MasterServer:
    """A running local master; make one with `start_master()`."""

    def __init__(
        self,
        config: Config,
        *,
        token: str,
        policy: Policy,
        journal: Journal | None,
    ) -> None:
        self.config = config
        self.token = token
        self.policy = policy
        self.max_frame_bytes = config.max_frame_bytes
        self.host = ""
        self.port = 0
        self._token_bytes = token.encode()
        self._scheduler = Scheduler(policy=policy, window=config.window)
        self._journal = journal
        self._ports = _PortPool(config.min_port, config.max_port)
        self._failover_s = config.failover_timeout_ms / 1000
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | TlsListener | None = None
        # Insertion-ordered: ConnectedNodes lists nodes in the order they connected.
        self._connections: dict[_Connection, None] = {}
        self._by_address: dict[str, _Connection] = {}
        self._conn_of_node: dict[NodeState, _Connection] = {}
        self._dirty: list[_Connection] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self._closing = False
        self._all_gone = asyncio.Event()
        self._all_gone.set()
        self._handlers: dict[type, Callable[[_Connection, Any], None]] = {
            m.RegisterRole: self._on_register_role,
            m.Heartbeat: self._on_heartbeat,
            m.GetConnectedNodes: self._on_get_connected_nodes,
            m.SubmitTask: self._on_submit,
            m.GetTaskResult: self._on_get_task_result,
            m.TaskResult: self._on_task_result,
            m.RequestConnection: self._on_request_connection,
            m.Disconnect: self._on_disconnect,
        }

    # --- public ------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """`host:port` the master listens on (IPv6 in brackets)."""
        return format_address(self.host, self.port)

    @property
    def scheduling(self) -> str:
        return self.policy.value

    def stats(self) -> MasterStats:
        """Counts of tasks and peers; call it on the master's loop (MasterThread.stats does)."""
        s = self._scheduler.stats()
        return MasterStats(
            pending=s.pending,
            active=s.active,
            completed=s.completed,
            nodes=s.nodes,
            eligible_nodes=s.eligible_nodes,
            connections=len(self._connections),
        )

    async def close(self) -> None:
        """Stop listening, close every connection, write and fsync the journal."""
        if self._closing:
            await self._all_gone.wait()
            return
        self._closing = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            self._drop(conn, flush=True)
        try:
            await asyncio.wait_for(self._all_gone.wait(), 2.0)
        except TimeoutError:
            for conn in list(self._connections):
                conn.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_gone.wait(), 2.0)
        if self._server is not None:
            await self._server.wait_closed()
        if self._journal is not None:
            self._journal.flush()
            await self._loop.run_in_executor(None, self._journal.close)
        if self._server is not None:  # it listened: a start that failed says why instead
            _log.info("master on %s stopped", self.address)

    # --- start-up ----------------------------------------------------------------------------

    def _restore(self, replayed: Replayed) -> None:
        scheduler = self._scheduler
        for ident, task in replayed.tasks:
            scheduler.submit(ident, _id_json(ident), task_to_json(task), role_of(task))
        for ident, result_json, at in replayed.results:
            scheduler.complete(ident, result_json, at)

    async def _listen(self, host: str, port: int, tls: ServerTls | None = None) -> None:
        if tls is None:
            self._server = await self._loop.create_server(lambda: _Connection(self), host, port)
        else:  # TLS or plain TCP, whichever each peer starts with (see node/tls.py)
            self._server = await TlsListener.start(
                lambda: _Connection(self), host, port, context=tls.context, mode=tls.mode,
                what="master",
            )  # fmt: skip
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])
        self._tick_handle = self._loop.call_later(self._failover_s, self._tick)

    # --- connection events -------------------------------------------------------------------

    def _connected(self, conn: _Connection) -> None:
        if self._closing:
            conn.closing = True
            conn.transport.abort()
            return
        self._connections[conn] = None
        self._all_gone.clear()
        conn.transport.set_write_buffer_limits(high=_CLIENT_HIGH_WATER)
        conn.timer = self._loop.call_later(_AUTH_TIMEOUT_S, self._auth_expired, conn)
        _log.debug("connection from %s", conn.address)

    def _received(self, conn: _Connection, data: bytes) -> None:
        if conn.closing:
            return
        node = conn.node
        if node is not None:
            # Liveness is judged by bytes, so a node sending one huge result is not "silent".
            node.last_seen = self._loop.time()
        try:
            payloads = conn.decoder.feed(data)
        except FrameTooLarge as error:
            _log.warning("%s: %s; closing the connection", conn.address, error)
            self._drop(conn, flush=True)
            self._settle()
            return
        handlers = self._handlers
        upstream = self.policy is Policy.UPSTREAM
        for payload in payloads:
            if conn.closing:
                break
            if not conn.authenticated:
                self._authenticate(conn, payload)
                continue
            try:
                message = decode(payload)
            except RemoteProtocolError as error:
                _log.warning("%s: malformed frame, closing the connection: %s", conn.address, error)
                self._drop(conn, flush=True)
                break
            handler = handlers.get(type(message))
            if handler is None:
                _log.warning(
                    "%s: unexpected %s from a peer; ignored", conn.address, type(message).__name__
                )
            else:
                handler(conn, message)
            if upstream and conn.node is not None and not conn.closing:
                self._push(self._scheduler.after_frame(conn.node))
        if (
            not conn.authenticated
            and not conn.closing
            and conn.decoder.expecting > _TOKEN_FRAME_LIMIT
        ):
            tls = data[:2] == b"\x16\x03"
            hint = " (a TLS handshake? this listener serves plain TCP only)" if tls else ""
            _log.warning(
                "%s: first frame of %d bytes is not a token%s; closing the connection",
                conn.address,
                conn.decoder.expecting,
                hint,
            )
            self._drop(conn, flush=False)
        self._settle()

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if not conn.closing:
            conn.closing = True
            node = conn.node
            if node is not None:
                requeued = self._forget(conn)
                _log.info(
                    "node %s left (connection closed%s); %d tasks re-queued",
                    conn.address,
                    f": {exc}" if exc else "",
                    requeued,
                )
            else:
                self._forget(conn)
        self._connections.pop(conn, None)
        if not self._connections:
            self._all_gone.set()
        self._settle()

    def _auth_expired(self, conn: _Connection) -> None:
        conn.timer = None
        if not conn.authenticated and not conn.closing:
            _log.warning("%s: no token within %.0f s; closing", conn.address, _AUTH_TIMEOUT_S)
            self._drop(conn, flush=False)

    def _authenticate(self, conn: _Connection, payload: bytes) -> None:
        try:
            offered = payload.decode("utf-8").strip().encode()
        except UnicodeDecodeError:
            offered = b""
        if offered and hmac.compare_digest(offered, self._token_bytes):
            conn.authenticated = True
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            self._by_address[conn.address] = conn
            self._send(conn, _OK_FRAME)
            _log.debug("%s authenticated", conn.address)
        else:
            _log.warning("%s: invalid token; closing the connection", conn.address)
            self._send(conn, _INVALID_TOKEN_FRAME)
            self._drop(conn, flush=True)

    # --- handlers (one per message a node or client sends) -----------------------------------

    def _node(self, conn: _Connection) -> NodeState:
        """The connection's node state; a connection becomes a node with its first node-only
        message (anything but SubmitTask and GetTaskResult, which clients send)."""
        node = conn.node
        if node is None:
            node = self._scheduler.add_node(conn.address, self._loop.time())
            conn.node = node
            self._conn_of_node[node] = conn
            if conn.reading_paused:
                conn.transport.resume_reading()
                conn.reading_paused = False
        return node

    def _on_register_role(self, conn: _Connection, message: m.RegisterRole) -> None:
        node = self._node(conn)
        self._scheduler.set_role(node, message.role)
        _log.info("node %s registered as %s", conn.address, message.role.value)

    def _on_heartbeat(self, conn: _Connection, message: m.Heartbeat) -> None:
        node = self._node(conn)
        self._send(conn, _HEARTBEAT_ACK_FRAME)
        if self._scheduler.heartbeat(node):
            _log.info("node %s joined as %s: receives tasks now", conn.address, node.role.value)

    def _on_get_connected_nodes(self, conn: _Connection, message: m.GetConnectedNodes) -> None:
        self._node(conn)
        addresses = tuple(
            c.address for c in self._connections if c.node is not None and not c.closing
        )
        self._send(conn, encode(m.ConnectedNodes(addresses)))

    def _on_submit(self, conn: _Connection, message: m.SubmitTask) -> None:
        ident = message.id
        id_json = _id_json(ident)
        task_json = task_to_json(message.task)
        self._scheduler.submit(ident, id_json, task_json, role_of(message.task))
        if self._journal is not None:
            self._journal.submit(id_json, task_json)
        self._send(conn, frame(b'{"TaskAccepted":' + id_json + b"}"))

    def _on_get_task_result(self, conn: _Connection, message: m.GetTaskResult) -> None:
        result_json = self._scheduler.result(message.id)
        if result_json is None:
            self._send(conn, _PENDING_FRAME)
        else:
            self._send(conn, _result_frame(_dumps(message.id), result_json))

    def _on_task_result(self, conn: _Connection, message: m.TaskResult) -> None:
        self._node(conn)
        result_json = result_to_json(message.result)
        at = time.time()
        self._scheduler.complete(message.id, result_json, at)
        if self._journal is not None:
            self._journal.result(_dumps(message.id), result_json, at)

    def _on_request_connection(self, conn: _Connection, message: m.RequestConnection) -> None:
        self._node(conn)
        target = self._by_address.get(message.addr)
        if target is None or target.closing:
            # Upstream answers nothing either; the requester's own timeout handles it.
            _log.warning(
                "%s: RequestConnection to unknown node %r; no reply", conn.address, message.addr
            )
            return
        port = self._ports.allocate()
        if port is None:
            _log.warning(
                "%s: RequestConnection: no free port in %d..%d; no reply",
                conn.address,
                self.config.min_port,
                self.config.max_port,
            )
            return
        conn.ports.append(port)
        self._send(conn, encode(m.ConnectionInfo(target.address, port)))

    def _on_disconnect(self, conn: _Connection, message: m.Disconnect) -> None:
        node = conn.node
        count = len(node.active) if node is not None else 0
        _log.info("%s %s sent Disconnect; %d tasks re-queued", _kind(conn), conn.address, count)
        self._drop(conn, flush=True)

    # --- scheduling and output ---------------------------------------------------------------

    def _send(self, conn: _Connection, data: bytes) -> None:
        out = conn.out
        if not out:
            self._dirty.append(conn)
        out.append(data)

    def _push(self, assignments: list[Assignment]) -> None:
        conn_of = self._conn_of_node
        dirty = self._dirty
        for node, entry in assignments:
            conn = conn_of[node]
            out = conn.out
            if not out:
                dirty.append(conn)
            out.append(_assign_frame(entry.id_json, entry.task_json))

    def _settle(self) -> None:
        """Hand out what can move now, then write every outbox in one call per connection, and
        hand this batch's journal records to the journal's writer."""
        assignments = self._scheduler.dispatch()
        if assignments:
            self._push(assignments)
        if self._journal is not None:
            self._journal.flush()
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        for conn in dirty:
            out = conn.out
            if not out or conn.closing:
                out.clear()
                continue
            conn.writer.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _forget(self, conn: _Connection) -> int:
        """Remove everything the master holds for `conn`; returns how many tasks it re-queued."""
        requeued = 0
        node = conn.node
        if node is not None:
            requeued = len(self._scheduler.remove_node(node))
            self._conn_of_node.pop(node, None)
            conn.node = None
        for port in conn.ports:
            self._ports.release(port)
        conn.ports.clear()
        if self._by_address.get(conn.address) is conn:
            del self._by_address[conn.address]
        return requeued

    def _drop(self, conn: _Connection, *, flush: bool) -> None:
        """Close one connection: politely (`flush`: what is queued for it goes out first) or at
        once. Its tasks go back to the queue now, not when the peer notices."""
        if conn.closing:
            return
        conn.closing = True
        self._forget(conn)
        transport = conn.transport
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if flush:
            if conn.out:
                conn.writer.write(b"".join(conn.out))
            conn.out.clear()
            conn.writer.close()  # after what it still holds
            conn.timer = self._loop.call_later(_CLOSE_GRACE_S, transport.abort)
        else:
            conn.out.clear()
            transport.abort()

    def _tick(self) -> None:
        """Every failover_timeout_ms (as upstream): evict nodes silent for more than twice that,
        expire old results, compact the journal when it has grown."""
        now = self._loop.time()
        limit = 2 * self._failover_s
        for node in self._scheduler.silent_nodes(now - limit):
            conn = self._conn_of_node.get(node)
            silent = now - node.last_seen
            count = len(node.active)
            _log.warning(
                "node %s evicted: silent for %.1f s (more than 2 x failover_timeout_ms = %.1f s);"
                " %d tasks re-queued",
                node.key,
                silent,
                limit,
                count,
            )
            if conn is not None:
                self._drop(conn, flush=False)
            else:
                self._scheduler.remove_node(node)
        self._scheduler.expire_results(time.time() - self.config.result_ttl_s)
        journal = self._journal
        if journal is not None and journal.wants_compaction(self._scheduler.live_records()):
            _log.debug("compacting %s (%d records)", journal.path, journal.records)
            journal.compact(*self._scheduler.snapshot())
        self._settle()
        self._tick_handle = self._loop.call_later(self._failover_s, self._tick)


def _kind(conn: _Connection) -> str:
    return "node" if conn.node is not None else "client"


async def start_master(
    config: Config | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    scheduling: str = "fifo",
    join_path: str | None = None,
    advertise: str | None = None,
    state_file: str | None = None,
    tls: ServerTls | None = None,
) -> MasterServer:
    """Start a master on the running loop; returns once it listens.

    `config` supplies window, max_frame_bytes, failover_timeout_ms, min_port/max_port and
    result_ttl_s (its `master_addresses` and `state_file` are the command line's business: pass
    `host`/`port` and `state_file`). `port=0` picks a free port (see `.port`, `.address`).
    `token=None` makes a new one. `scheduling` is "fifo" or "upstream". `join_path`, when given,
    receives a join.json (mode 0600) for this master, naming `advertise` as its address (default:
    the address it listens on; a wildcard one draws a warning, since only nodes on this host can
    use it). `state_file=None` keeps everything in
    memory; a path makes tasks and results survive a restart (see journal.py). `tls=None`
    listens in plain TCP only; a `ServerTls` also serves TLS (node/tls.py).
    """
    config = config if config is not None else Config()
    try:
        policy = Policy(scheduling)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise ValueError(f"scheduling must be one of {choices}, got {scheduling!r}") from None
    loop = asyncio.get_running_loop()
    journal = None
    replayed = None
    created = False  # the state file is new: a master that fails to listen removes it
    if state_file is not None:
        await loop.run_in_executor(None, check_writable, state_file)
        created = not os.path.lexists(state_file)
        replayed = await loop.run_in_executor(
            None, functools.partial(replay, state_file, ttl_s=config.result_ttl_s)
        )
        if replayed.source == "upstream":
            backup = await loop.run_in_executor(None, keep_upstream_original, state_file)
            _log.info(
                "%s: imported the upstream master's state (original kept as %s)", state_file, backup
            )
        journal = Journal(state_file)
    master = MasterServer(config, token=token or new_token(), policy=policy, journal=journal)
    if replayed is not None:
        master._restore(replayed)
        if replayed.tasks or replayed.results:
            _log.info(
                "%s: restored %d tasks to run and %d results",
                state_file,
                len(replayed.tasks),
                len(replayed.results),
            )
    if journal is not None:
        journal.start(*master._scheduler.snapshot())
    try:
        await master._listen(host, port, tls)
        if join_path is not None:
            if advertise is None and ipaddress.ip_address(master.host).is_unspecified:
                _log.warning(
                    "join.json names %s, which only nodes on this host can connect to: give "
                    "the address other hosts reach this one by with --advertise",
                    master.host,
                )
            info = JoinInfo(master.token, advertise or master.host, master.port)
            await loop.run_in_executor(None, write_join, join_path, info)
    except BaseException:
        await master.close()
        if created and state_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(state_file)
        raise
    _log.info(
        "master listening on %s (scheduling %s, window %d)",
        master.address,
        policy.value,
        config.window,
    )
    return master


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


T = TypeVar("T")


class MasterThread:
    """A master on its own event loop in a daemon thread, for synchronous tests and tools.

        with MasterThread(config, token="secret") as master:
            connect to master.host, master.port ...
            master.stats().completed

    Keyword arguments are those of `start_master`. Leaving the block closes the master and joins
    the thread.
    """

    def __init__(self, config: Config | None = None, **options: Any) -> None:
        self._config = config
        self._options = options
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.server: MasterServer | None = None

    def __enter__(self) -> MasterThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="cpnode-master", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"the master did not start within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error

    def stop(self, timeout: float = 10.0) -> None:
        loop, stop, thread = self._loop, self._stop, self._thread
        if thread is None:
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"the master thread did not stop within {timeout} s")
        self._thread = None

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as error:  # handed to start() in the caller's thread
            self._error = error
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = await start_master(self._config, **self._options)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.server.close()

    def _master(self) -> MasterServer:
        if self.server is None:
            raise RuntimeError("the master is not running")
        return self.server

    @property
    def host(self) -> str:
        return self._master().host

    @property
    def port(self) -> int:
        return self._master().port

    @property
    def address(self) -> str:
        return self._master().address

    @property
    def token(self) -> str:
        return self._master().token

    def call(self, function: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `function` on the master's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the master is not running")

        async def run() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    def stats(self, timeout: float = 10.0) -> MasterStats:
        return self.call(self._master().stats, timeout)
