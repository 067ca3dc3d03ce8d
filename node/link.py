"""The master link: connect, authenticate, register, heartbeat, deliver results, reconnect.

    endpoints (join.json's address, then master_addresses) ──connect──▶ token ──▶ "OK"
        ──▶ RegisterRole, GetConnectedNodes, Heartbeat ──▶ REGISTERED
    bytes ──FrameDecoder──▶ payloads: AssignTask ──peek id──▶ on_assign(id, payload)
                                      HeartbeatAck ──▶ confirm the outbox
                                      anything else ──decode──▶ log / skip
    results (wire-ready frames) ──▶ outbox ──write──▶ master

`LinkState` is the one place the link's phase lives. A result stays in the outbox until the
master has answered a `Heartbeat` written after it (the master reads one connection's frames in
order, so that ack proves it read the result); after a reconnect every unconfirmed result is
written again. The upstream master only pushes tasks while handling a frame from the node, so
an idle node with free capacity polls with a `Heartbeat` every `poll_interval_ms`. A master that
leaves heartbeats unanswered, sends no byte at all and takes none of ours off the wire for
`failover_timeout_ms` is treated as stuck: the link closes and fails over.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import logging
import random
import sys
import termios
import time
from collections.abc import Callable

from node.config import Config, JoinInfo, format_address
from node.errors import CpnodeError
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import FrameTooLarge, RemoteProtocolError
from node.protocol.framing import FrameDecoder, frame

log = logging.getLogger("cpnode.link")

_HEARTBEAT_FRAME = codec.encode(m.HEARTBEAT)
_ACK_PAYLOAD = b'"HeartbeatAck"'
_ASSIGN_PREFIX = b'{"AssignTask":'
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    REGISTERED = "registered"
    CLOSED = "closed"


class AuthenticationError(CpnodeError):
    """The master answered `Invalid token`: fatal for that address."""


class NoMasterError(CpnodeError):
    """Every master address refused our token."""


class _Connection(asyncio.Protocol):
    def __init__(self, link: MasterLink) -> None:
        self.link = link
        self.decoder = FrameDecoder(link.config.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.authenticated: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_bytes_at = time.monotonic()
        try:
            payloads = self.decoder.feed(data)
        except FrameTooLarge as exc:
            log.error("master sent an oversized frame: %s; closing the connection", exc)
            assert self.transport is not None
            self.transport.close()
            return
        if not self.authenticated.done():
            if not payloads:
                return
            first = payloads.pop(0)
            self.authenticated.set_result(first == b"OK")
            if first != b"OK":
                log.debug("master answered %r to the token", first[:100])
                return
        on_payload = link.on_payload
        for payload in payloads:
            on_payload(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.authenticated.done():
            self.authenticated.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)


class MasterLink:
    """Keeps one authenticated connection to a master and moves frames over it."""

    def __init__(
        self,
        config: Config,
        join: JoinInfo,
        role: m.Role,
        *,
        on_assign: Callable[[str, bytes], None],
        has_capacity: Callable[[], bool],
        on_registered: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.join = join
        self.role = role
        self._on_assign = on_assign
        self._has_capacity = has_capacity
        self._on_registered = on_registered
        self.state = LinkState.DISCONNECTED
        self.endpoints = _endpoints(join, config)
        self._refused: set[tuple[str, int]] = set()
        self._connection: _Connection | None = None
        # Outbox of result frames not yet confirmed: [confirm_at, blob], oldest first.
        # `confirm_at` is the number of acks on this connection that confirms the blob
        # (None: not written on this connection yet).
        self._outbox: collections.deque[list[object]] = collections.deque()
        self._unconfirmed_results = 0
        self._heartbeats_sent = 0
        self._acks = 0
        self.last_bytes_at = 0.0
        self.bytes_written = 0  # on this connection
        self._consumed = 0  # bytes the master's side has taken off our send queue, last seen
        self.last_progress_at = 0.0  # when the master last took bytes from us, or sent some
        self.last_write_at = 0.0
        self.last_heartbeat_at = 0.0
        self.heartbeating = True
        self._closing = False
        self.address = ""
        self.peer = ""
        self.connects = 0
        self.results_sent = 0
        self.frames_skipped = 0

    # ------------------------------------------------------------------------------- outgoing

    @property
    def unconfirmed(self) -> int:
        """Results written (or waiting to be) that the master has not confirmed yet."""
        return self._unconfirmed_results

    def send_results(self, blob: bytes, count: int) -> None:
        """Queue `count` wire-ready `TaskResult` frames; written now when connected."""
        entry: list[object] = [None, blob, count]
        self._outbox.append(entry)
        self._unconfirmed_results += count
        self.results_sent += count
        if self.state is LinkState.REGISTERED:
            self._write_entry(entry)

    def _write_entry(self, entry: list[object]) -> None:
        connection = self._connection
        assert connection is not None and connection.transport is not None
        entry[0] = self._heartbeats_sent + 1
        blob: bytes = entry[1]  # type: ignore[assignment]
        connection.transport.write(blob)
        self.bytes_written += len(blob)
        self.last_write_at = time.monotonic()

    def send_heartbeat(self) -> None:
        connection = self._connection
        if self.state is not LinkState.REGISTERED or connection is None:
            return
        assert connection.transport is not None
        connection.transport.write(_HEARTBEAT_FRAME)
        self.bytes_written += len(_HEARTBEAT_FRAME)
        self._heartbeats_sent += 1
        self.last_heartbeat_at = self.last_write_at = time.monotonic()

    def send(self, message: m.Message) -> None:
        connection = self._connection
        if self.state is LinkState.REGISTERED and connection is not None:
            assert connection.transport is not None
            data = codec.encode(message)
            connection.transport.write(data)
            self.bytes_written += len(data)
            self.last_write_at = time.monotonic()

    # ------------------------------------------------------------------------------- incoming

    def on_payload(self, payload: bytes) -> None:
        if payload.startswith(_ASSIGN_PREFIX):
            ident = codec.assign_task_id(payload)
            if ident is not None:
                self._on_assign(ident, payload)
                return
            try:
                ident = codec.peek(payload).id
            except RemoteProtocolError as exc:
                ident = None
                log.warning("skipping an unreadable AssignTask frame: %s", exc)
            if ident is not None:
                self._on_assign(ident, payload)
            else:
                self.frames_skipped += 1
            return
        if payload == _ACK_PAYLOAD:
            self._acked()
            return
        try:
            message = codec.decode(payload)
        except RemoteProtocolError as exc:
            self.frames_skipped += 1
            log.warning("skipping a malformed frame from the master: %s", exc)
            return
        if isinstance(message, m.ConnectedNodes):
            log.info(
                "master lists %d connected nodes: %s",
                len(message.addrs),
                ", ".join(message.addrs[:8]),
            )
        else:
            log.debug("ignoring %s from the master", type(message).__name__)

    def _acked(self) -> None:
        self._acks += 1
        acks = self._acks
        outbox = self._outbox
        while outbox:
            confirm_at = outbox[0][0]
            if confirm_at is None or confirm_at > acks:  # type: ignore[operator]
                break
            self._unconfirmed_results -= outbox.popleft()[2]  # type: ignore[operator]

    # ------------------------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Connect and stay connected until `close()`; raises `NoMasterError` when every
        address refused the token."""
        attempt = 0
        while not self._closing:
            connected = False
            for host, port in self.endpoints:
                if self._closing:
                    return
                if (host, port) in self._refused:
                    continue
                try:
                    await self._connect(host, port)
                except AuthenticationError as exc:
                    log.error("%s; not trying %s again", exc, format_address(host, port))
                    self._refused.add((host, port))
                    continue
                except (OSError, TimeoutError, ConnectionError) as exc:
                    log.warning("cannot reach master %s: %s", format_address(host, port), exc)
                    continue
                connected = True
                attempt = 0
                await self._serve()
                if self._closing:
                    return
                break
            if len(self._refused) == len(self.endpoints):
                raise NoMasterError("every master address refused the token from join.json")
            if not connected:
                attempt += 1
                if attempt == self.config.max_retries:
                    log.error(
                        "no master answered in %d rounds; still retrying every %.0f s",
                        attempt,
                        _BACKOFF_MAX_S,
                    )
                delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _connect(self, host: str, port: int) -> None:
        self.state = LinkState.CONNECTING
        timeout = self.config.failover_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        log.info("connecting to master %s", format_address(host, port))
        _, connection = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(self), host, port), timeout
        )
        assert connection.transport is not None
        self.state = LinkState.AUTHENTICATING
        connection.transport.write(frame(self.join.token.encode()))
        try:
            accepted = await asyncio.wait_for(asyncio.shield(connection.authenticated), timeout)
        except BaseException:
            connection.transport.close()
            raise
        if not accepted:
            connection.transport.close()
            raise AuthenticationError(f"master {format_address(host, port)} said Invalid token")
        self._connection = connection
        self._heartbeats_sent = self._acks = 0
        sockname = connection.transport.get_extra_info("sockname")
        peername = connection.transport.get_extra_info("peername")
        self.address = format_address(sockname[0], sockname[1]) if sockname else ""
        self.peer = format_address(peername[0], peername[1]) if peername else ""
        self.last_bytes_at = self.last_progress_at = time.monotonic()
        self.bytes_written = self._consumed = 0
        self.state = LinkState.REGISTERED
        self.connects += 1
        # Upstream keeps no session: role and first heartbeat again on every connection.
        connection.transport.write(
            codec.encode(m.RegisterRole(self.role)) + codec.encode(m.GET_CONNECTED_NODES)
        )
        for entry in self._outbox:
            self._write_entry(entry)
        if self._outbox:
            log.info("re-sent %d unconfirmed results", self._unconfirmed_results)
        if self.heartbeating:
            self.send_heartbeat()
        log.info(
            "registered with master %s as %s (local address %s)", self.peer, self.role, self.address
        )
        self._on_registered()

    async def _serve(self) -> None:
        connection = self._connection
        assert connection is not None
        ticker = asyncio.ensure_future(self._tick())
        try:
            await connection.closed
        finally:
            ticker.cancel()
            self._connection = None
            if self.state is not LinkState.CLOSED:
                self.state = LinkState.DISCONNECTED
                log.warning("connection to master %s lost; reconnecting", self.peer)

    async def _tick(self) -> None:
        """Heartbeat, idle poll and stuck-master check."""
        interval = self.config.failover_timeout_ms / 2000
        poll = self.config.poll_interval_ms / 1000
        stuck_after = self.config.failover_timeout_ms / 1000
        step = min(interval, poll) if poll > 0 else interval
        while True:
            await asyncio.sleep(step)
            now = time.monotonic()
            self._note_progress(now)
            if (
                self._heartbeats_sent > self._acks
                and now - self.last_progress_at > stuck_after
                and now - self.last_heartbeat_at < stuck_after
            ):
                log.error(
                    "master %s is stuck: no answer and no byte for %.1f s while heartbeating; "
                    "failing over",
                    self.peer,
                    now - self.last_bytes_at,
                )
                self.endpoints = self.endpoints[1:] + self.endpoints[:1]
                self._close_connection()
                return
            if not self.heartbeating:
                continue
            if now - self.last_heartbeat_at >= interval or (
                poll > 0 and now - self.last_write_at >= poll and self._has_capacity()
            ):
                self.send_heartbeat()

    def _note_progress(self, now: float) -> None:
        """A master that still takes our bytes off the wire is slow, not stuck: a large backlog
        of results can delay its `HeartbeatAck` well past `failover_timeout_ms`."""
        if self.last_bytes_at > self.last_progress_at:
            self.last_progress_at = self.last_bytes_at
        connection = self._connection
        if connection is None or connection.transport is None:
            return
        queued = connection.transport.get_write_buffer_size() + _unsent_bytes(connection.transport)
        consumed = self.bytes_written - queued
        if consumed > self._consumed:
            self._consumed = consumed
            self.last_progress_at = now

    def _close_connection(self) -> None:
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    def stop_heartbeats(self) -> None:
        self.heartbeating = False

    def close(self) -> None:
        self._closing = True
        self.state = LinkState.CLOSED
        self._close_connection()


def _unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes in the kernel's send queue not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        buffer = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int.from_bytes(buffer, sys.byteorder, signed=True)


def _endpoints(join: JoinInfo, config: Config) -> list[tuple[str, int]]:
    endpoints = [(join.ip, join.port)]
    for endpoint in config.master_endpoints:
        if endpoint not in endpoints:
            endpoints.append(endpoint)
    return endpoints
