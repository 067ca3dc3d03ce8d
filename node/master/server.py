"""The local master's network side: one asyncio Protocol per connection, all on one event loop.

    socket ─data_received─▶ FrameDecoder ─payloads─▶ token check, then decode() ─▶ handler
        handler ─▶ Scheduler (submit, complete, heartbeat, ...) and Journal (one record each)
        handler ─▶ replies appended to that connection's outbox
    after each batch of input ─▶ Scheduler.dispatch() ─▶ AssignTask frames into nodes' outboxes
                              ─▶ Journal.flush(): this batch's records to the writer thread
                              ─▶ one write per connection with anything to send (paced;
                                 a big task's or result's JSON written apart, not copied),
                                 but for replies that acknowledge records (TaskAccepted, a
                                 HeartbeatAck after results): held, with the replies behind
                                 them, until the writer reports it wrote those records
    journal's writer, after each write ─▶ the held replies it made durable, written
    timer, every failover_timeout_ms ─▶ evict silent nodes, expire results, compact the journal

Handlers run in the loop's thread and none awaits (a big frame is decoded in a thread before
its handler runs, see below), so there is nothing to lock and no order in which two
connections could wait on each other. Frames for one connection that arise
while one chunk of input is handled go out in a single write: a burst of 100,000 submissions
becomes a few hundred writes, not 100,000.

Frames are handled in order per connection, from its inbox. Three things hold a connection's
inbox (the others go on):
- A frame of `_THREAD_DECODE_BYTES` or more (a big blob submitted, a big result) is decoded
  in a thread, its byte array checked by the vectorised codec and kept as it came (see
  `_decode_prepared`): on the loop, a 180 MB `SubmitTask` held every other connection for
  6 s, and the nodes whose heartbeats waited unread were evicted.
- Back-pressure: while more than `_OUTPUT_LIMIT` bytes wait to be written to a connection, its
  next frame waits, so a peer that asks and never reads cannot make the master buffer
  gigabytes (40 KB of `GetTaskResult`s for one big result once made 1.4 GB). A waiting client
  is not read either. A node is read on: its bytes are its liveness, and a node that blocks
  writing its results while the master waits for it to read its tasks would deadlock. Its
  inbox holds what it sent, up to twice `max_frame_bytes` (then it is dropped).
- While a big frame is decoded, its connection is not read (a node included: the decoding
  needs nothing from it, and a node is not evicted meanwhile).

Connections that have not sent their token yet are bounded as a direct port's
(`node/admission.py`): a slot is taken when a connection is made (by the TLS listener
when there is one), given back once its token is accepted or it closes.

`start_master()` is the API for tests and benchmarks; `MasterThread` runs one on its own loop in a
thread for synchronous code. The command line is in `cli.py`.
"""

from __future__ import annotations

import asyncio
import collections
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

from node.admission import Admission, Slot
from node.config import Config, JoinInfo, format_address, write_join
from node.master.journal import (
    Journal,
    Replayed,
    StateFileLock,
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
    codec,
    decode,
    encode,
    frame,
    result_to_json,
    task_to_json,
)
from node.protocol import messages as m
from node.throttle import Throttle, more_since
from node.tls import ServerTls, TlsListener
from shm.bytesjson import ByteArrayError, decode_byte_array

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
# Upstream waits forever for the token. Nodes and clients send it as soon as they are connected
# (over TLS, once the handshake is done), so 10 s is generous over any network; a connection
# that never sends one holds an `Admission` slot (and a descriptor) until then.
_AUTH_TIMEOUT_S: Final = 10.0
# Connections not authenticated yet (node/admission.py). A master serves the whole cluster,
# and every node dials it at once when it restarts: each sends its token at once, but while the
# master's loop is busy (a journal compaction, a big frame) hundreds may wait to be read. 256 is
# room for that and a fraction of the descriptors of a process (whose authenticated connections
# are not bounded); when all are held, the oldest of the address holding the most gives way to
# a newcomer.
_MAX_UNAUTHENTICATED: Final = 256
# After close() a peer that does not read could keep the transport open; abort it after this.
_CLOSE_GRACE_S: Final = 5.0
_OUTPUT_LIMIT: Final = 64 << 20
"""Bytes waiting to be written to a connection above which its next frame waits."""
_OUTPUT_RECHECK_S: Final = 0.02
"""How often a connection held by `_OUTPUT_LIMIT` looks again (the transport's own signal,
`resume_writing`, comes only when its buffer was past its high-water mark)."""
_EVICT_CONFIRM_S: Final = 0.05
"""A node found silent at a tick is evicted if still silent this much later (see `_tick`)."""
_JOURNAL_RETRY_MAX_S: Final = 60.0
"""Longest wait between two attempts to write the state file again after it failed."""
_BIG_PIECE_BYTES: Final = 1 << 20
"""A task's or result's JSON this long is written as it is held, not joined into a frame."""
_FRAME_COST: Final = 64
"""Bytes a waiting frame costs besides its payload (the bytes object and its inbox slot)."""
_JSON_WHITESPACE: Final = b" \t\n\r"
_THREAD_DECODE_BYTES: Final = 1 << 20
"""Frames this long or longer are decoded in a thread (see the module docstring)."""

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


def _assign_frame(id_json: bytes, task_json: bytes) -> list[bytes]:
    # AssignTask{id, task} built from the JSON forms the scheduler already holds; a test checks
    # that it equals encode(AssignTask(...)) byte for byte.
    return _framed(b'{"AssignTask":{"id":' + id_json + b',"task":', task_json, b"}}")


def _result_frame(id_json: bytes, result_json: bytes) -> list[bytes]:
    return _framed(b'{"TaskResult":{"id":' + id_json + b',"result":', result_json, b"}}")


def _framed(head: bytes, body: bytes, tail: bytes) -> list[bytes]:
    """The frame of ``head + body + tail`` as pieces to write in order: joined when small,
    the body apart when big (a big blob's JSON is never copied on the loop: 40 ms for 180 MB)."""
    size = len(head) + len(body) + len(tail)
    if len(body) < _BIG_PIECE_BYTES:
        return [frame(head + body + tail)]
    return [size.to_bytes(4, "big") + head, body, tail]


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
        "busy",
        "closing",
        "decoder",
        "doomed",
        "first_gated",
        "gate",
        "held",
        "held_bytes",
        "inbox",
        "inbox_bytes",
        "master",
        "node",
        "out",
        "out_bytes",
        "ports",
        "reading_paused",
        "recheck",
        "result_ticket",
        "slot",
        "tasks_out",
        "timer",
        "transport",
        "writer",
    )

    def __init__(self, master: MasterServer, slot: Slot | None = None) -> None:
        self.master = master
        # Its place among the connections not authenticated yet: the TLS listener's, else
        # taken when it is made (see `MasterServer._connected`).
        self.slot = slot
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.writer: PacedWriter = None  # type: ignore[assignment]  # set on connect
        self.address = "?"
        self.decoder = FrameDecoder(master.max_frame_bytes)
        self.authenticated = False
        self.closing = False
        self.node: NodeState | None = None
        self.out: list[bytes] = []
        self.out_bytes = 0  # in `out`
        # Durable replies (see `MasterServer._settle`): the journal ticket that `out` waits for
        # (0: none) from its piece `first_gated` on (-1: none), AssignTask frames that do not
        # wait behind them, and output held back until the journal's writer reports its
        # ticket, in order, as (ticket, pieces).
        self.gate = 0
        self.first_gated = -1
        self.tasks_out: list[bytes] = []
        self.held: collections.deque[tuple[int, list[bytes]]] = collections.deque()
        self.held_bytes = 0  # in `held`
        self.result_ticket = 0  # the journal ticket of the latest result this peer sent
        self.inbox: collections.deque[bytes] = collections.deque()  # frames not handled yet
        self.inbox_bytes = 0
        self.busy = False  # a frame of the inbox is being decoded in a thread
        self.doomed: str | None = None  # why the connection closes once its inbox is handled
        self.recheck: asyncio.TimerHandle | None = None  # see _OUTPUT_RECHECK_S
        # RequestConnection target -> its latest port: a node that asks again and again holds
        # one port per target, not the whole range.
        self.ports: dict[str, int] = {}
        self.reading_paused = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        # Big AssignTask frames over TLS: encrypted a slice per loop turn (see node/pacing.py).
        self.writer = PacedWriter(self.transport)
        peer = transport.get_extra_info("peername")
        host = "?"
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            self.address = format_address(host, int(peer[1]))
        self.master._connected(self, host)

    def data_received(self, data: bytes) -> None:
        self.master._received(self, data)

    def eof_received(self) -> bool | None:
        return None  # close our side too: the peer will send nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        self.master._lost(self, exc)

    def resume_writing(self) -> None:
        # (No pause_writing: the master measures what waits to be written, frame by frame.)
        self.master._output_drained(self)


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
        self._written = 0  # the journal's tickets written so far (see `_settle`)
        self._refused_tokens = Throttle(10.0)  # a line per refused token would fill the disk
        self._no_tokens = Throttle(10.0)  # as many connections that send none
        self._admission = Admission(_MAX_UNAUTHENTICATED, "master")
        self._holding: dict[_Connection, None] = {}  # connections with output in `held`
        self._tick_handle: asyncio.TimerHandle | None = None
        self._journal_retry_s = self._failover_s  # doubles while the state file fails
        self._journal_retry_at = 0.0
        self._state_lock: StateFileLock | None = None
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
        if self._state_lock is not None:
            self._state_lock.release()
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
        if tls is None:  # each connection takes its admission slot when it is made
            self._server = await self._loop.create_server(lambda: _Connection(self), host, port)
        else:  # TLS or plain TCP, whichever each peer starts with (see node/tls.py)
            self._server = await TlsListener.start(
                lambda slot: _Connection(self, slot), host, port, context=tls.context,
                mode=tls.mode, what="master", admission=self._admission,
            )  # fmt: skip
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])
        self._tick_handle = self._loop.call_later(self._failover_s, self._tick)

    # --- connection events -------------------------------------------------------------------

    def _connected(self, conn: _Connection, host: str) -> None:
        if conn.slot is None:  # the plain listener's: a slot now, the same as the TLS one's
            conn.slot = self._admission.admit(host)  # may close another connection first
        # A slot taken back already: evicted while its TLS handshake ended in the same turn of
        # the loop (the listener's cancel comes next); closed before its token is read.
        if self._closing or not conn.slot.held:
            self._release_slot(conn)
            conn.closing = True
            conn.transport.abort()
            return
        conn.slot.evict = functools.partial(self._drop, conn, flush=False)
        self._connections[conn] = None
        self._all_gone.clear()
        conn.transport.set_write_buffer_limits(high=_OUTPUT_LIMIT)
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
            # The whole frames before it still count (a node's results), then it closes.
            payloads = error.payloads
            conn.doomed = str(error)
            self._pause_reading(conn)
        if payloads:
            conn.inbox.extend(payloads)
            conn.inbox_bytes += sum(map(len, payloads)) + _FRAME_COST * len(payloads)
        if payloads or conn.doomed is not None:
            self._handle_inbox(conn)
        if (
            conn.inbox_bytes > 2 * self.max_frame_bytes
            and not conn.closing
            and self._unsent(conn) > _OUTPUT_LIMIT
        ):
            # A node is read on while its frames wait for its output to drain (see the module
            # docstring): one that sends on and reads nothing is dropped, not buffered without
            # bound.
            _log.warning(
                "%s: %d bytes of frames wait while it reads nothing of what the master sends "
                "(more than 2 x max_frame_bytes); closing the connection",
                conn.address,
                conn.inbox_bytes,
            )
            self._drop(conn, flush=False)
        if (
            not conn.authenticated
            and not conn.closing
            and conn.decoder.expecting > _TOKEN_FRAME_LIMIT
        ):
            tls = data[:2] == b"\x16\x03"
            hint = " (a TLS handshake? this listener serves plain TCP only)" if tls else ""
            if count := self._no_tokens.hit():
                _log.warning(
                    "%s: first frame of %d bytes is not a token%s; closing the connection%s",
                    conn.address,
                    conn.decoder.expecting,
                    hint,
                    more_since(count),
                )
            self._drop(conn, flush=False)
        self._settle()

    def _handle_inbox(self, conn: _Connection) -> None:
        """Handle the connection's frames in order, until one waits (see the module docstring)."""
        inbox = conn.inbox
        while inbox and not conn.busy and not conn.closing:
            if conn.authenticated and self._unsent(conn) > _OUTPUT_LIMIT:
                self._wait_for_output(conn)
                return
            payload = inbox.popleft()
            conn.inbox_bytes -= len(payload) + _FRAME_COST
            if not conn.authenticated:
                self._authenticate(conn, payload)
                continue
            if len(payload) >= _THREAD_DECODE_BYTES:
                self._decode_in_thread(conn, payload)
                return
            try:
                message = decode(payload)
            except RemoteProtocolError as error:
                self._malformed(conn, error)
                return
            self._handle(conn, message, None)
        if conn.closing or conn.busy:
            return
        if conn.doomed is not None:
            _log.warning("%s: %s; closing the connection", conn.address, conn.doomed)
            self._drop(conn, flush=True)
        elif conn.reading_paused:
            conn.reading_paused = False
            conn.transport.resume_reading()

    def _handle(self, conn: _Connection, message: m.Message, prepared: bytes | None) -> None:
        """Run the message's handler; `prepared` is the JSON of a big frame's task or result,
        made in the thread that decoded it. Under upstream scheduling, a node's frame is
        followed by every task of its role."""
        if prepared is not None and isinstance(message, m.SubmitTask):
            self._on_submit(conn, message, prepared)
        elif prepared is not None and isinstance(message, m.TaskResult):
            self._on_task_result(conn, message, prepared)
        elif (handler := self._handlers.get(type(message))) is not None:
            handler(conn, message)
        else:
            _log.warning(
                "%s: unexpected %s from a peer; ignored", conn.address, type(message).__name__
            )
        if self.policy is Policy.UPSTREAM and conn.node is not None and not conn.closing:
            self._push(self._scheduler.after_frame(conn.node))

    def _malformed(self, conn: _Connection, error: RemoteProtocolError) -> None:
        _log.warning("%s: malformed frame, closing the connection: %s", conn.address, error)
        self._drop(conn, flush=True)

    def _decode_in_thread(self, conn: _Connection, payload: bytes) -> None:
        # Not read meanwhile, a node too: its frames would pile up faster than a thread
        # decodes big ones. Its silence is the master's doing (see `_evict`).
        conn.busy = True
        self._pause_reading(conn)
        future = self._loop.run_in_executor(None, _decode_prepared, payload)
        future.add_done_callback(functools.partial(self._decoded, conn))

    def _decoded(
        self,
        conn: _Connection,
        future: asyncio.Future[tuple[m.Message, bytes | None]],
    ) -> None:
        conn.busy = False
        if conn.closing:
            return
        if conn.node is not None:
            conn.node.last_seen = self._loop.time()
        try:
            message, prepared = future.result()
        except RemoteProtocolError as error:
            self._malformed(conn, error)
        except Exception:  # a bug: the connection goes, the master and its other peers stay
            _log.exception("%s: decoding a big frame failed; closing the connection", conn.address)
            self._drop(conn, flush=False)
        else:
            self._handle(conn, message, prepared)
            self._handle_inbox(conn)
        self._settle()

    def _unsent(self, conn: _Connection) -> int:
        """Bytes that wait to be written to the connection: queued here (held for the journal
        too), in its paced writer and in its transport."""
        return (
            conn.out_bytes
            + conn.held_bytes
            + conn.writer.backlog_bytes
            + conn.transport.get_write_buffer_size()
        )

    def _wait_for_output(self, conn: _Connection) -> None:
        if conn.node is None:
            self._pause_reading(conn)
        if conn.recheck is None:
            conn.recheck = self._loop.call_later(_OUTPUT_RECHECK_S, self._output_drained, conn)

    def _output_drained(self, conn: _Connection) -> None:
        if conn.recheck is not None:
            conn.recheck.cancel()
            conn.recheck = None
        if conn.closing or not conn.inbox or conn.busy:
            return
        self._handle_inbox(conn)
        self._settle()

    def _pause_reading(self, conn: _Connection) -> None:
        if not conn.reading_paused and not conn.closing:
            conn.reading_paused = True
            conn.transport.pause_reading()

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        self._release_slot(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        self._unhold(conn)
        if conn.recheck is not None:
            conn.recheck.cancel()
            conn.recheck = None
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
            if count := self._no_tokens.hit():
                _log.warning(
                    "%s: no token within %.0f s; closing%s", conn.address, _AUTH_TIMEOUT_S,
                    more_since(count),
                )  # fmt: skip
            self._drop(conn, flush=False)

    def _authenticate(self, conn: _Connection, payload: bytes) -> None:
        try:
            offered = payload.decode("utf-8").strip().encode()
        except UnicodeDecodeError:
            offered = b""
        if offered and hmac.compare_digest(offered, self._token_bytes):
            conn.authenticated = True
            self._release_slot(conn)
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            self._by_address[conn.address] = conn
            self._send(conn, _OK_FRAME)
            _log.debug("%s authenticated", conn.address)
        else:
            if count := self._refused_tokens.hit():  # anyone may repeat it at will
                _log.warning(
                    "%s: invalid token; closing the connection%s", conn.address,
                    more_since(count),
                )  # fmt: skip
            self._send(conn, _INVALID_TOKEN_FRAME)
            self._drop(conn, flush=True)

    @staticmethod
    def _release_slot(conn: _Connection) -> None:
        if conn.slot is not None:
            conn.slot.release()
            conn.slot = None

    # --- handlers (one per message a node or client sends) -----------------------------------

    def _node(self, conn: _Connection) -> NodeState:
        """The connection's node state; a connection becomes a node with its first node-only
        message (anything but SubmitTask and GetTaskResult, which clients send)."""
        node = conn.node
        if node is None:
            node = self._scheduler.add_node(conn.address, self._loop.time())
            conn.node = node
            self._conn_of_node[node] = conn
        return node

    def _on_register_role(self, conn: _Connection, message: m.RegisterRole) -> None:
        node = self._node(conn)
        self._scheduler.set_role(node, message.role)
        _log.info("node %s registered as %s", conn.address, message.role.value)

    def _on_heartbeat(self, conn: _Connection, message: m.Heartbeat) -> None:
        node = self._node(conn)
        # The ack tells the node that the master has its results: they must be journaled.
        conn.gate = max(conn.gate, conn.result_ticket)
        self._send(conn, _HEARTBEAT_ACK_FRAME)
        if self._scheduler.heartbeat(node):
            _log.info("node %s joined as %s: receives tasks now", conn.address, node.role.value)

    def _on_get_connected_nodes(self, conn: _Connection, message: m.GetConnectedNodes) -> None:
        self._node(conn)
        addresses = tuple(
            c.address for c in self._connections if c.node is not None and not c.closing
        )
        self._send(conn, encode(m.ConnectedNodes(addresses)))

    def _on_submit(
        self, conn: _Connection, message: m.SubmitTask, task_json: bytes | None = None
    ) -> None:
        ident = message.id
        id_json = _id_json(ident)
        if task_json is None:
            task_json = task_to_json(message.task)
        self._scheduler.submit(ident, id_json, task_json, role_of(message.task))
        if self._journal is not None:
            self._journal.submit(id_json, task_json)
            conn.gate = self._journal.ticket  # TaskAccepted waits for the record
        self._send(conn, frame(b'{"TaskAccepted":' + id_json + b"}"))

    def _on_get_task_result(self, conn: _Connection, message: m.GetTaskResult) -> None:
        result_json = self._scheduler.result(message.id)
        if result_json is None:
            self._send(conn, _PENDING_FRAME)
        else:
            self._send(conn, *_result_frame(_dumps(message.id), result_json))

    def _on_task_result(
        self, conn: _Connection, message: m.TaskResult, result_json: bytes | None = None
    ) -> None:
        self._node(conn)
        if result_json is None:
            result_json = result_to_json(message.result)
        at = time.time()
        self._scheduler.complete(message.id, result_json, at)
        if self._journal is not None:
            self._journal.result(_dumps(message.id), result_json, at)
            conn.result_ticket = self._journal.ticket

    def _on_request_connection(self, conn: _Connection, message: m.RequestConnection) -> None:
        self._node(conn)
        target = self._by_address.get(message.addr)
        if target is None or target.closing:
            # Upstream answers nothing either; the requester's own timeout handles it.
            _log.warning(
                "%s: RequestConnection to unknown node %r; no reply", conn.address, message.addr
            )
            return
        # Asked again for the same target: a new port, and the earlier one is done with (or
        # the earlier one again when the range has no other).
        earlier = conn.ports.get(target.address)
        port = self._ports.allocate()
        if port is None:
            port = earlier
        elif earlier is not None:
            self._ports.release(earlier)
        if port is None:
            _log.warning(
                "%s: RequestConnection: no free port in %d..%d; no reply",
                conn.address,
                self.config.min_port,
                self.config.max_port,
            )
            return
        conn.ports[target.address] = port
        self._send(conn, encode(m.ConnectionInfo(target.address, port)))

    def _on_disconnect(self, conn: _Connection, message: m.Disconnect) -> None:
        node = conn.node
        count = len(node.active) if node is not None else 0
        _log.info("%s %s sent Disconnect; %d tasks re-queued", _kind(conn), conn.address, count)
        self._drop(conn, flush=True)

    # --- scheduling and output ---------------------------------------------------------------

    def _send(self, conn: _Connection, *pieces: bytes) -> None:
        """Queue bytes (a frame, or a frame's pieces in order) for `conn`'s next write."""
        out = conn.out
        if not out and not conn.tasks_out:
            self._dirty.append(conn)
        if conn.first_gated < 0 and conn.gate > self._written:
            conn.first_gated = len(out)
        for piece in pieces:
            out.append(piece)
            conn.out_bytes += len(piece)

    def _push(self, assignments: list[Assignment]) -> None:
        conn_of = self._conn_of_node
        for node, entry in assignments:
            conn = conn_of[node]
            pieces = _assign_frame(entry.id_json, entry.task_json)
            if conn.held or conn.first_gated >= 0:
                # Its replies wait for the journal; its tasks need not (no request of the
                # node's is answered by them), and they keep their order among themselves.
                if not conn.out and not conn.tasks_out:
                    self._dirty.append(conn)
                conn.tasks_out += pieces
                conn.out_bytes += sum(map(len, pieces))
            else:
                self._send(conn, *pieces)

    def _settle(self) -> None:
        """Hand out what can move now, hand this batch's journal records to the journal's
        writer, and write every outbox (one call per connection, plus one per big piece: see
        `_write_out`).

        An outbox holding a durable reply (a `TaskAccepted`, or a `HeartbeatAck` after
        results) waits, with whatever follows it on that connection, until the writer reports
        the ticket of the records it acknowledges (`_journal_written`): written to the
        operating system, so that a crash of this process cannot lose them."""
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
            if not conn.closing:
                self._write_or_hold(conn)
            self._cleared(conn)

    def _write_or_hold(self, conn: _Connection) -> None:
        """Write `conn`'s output, but for the replies that wait for the journal: from its
        first durable reply on, or all of them while earlier ones wait (replies leave in
        order). Its AssignTask frames go now."""
        out = conn.out
        if conn.held:
            now, later = conn.tasks_out, out
        elif conn.first_gated >= 0:
            now, later = out[: conn.first_gated] + conn.tasks_out, out[conn.first_gated :]
        else:
            now, later = out + conn.tasks_out if conn.tasks_out else out, []
        if now:
            _write_out(conn, now)
        if later:
            held = conn.held
            # The ticket of its own durable reply, or of the output held before it if later.
            ticket = max(conn.gate, held[-1][0]) if held else conn.gate
            if held and held[-1][0] == ticket:
                held[-1][1].extend(later)
            else:
                held.append((ticket, later if later is not out else list(out)))
            conn.held_bytes += sum(map(len, later))
            self._holding[conn] = None

    @staticmethod
    def _cleared(conn: _Connection) -> None:
        conn.out.clear()
        conn.tasks_out.clear()
        conn.out_bytes = 0
        conn.gate = 0
        conn.first_gated = -1

    def _unhold(self, conn: _Connection) -> None:
        conn.held.clear()
        conn.held_bytes = 0
        self._holding.pop(conn, None)

    def _on_journal_written(self, ticket: int) -> None:
        """Called in the journal's writer thread after each write: one wake-up of the loop
        releases every reply that write made durable."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._journal_written, ticket)

    def _journal_written(self, ticket: int) -> None:
        """Write what was held for the journal's hand-overs up to `ticket`. A ticket is also
        reported when its records could not be written (the journal has failed, see
        `Journal.failed`): the replies then go out without durability, as the master keeps
        serving while its state file fails, and the error is in the log."""
        if ticket <= self._written:
            return
        self._written = ticket
        for conn in list(self._holding):
            held = conn.held
            pieces: list[bytes] = []
            while held and held[0][0] <= ticket:
                pieces += held.popleft()[1]
            if pieces:
                conn.held_bytes -= sum(map(len, pieces))
                _write_out(conn, pieces)
            if not held:
                del self._holding[conn]
                if conn.closing:  # a polite close waited for this output (see `_drop`)
                    conn.writer.close()

    def _forget(self, conn: _Connection) -> int:
        """Remove everything the master holds for `conn`; returns how many tasks it re-queued."""
        requeued = 0
        node = conn.node
        if node is not None:
            requeued = len(self._scheduler.remove_node(node))
            self._conn_of_node.pop(node, None)
            conn.node = None
        for port in conn.ports.values():
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
        self._release_slot(conn)
        self._forget(conn)
        transport = conn.transport
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn.inbox.clear()
        conn.inbox_bytes = 0
        if flush:
            self._write_or_hold(conn)
            self._cleared(conn)
            if not conn.held:  # else once the journal lets it go (see `_journal_written`)
                conn.writer.close()  # after what it still holds
            conn.timer = self._loop.call_later(_CLOSE_GRACE_S, transport.abort)
        else:
            self._cleared(conn)
            self._unhold(conn)
            transport.abort()

    def _tick(self) -> None:
        """Every failover_timeout_ms (as upstream): evict nodes silent for more than twice that,
        expire old results, compact the journal when it has grown."""
        now = self._loop.time()
        if self._scheduler.silent_nodes(now - 2 * self._failover_s):
            # Judged again after the loop has read its sockets: a tick that follows a long
            # handler runs before the bytes that arrived meanwhile are read, and those nodes
            # only look silent.
            self._loop.call_later(_EVICT_CONFIRM_S, self._evict)
        self._scheduler.expire_results(time.time() - self.config.result_ttl_s)
        journal = self._journal
        if journal is not None and journal.failed:
            # A whole snapshot may fit again; not once the writer is gone (nothing would write it).
            if now >= self._journal_retry_at and not journal.writer_gone:
                self._journal_retry_s = min(2 * self._journal_retry_s, _JOURNAL_RETRY_MAX_S)
                self._journal_retry_at = now + self._journal_retry_s
                journal.compact(*self._scheduler.snapshot())
        elif journal is not None:
            self._journal_retry_s = self._failover_s
            if journal.wants_compaction(self._scheduler.live_records()):
                _log.debug("compacting %s (%d records)", journal.path, journal.records)
                journal.compact(*self._scheduler.snapshot())
        self._settle()
        self._tick_handle = self._loop.call_later(self._failover_s, self._tick)

    def _evict(self) -> None:
        """Evict the nodes silent for more than twice failover_timeout_ms."""
        if self._closing:
            return
        now = self._loop.time()
        limit = 2 * self._failover_s
        for node in self._scheduler.silent_nodes(now - limit):
            conn = self._conn_of_node.get(node)
            if conn is not None and conn.busy:
                continue  # not read while a big frame of its is decoded: not its silence
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
        self._settle()


def _has_whitespace(payload: bytes, start: int, end: int) -> bool:
    """JSON whitespace in ``payload[start:end]``? Looked for a MiB at a time: one `find` over
    180 MB holds the GIL (and so the loop) for about 20 ms."""
    for position in range(start, end, _BIG_PIECE_BYTES):
        stop = min(end, position + _BIG_PIECE_BYTES)
        if any(payload.find(char, position, stop) >= 0 for char in _JSON_WHITESPACE):
            return True
    return False


def _write_out(conn: _Connection, out: list[bytes]) -> None:
    """Write `out` (pieces queued for `conn`): the small pieces joined into one write, a big
    one (a blob's JSON) as it is held."""
    write = conn.writer.write
    if len(out) == 1:
        write(out[0])
        return
    small: list[bytes] = []
    for piece in out:
        if len(piece) < _BIG_PIECE_BYTES:
            small.append(piece)
            continue
        if small:
            write(b"".join(small))
            small = []
        write(piece)
    if small:
        write(b"".join(small))


def _decode_prepared(payload: bytes) -> tuple[m.Message, bytes | None]:
    """A big frame's message and the JSON the master keeps of it (a submitted task's, a
    result's), made in a thread.

    A blob's byte array (nearly all of such a frame) is checked by the vectorised codec, which
    mostly runs without the GIL, and kept as it came: parsing it into a list of ints and
    encoding it again held the GIL, so the loop, for seconds (orjson parsed 48 MiB in 3 s).
    The message itself carries an empty blob: the master only routes it.
    """
    around = codec.around_blob(payload)
    if around is None:
        message = decode(payload)
        if isinstance(message, m.SubmitTask):
            return message, task_to_json(message.task)
        if isinstance(message, m.TaskResult):
            return message, result_to_json(message.result)
        return message, None
    value, start, end = around
    ((variant, body),) = value.items()  # the shape around_blob checked
    inner = body["result" if variant == "TaskResult" else "task"]
    ((kind, fields),) = inner.items()
    if variant == "TaskResult":
        inner[kind] = []
    else:
        fields["data"] = []
    message = codec.message_from_json(value)
    array: bytes | memoryview = memoryview(payload)[start:end]
    try:
        decode_byte_array(array)
    except ByteArrayError as error:
        raise RemoteProtocolError(f"message: {error}") from None
    if _has_whitespace(payload, start, end):
        # The journal holds a record per line: no newline may stay (nor any other space,
        # which the check above proved splits no number).
        array = payload[start:end].translate(None, _JSON_WHITESPACE)
    if isinstance(message, m.SubmitTask):
        empty = task_to_json(message.task)
        marker = b'"data":[]'  # once only: a quote inside a string is escaped
    elif isinstance(message, m.TaskResult):
        empty = result_to_json(message.result)
        marker = b'{"Bytes":[]'
    else:  # an AssignTask sent to the master: ignored by its handler
        return message, None
    before, after = empty.rsplit(marker, 1)
    return message, b"".join((before, marker[:-2], array, after))


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
    use it). `state_file=None` keeps everything in memory; a path makes tasks and results survive
    a restart (see journal.py), and no other master may use it meanwhile. `tls=None`
    listens in plain TCP only; a `ServerTls` also serves TLS (node/tls.py).
    """
    config = config if config is not None else Config()
    try:
        policy = Policy(scheduling)
    except ValueError:
        choices = ", ".join(p.value for p in Policy)
        raise ValueError(f"scheduling must be one of {choices}, got {scheduling!r}") from None
    loop = asyncio.get_running_loop()
    lock = None
    if state_file is not None:
        await loop.run_in_executor(None, check_writable, state_file)
        lock = StateFileLock(state_file)
        await loop.run_in_executor(None, lock.acquire)
    try:
        master = await _start(
            config, host, port, token, policy, join_path, advertise, state_file, tls, lock
        )
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return master


async def _start(
    config: Config,
    host: str,
    port: int,
    token: str | None,
    policy: Policy,
    join_path: str | None,
    advertise: str | None,
    state_file: str | None,
    tls: ServerTls | None,
    lock: StateFileLock | None,
) -> MasterServer:
    loop = asyncio.get_running_loop()
    journal = None
    replayed = None
    created = False  # the state file is new: a master that fails to listen removes it
    if state_file is not None:
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
    master._state_lock = lock  # released by close()
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
        journal.start(*master._scheduler.snapshot(), on_written=master._on_journal_written)
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
        master._state_lock = None  # released by the caller, after the state file goes
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
