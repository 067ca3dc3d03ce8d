"""The master link: connect, authenticate, register, heartbeat, deliver results, reconnect.

    endpoints (join.json's address, then master_addresses) ──connect──▶ token ──▶ "OK"
        ──▶ RegisterRole, GetConnectedNodes, Heartbeat ──▶ REGISTERED
    bytes ──FrameDecoder──▶ payloads: AssignTask ──peek id──▶ on_assign([id, ...], [payload, ...])
                                      HeartbeatAck ──▶ confirm the outbox
                                      anything else ──decode──▶ log / skip
    results (wire-ready frames) ──▶ outbox ──write──▶ master

`LinkState` is the one place the link's phase lives. A result stays in the outbox until the
master has answered a `Heartbeat` written after it (the master reads one connection's frames in
order, so that ack proves it read the result); after a reconnect every unconfirmed result is
written again. The upstream master only pushes tasks while handling a frame from the node, so
an idle node with free capacity polls with a `Heartbeat` every `poll_interval_ms`.

Failure handling, each logged with its reason:
- Connecting: every address in turn; a round without a connection waits an exponential backoff
  with jitter (from 0.1 s), `max_retries` rounds, then `retry_interval_ms` between rounds, for
  as long as it takes. `Invalid token` rules that address out for good; any other answer to
  the token than `OK` is a failed attempt like no answer.
- Stuck master: a heartbeat unanswered, no byte received and none of the bytes we wrote up
  to that heartbeat taken off the wire for twice `failover_timeout_ms`: close, try the next
  address first. Twice, as the master waits before it evicts a silent node: a master that is
  only paused (a long GC, an overloaded host) keeps the node, and leaving it earlier would
  throw away the acknowledgements it is about to send (every result since would go out again)
  and, upstream, the tasks active on the closed connection.
- Zombie connection: the upstream master evicts a node without closing its connection and
  never sends it a task again. Every `failover_timeout_ms` the link asks `GetConnectedNodes`;
  when the first answer on a connection listed our own address (it does not behind NAT, and
  the check stays off), a later answer without it means we were evicted: reconnect.
- Draining (`begin_drain`): no heartbeat, poll or query any more, so the master can evict the
  node and re-queue what it held; the link reconnects only to deliver results.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import fcntl
import functools
import logging
import mmap
import os
import random
import re
import ssl
import sys
import termios
import time
from collections.abc import Callable
from typing import Final, cast

from node.config import Config, JoinInfo, format_address, plain_peer_refusal
from node.errors import CpnodeError
from node.histogram import Histogram
from node.pacing import PacedReader, PacedWriter
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import FrameTooLarge, RemoteProtocolError
from node.protocol.framing import FrameDecoder, SpillFactory, frame
from node.throttle import Throttle
from node.tls import ClientTls, TlsVerifyError, client_tls_for, verify_failure, wants_tls
from shm.segments import SPILL_HEAD_BYTES, discard_spilled, spilled
from workers.channel import Frames

log = logging.getLogger("cpnode.link")

_HEARTBEAT_FRAME = codec.encode(m.HEARTBEAT)
_ACK_PAYLOAD = b'"HeartbeatAck"'
_ASSIGN_PREFIX = b'{"AssignTask":'
_ASSIGN_HEAD = re.compile(rb'\s*\{\s*"AssignTask"\s*:').match


def _is_assign(payload: bytes) -> bool:
    """An `AssignTask` as serde writes it, or with whitespace around its first key (within
    the head a spilled frame keeps)."""
    return (
        payload.startswith(_ASSIGN_PREFIX) or _ASSIGN_HEAD(payload, 0, SPILL_HEAD_BYTES) is not None
    )


# An outbox entry: [confirm_at, blob, ids] and, once a result in it was looked up, its
# frames by id (see `find_result`).
_CONFIRM_AT, _BLOB, _IDS, _SPLIT = range(4)


def _index_entry(index: dict[str, list[object]], entry: list[object]) -> None:
    """Point `index` at an outbox entry for each of its ids (no frame is read, nothing is
    allocated per id: 300,000 results are indexed in a few ms)."""
    ids: list[str] = entry[_IDS]  # type: ignore[assignment]
    index.update(dict.fromkeys(ids, entry))


def _unmap_off_the_loop(entry: list[object]) -> None:
    """Let go of a confirmed entry's mapped result in a thread: unmapping a big segment frees
    its pages, 0.1 s for 512 MiB, and `munmap` runs without the GIL."""
    last = [entry[_BLOB]]
    entry[_BLOB] = None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # no loop (a test of the outbox alone): here, then
        return
    loop.run_in_executor(None, last.clear)


_BACKOFF_FIRST_S = 0.1
# Results written before a Heartbeat is sent to have them confirmed (besides the periodic ones).
CONFIRM_EVERY_RESULTS = 4096
# A heartbeat more than half an interval late is logged, at most this often (seconds).
_LATE_WARN_EVERY_S = 10.0
# Upper bounds (seconds) of the heartbeat round-trip and lateness histograms.
HEARTBEAT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0)


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    REGISTERED = "registered"
    CLOSED = "closed"


_TOKEN_SOURCE: Final = "the token (join.json's, or $CPCLUSTER_TOKEN when set)"
_REMIND_REFUSED_ROUNDS: Final = 60
"""At `retry_interval_ms` apart, how many rounds between reminders of a refused token."""


class AuthenticationError(CpnodeError):
    """The master answered `Invalid token`: fatal for that address."""


class NoMasterError(CpnodeError):
    """Every master address refused our token."""


class _Connection(asyncio.Protocol):
    def __init__(self, link: MasterLink) -> None:
        self.link = link
        self.decoder = FrameDecoder(link.config.max_frame_bytes, spill=link.spill)
        self.transport: asyncio.Transport | None = None
        self.writer: PacedWriter | None = None  # every write of ours goes through it, in order
        self.reader: PacedReader = None  # type: ignore[assignment]  # set on connect
        # The master's answer to the token: b"OK", b"Invalid token", or anything else.
        self.authenticated: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.writer = PacedWriter(self.transport)  # type: ignore[arg-type]
        self.reader = PacedReader(transport)

    def data_received(self, data: bytes) -> None:
        link = self.link
        link.last_bytes_at = time.monotonic()
        link.bytes_received += len(data)
        self.reader.received(len(data))  # a burst is handled 256 KiB per turn of the loop
        try:
            payloads = self.decoder.feed(data)
        except FrameTooLarge as exc:
            log.error("master sent an oversized frame: %s; closing the connection", exc)
            assert self.transport is not None
            self.transport.close()
            # The whole frames before it still count: their tasks run, their results wait
            # in the outbox for the next connection.
            payloads = exc.payloads
            if not payloads or not self.authenticated.done():
                return
        link.frames_received += len(payloads)
        if not self.authenticated.done():
            if not payloads:
                return
            answer = payloads.pop(0).strip()
            self.authenticated.set_result(answer)
            if answer != b"OK":
                return
        # The common frame, an AssignTask as every master writes it, goes to the dispatcher
        # with the others of this read, in one call; anything else takes `on_payload` (after
        # the tasks before it).
        ids = codec.assign_task_ids(payloads)
        if None not in ids:  # a read of tasks only, the common case: no per-frame loop here
            if ids:
                link._on_assign(cast(list[str], ids), payloads)
            return
        run_ids: list[str] = []
        run: list[bytes] = []
        for ident, payload in zip(ids, payloads, strict=True):
            if ident is not None:
                run_ids.append(ident)
                run.append(payload)
                continue
            if run:
                link._on_assign(run_ids, run)
                run_ids, run = [], []
            link.on_payload(payload)
        if run:
            link._on_assign(run_ids, run)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.decoder.spilling:
            # A large body cut off mid-way leaves no segment behind. Removing it frees what
            # was written (tens of ms for a GiB of tmpfs), so not on the loop.
            asyncio.get_running_loop().run_in_executor(None, self.decoder.abort)
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
        on_assign: Callable[[list[str], list[bytes]], None],
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
        # The master's answer to a RequestConnection (node/direct.py opens that link).
        self.on_connection_info: Callable[[m.ConnectionInfo], None] | None = None
        self.on_confirmed: Callable[[], None] | None = None  # results were confirmed
        self._refused: set[tuple[str, int]] = set()
        # Built once, before connecting: a bad `ca_cert` is a config error (exit status 2).
        needs_tls = any(wants_tls(host, config.tls) for host, _ in self.endpoints)
        self._tls: ClientTls | None = client_tls_for(config) if needs_tls else None
        self._connection: _Connection | None = None
        # Removes the segment of a spilled frame that will not run (the node sets one that
        # does it in a thread: freeing a big tmpfs file takes the kernel tens of ms).
        self.discard: Callable[[bytes], None] = functools.partial(discard_spilled, config.shm_dir)
        # Outbox of result frames not yet confirmed: [confirm_at, blob, ids], oldest first.
        # `confirm_at` is the number of acks on this connection that confirms the blob (None:
        # not written on this connection yet).
        self._outbox: collections.deque[list[object]] = collections.deque()
        self._unconfirmed_results = 0
        self.mapped_bytes = 0  # of the unconfirmed results held as mapped segments
        # id -> its outbox entry. Built from the entries' ids by the first `find_result`, kept
        # up to date by `send_results` and by each confirmation, dropped when the outbox
        # empties. Without it each repeated id would scan the outbox.
        self._result_index: dict[str, list[object]] | None = None
        self._heartbeats_sent = 0
        self._acks = 0
        self.last_bytes_at = 0.0
        self.bytes_written = 0  # on this connection
        self._consumed = 0  # bytes the master's side has taken off our send queue, last seen
        self.last_progress_at = 0.0  # when the master last took bytes from us, or sent some
        self.last_write_at = 0.0
        self.last_heartbeat_at = 0.0
        self._late_heartbeats = Throttle(_LATE_WARN_EVERY_S)  # over half an interval late
        self.heartbeating = True
        self._results_since_heartbeat = 0
        # Where bodies of large frames go as they arrive (set once the node has claimed its
        # directory in shm_dir); None keeps them in memory.
        self.spill: SpillFactory | None = None
        self.draining = False
        self._results_waiter: asyncio.Future[None] | None = None  # draining, outbox empty
        self._closing = False
        self._preferred = 0  # index in `endpoints` of the address to try first
        self.address = ""
        self.peer = ""
        self.connected_at = 0.0
        # Zombie check: None until the first ConnectedNodes answer on this connection, then
        # whether that answer listed `address` (the check is on only then).
        self._listed: bool | None = None
        self._nodes_asked_at = 0.0
        self.zombies_detected = 0
        self.connects = 0
        self.results_sent = 0
        self.results_confirmed = 0
        self.frames_skipped = 0
        # For the metrics endpoint, read at scrape time: a few adds per read, write or heartbeat.
        self.frames_received = 0
        self.bytes_received = 0
        self.frames_written = 0  # after registration, on every connection
        self._bytes_written_before = 0  # on earlier connections
        self.failovers = 0  # connections made to another master than the one before
        self._last_endpoint: tuple[str, int] | None = None
        self._heartbeat_sent_at: collections.deque[float] = collections.deque()
        # `bytes_written` at the end of each unanswered heartbeat on this connection.
        self._heartbeat_ends: collections.deque[int] = collections.deque()
        self.heartbeat_rtt = Histogram(HEARTBEAT_BUCKETS)
        # How much later than planned periodic heartbeats left (actual interval - planned).
        self.heartbeat_lateness = Histogram(HEARTBEAT_BUCKETS)

    # ------------------------------------------------------------------------------- outgoing

    @property
    def bytes_sent(self) -> int:
        """Bytes written after registration, on every connection."""
        return self._bytes_written_before + self.bytes_written

    @property
    def unconfirmed(self) -> int:
        """Results written (or waiting to be) that the master has not confirmed yet."""
        return self._unconfirmed_results

    def send_results(self, blob: Frames, ids: list[str]) -> None:
        """Queue wire-ready `TaskResult` frames, those of `ids` in that order; written now
        when connected. A view of a mapped segment (one frame) is written from the mapping,
        which goes with the entry."""
        count = len(ids)
        entry: list[object] = [None, blob, ids]
        self._outbox.append(entry)
        if self._result_index is not None:
            _index_entry(self._result_index, entry)
        if type(blob) is memoryview:
            self.mapped_bytes += len(blob)
        self._unconfirmed_results += count
        self.results_sent += count
        if self.state is LinkState.REGISTERED:
            self._write_entry(entry)
            self._results_since_heartbeat += count
            if self._results_since_heartbeat >= CONFIRM_EVERY_RESULTS and self.heartbeating:
                # During a burst the periodic heartbeat is seconds away: ask for confirmation
                # now, so the outbox (and the dispatcher's memory of answered ids) stays small.
                self.send_heartbeat()
        elif self._results_waiter is not None and not self._results_waiter.done():
            self._results_waiter.set_result(None)

    @property
    def heartbeats_unanswered(self) -> int:
        """Heartbeats sent on this connection that the master has not answered yet: until it
        has, it may still read our earlier frames and push tasks in reply."""
        return self._heartbeats_sent - self._acks

    def confirm(self) -> None:
        """Send a `Heartbeat` when results went out on this connection after the last one,
        so the master's answer confirms them (used while draining, when heartbeats stop)."""
        confirm_at = self._outbox[-1][_CONFIRM_AT] if self._outbox else None
        if confirm_at is not None and confirm_at > self._heartbeats_sent:  # type: ignore[operator]
            self.send_heartbeat()

    def find_result(self, ident: str) -> Frames | None:
        """The result frame for `ident` while it awaits confirmation, else None. The first
        look-up indexes the outbox's ids; an entry of several frames is split apart at its
        first look-up (and kept split: a master that repeats one id repeats its neighbours)."""
        index = self._result_index
        if index is None:
            index = self._result_index = {}
            for queued in self._outbox:
                _index_entry(index, queued)
        entry = index.get(ident)
        if entry is None:
            return None
        blob: Frames = entry[_BLOB]  # type: ignore[assignment]
        ids: list[str] = entry[_IDS]  # type: ignore[assignment]
        if len(ids) == 1:  # one frame, as it stands (a mapped one included)
            return blob
        if len(entry) == _SPLIT:  # an id answered twice there: its last answer
            entry.append(dict(zip(ids, FrameDecoder(len(blob)).feed(blob), strict=True)))
        payloads: dict[str, bytes] = entry[_SPLIT]  # type: ignore[assignment]
        return frame(payloads[ident])

    def undelivered_ids(self) -> list[str]:
        """Ids of the results the master has not confirmed (for a final log)."""
        return [ident for entry in self._outbox for ident in entry[_IDS]]  # type: ignore[attr-defined]

    def _open_writer(self) -> PacedWriter | None:
        """The connection's writer while its transport can still be written to: between the
        peer's close and `connection_lost` a write would raise (uvloop), and what is not
        written stays in the outbox for the next connection."""
        connection = self._connection
        if connection is None or connection.transport is None or connection.writer is None:
            return None
        return None if connection.transport.is_closing() else connection.writer

    def _write_entry(self, entry: list[object]) -> None:
        writer = self._open_writer()
        if writer is None:
            return
        entry[_CONFIRM_AT] = self._heartbeats_sent + 1
        blob: Frames = entry[_BLOB]  # type: ignore[assignment]
        writer.write(blob)
        self.bytes_written += len(blob)
        self.frames_written += len(entry[_IDS])  # type: ignore[arg-type]
        self.last_write_at = time.monotonic()

    def send_heartbeat(self) -> None:
        writer = self._open_writer()
        if self.state is not LinkState.REGISTERED or writer is None:
            return
        writer.write(_HEARTBEAT_FRAME)
        now = time.monotonic()
        if self._heartbeats_sent and self.heartbeating:
            # Measured here, when it leaves, whatever sent it: a pause that fell between the
            # tick's reading of the clock and this write would otherwise go unreported.
            interval = self.config.failover_timeout_ms / 2000
            if (since := now - self.last_heartbeat_at) >= interval:
                self._observe_lateness(since - interval, interval)
        self._results_since_heartbeat = 0
        self.bytes_written += len(_HEARTBEAT_FRAME)
        self.frames_written += 1
        self._heartbeats_sent += 1
        self.last_heartbeat_at = self.last_write_at = now
        self._heartbeat_sent_at.append(self.last_heartbeat_at)
        self._heartbeat_ends.append(self.bytes_written)

    def send(self, message: m.Message) -> None:
        writer = self._open_writer()
        if self.state is LinkState.REGISTERED and writer is not None:
            data = codec.encode(message)
            writer.write(data)
            self.bytes_written += len(data)
            self.frames_written += 1
            self.last_write_at = time.monotonic()

    # ------------------------------------------------------------------------------- incoming

    def on_payload(self, payload: bytes) -> None:
        reference = spilled(payload)
        if reference is not None:
            # A large body went to a shared-memory segment as it arrived; route it by its head.
            name, error, head = reference
            if not _is_assign(head):
                self.frames_skipped += 1
                log.warning(
                    "skipping a large frame that is no AssignTask (%d-byte head)", len(head)
                )
                self.discard(payload)
                return
            ident = codec.assign_task_id(head) or codec.peek_id(head)
            if ident is not None:
                self._on_assign([ident], [payload])
            elif error:  # the body went nowhere: no way to read the id after its head
                self._skip_assign(f"a large frame, its id not in its head: {error}")
            else:
                self._route_by_spilled_id(name, payload)
            return
        if _is_assign(payload):
            ident = codec.assign_task_id(payload)
            if ident is not None:
                self._on_assign([ident], [payload])
                return
            try:
                ident = codec.peek(payload).id
            except RemoteProtocolError as exc:
                self._skip_assign(f"{len(payload)} bytes: {exc}")
                return
            if ident is not None:
                self._on_assign([ident], [payload])
            else:
                self._skip_assign(f"{len(payload)} bytes")
            return
        if payload == _ACK_PAYLOAD:
            self._acked()
            return
        if codec.costly_to_parse(payload):
            self.frames_skipped += 1
            log.warning(
                "skipping a %d-byte frame from the master: too many JSON values to parse on the"
                " event loop",
                len(payload),
            )
            return
        try:
            message = codec.decode(payload)
        except RemoteProtocolError as exc:
            self.frames_skipped += 1
            log.warning("skipping a malformed frame from the master: %s", exc)
            return
        if isinstance(message, m.HeartbeatAck):  # in another form than `_ACK_PAYLOAD`
            self._acked()
        elif isinstance(message, m.AssignTask):  # a form `_is_assign` missed (an escaped key)
            self._on_assign([message.id], [payload])
        elif isinstance(message, m.ConnectedNodes):
            self._check_listed(message.addrs)
        elif isinstance(message, m.ConnectionInfo) and self.on_connection_info is not None:
            self.on_connection_info(message)
        else:
            log.debug("ignoring %s from the master", type(message).__name__)

    def _skip_assign(self, what: str) -> None:
        """An AssignTask without an id to answer it by (nothing else can be done with it)."""
        self.frames_skipped += 1
        log.warning("skipping an AssignTask frame whose id cannot be read (%s)", what)

    def _route_by_spilled_id(self, name: str, payload: bytes) -> None:
        """Route a spilled AssignTask whose head does not show its id (written after the byte
        array, say) once a thread has found the id: on the loop, the search through a big
        segment held it for up to a quarter of a second (960 MiB)."""

        def route(lookup: asyncio.Future[str | None]) -> None:
            ident = lookup.result()
            if ident is not None:
                self._on_assign([ident], [payload])
                return
            self._skip_assign(
                "a large frame, its id neither in its head nor around a byte array; the node"
                " parses no frame that large whole"
            )
            self.discard(payload)

        lookup = asyncio.get_running_loop().run_in_executor(None, self._spilled_id, name)
        lookup.add_done_callback(route)

    def _spilled_id(self, name: str) -> str | None:
        """The id of a spilled AssignTask that its head does not show: read around the byte
        array in the mapped segment, not copied (in a thread, see `_route_by_spilled_id`)."""
        try:
            with (
                open(os.path.join(self.config.shm_dir, name), "rb") as file,
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped,
            ):
                return codec.id_around_byte_array(mapped, "AssignTask")
        except (OSError, ValueError) as error:
            log.warning("cannot read the spilled payload %s: %s", name, error)
            return None

    def _check_listed(self, addrs: tuple[str, ...]) -> None:
        """Zombie check: are we still among the master's connected nodes?"""
        listed = self.address in addrs
        log.debug("master lists %d connected nodes: %s", len(addrs), ", ".join(addrs[:8]))
        if self._listed is None:
            self._listed = listed
            if not listed:
                log.info(
                    "master %s does not list our address %s (behind NAT?); "
                    "eviction check off for this connection",
                    self.peer,
                    self.address,
                )
        elif self._listed and not listed and self.state is LinkState.REGISTERED:
            self.zombies_detected += 1
            log.error(
                "master %s no longer lists this node (%s): it evicted us without closing the "
                "connection and will send no more tasks; reconnecting",
                self.peer,
                self.address,
            )
            self._close_connection()

    def _acked(self) -> None:
        self._acks += 1
        if self._heartbeat_sent_at:  # the master answers heartbeats in order
            self.heartbeat_rtt.observe(time.monotonic() - self._heartbeat_sent_at.popleft())
        if self._heartbeat_ends:
            self._heartbeat_ends.popleft()
        acks = self._acks
        outbox = self._outbox
        confirmed = False
        while outbox:
            confirm_at = outbox[0][_CONFIRM_AT]
            if confirm_at is None or confirm_at > acks:  # type: ignore[operator]
                break
            entry = outbox.popleft()
            index = self._result_index
            if index is not None:
                for ident in entry[_IDS]:  # type: ignore[attr-defined]
                    if index.get(ident) is entry:  # not a later result's
                        del index[ident]
                if not outbox:
                    self._result_index = None
            count = len(entry[_IDS])  # type: ignore[arg-type]
            if type(entry[_BLOB]) is memoryview:  # no local name: the last reference must go
                self.mapped_bytes -= len(entry[_BLOB])  # type: ignore[arg-type]
                _unmap_off_the_loop(entry)
            self._unconfirmed_results -= count
            self.results_confirmed += count
            confirmed = True
        if confirmed and self.on_confirmed is not None:
            self.on_confirmed()

    # ------------------------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Connect and stay connected until `close()`; raises `NoMasterError` when every
        address refused the token. Never gives up otherwise (see the module docstring)."""
        rounds = 0  # consecutive rounds over every address without a useful connection
        while not self._closing:
            if self.draining and not self._outbox:
                await self._wait_for_results()
                continue
            count = len(self.endpoints)
            order = [self.endpoints[(self._preferred + i) % count] for i in range(count)]
            worked = False
            for host, port in order:
                if self._closing:
                    return
                if (host, port) in self._refused:
                    continue
                address = format_address(host, port)
                try:
                    await self._connect(host, port)
                except AuthenticationError as exc:
                    log.error("%s; not trying %s again", exc, address)
                    self._refused.add((host, port))
                    continue
                except TlsVerifyError as exc:
                    log.error("%s", exc)
                    continue
                except (OSError, TimeoutError, ConnectionError) as exc:
                    log.warning("cannot reach master %s: %s", address, _reason(exc))
                    continue
                self._preferred = self.endpoints.index((host, port))
                await self._serve()
                # A connection the master answered on was a working one: reconnect at once.
                # One that closed before any answer counts as a failed round (no hot loop).
                worked = self._acks > 0
                break
            if self._closing:
                return
            if len(self._refused) == count:
                raise NoMasterError(f"every master address refused {_TOKEN_SOURCE}")
            if worked:
                rounds = 0
                continue
            rounds += 1
            await asyncio.sleep(self._retry_delay(rounds))

    def _retry_delay(self, rounds: int) -> float:
        """Exponential backoff with jitter for `max_retries` rounds, then `retry_interval_ms`."""
        slow = self.config.retry_interval_ms / 1000
        if rounds <= self.config.max_retries:
            delay = min(slow, _BACKOFF_FIRST_S * 2.0 ** (rounds - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "no master reachable (round %d of %d); next round in %.2f s",
                rounds,
                self.config.max_retries,
                delay,
            )
            return delay
        if rounds == self.config.max_retries + 1 or (
            self._refused and rounds % _REMIND_REFUSED_ROUNDS == 0
        ):
            # A refused token with the other masters silent is most often a wrong token:
            # say so now and then, not only in the one line that refused it.
            refused = ", ".join(format_address(*a) for a in self.endpoints if a in self._refused)
            log.error(
                "no master reachable in %d rounds; still retrying every %.1f s%s",
                rounds,
                slow,
                f" (master {refused} refused {_TOKEN_SOURCE}: is it the right one?)"
                if refused
                else "",
            )
        return slow * random.uniform(0.8, 1.2)

    async def _wait_for_results(self) -> None:
        """Draining and nothing to deliver: stay away until a result needs the master."""
        self._results_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._results_waiter
        finally:
            self._results_waiter = None

    async def _connect(self, host: str, port: int) -> None:
        self.state = LinkState.CONNECTING
        timeout = self.config.failover_timeout_ms / 1000
        loop = asyncio.get_running_loop()
        tls = self._tls if wants_tls(host, self.config.tls) else None
        log.info("connecting to master %s%s", format_address(host, port), " (TLS)" if tls else "")
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(self), host, port,
                    ssl=tls.context if tls else None, server_hostname=host if tls else None,
                ),
                timeout,
            )  # fmt: skip
        except ssl.SSLCertVerificationError as error:
            assert tls is not None
            raise await verify_failure(error, "master", host, port, tls.trust) from None
        assert connection.transport is not None
        if connection.transport.is_closing():
            raise ConnectionError("the master closed the connection at once")
        peer = connection.transport.get_extra_info("peername")
        if tls is None and (refusal := plain_peer_refusal(host, self.config.tls, peer)):
            connection.authenticated.cancel()  # nobody will wait for the answer
            connection.transport.abort()
            raise ConnectionError(refusal)
        self.state = LinkState.AUTHENTICATING
        connection.transport.write(frame(self.join.token.encode()))
        try:
            answer = await asyncio.wait_for(asyncio.shield(connection.authenticated), timeout)
        except BaseException:
            connection.transport.close()
            raise
        if answer != b"OK":
            connection.transport.close()
            if answer == b"Invalid token":
                raise AuthenticationError(f"master {format_address(host, port)} said Invalid token")
            # Not the token's fault: try again later, like a master that did not answer.
            raise ConnectionError(f"it answered {answer[:100]!r} to the token, not OK")
        if connection.transport.is_closing():
            raise ConnectionError("the master closed the connection as it accepted the token")
        self._connection = connection
        self._heartbeats_sent = self._acks = 0
        self._listed = None
        self.connected_at = self._nodes_asked_at = time.monotonic()
        self._heartbeat_sent_at.clear()
        self._heartbeat_ends.clear()
        if self._last_endpoint is not None and self._last_endpoint != (host, port):
            self.failovers += 1
        self._last_endpoint = (host, port)
        sockname = connection.transport.get_extra_info("sockname")
        peername = connection.transport.get_extra_info("peername")
        self.address = format_address(sockname[0], sockname[1]) if sockname else ""
        self.peer = format_address(peername[0], peername[1]) if peername else ""
        self.last_bytes_at = self.last_progress_at = time.monotonic()
        self._bytes_written_before += self.bytes_written
        self.bytes_written = self._consumed = 0
        self.state = LinkState.REGISTERED
        self.connects += 1
        # Upstream keeps no session: role and first heartbeat again on every connection.
        assert connection.writer is not None
        connection.writer.write(codec.encode(m.RegisterRole(self.role)))
        for entry in self._outbox:
            self._write_entry(entry)
        if self._outbox:
            log.info("re-sent %d unconfirmed results", self._unconfirmed_results)
        if self.heartbeating or self._outbox:  # draining: only to have the results confirmed
            self.send_heartbeat()
        if not self.draining:  # registered by now: its answer must list us (zombie check)
            self.send(m.GET_CONNECTED_NODES)
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
                if self.draining:
                    log.info("connection to master %s closed while draining", self.peer)
                else:
                    log.warning("connection to master %s lost; reconnecting", self.peer)

    async def _tick(self) -> None:
        """Heartbeat, idle poll, zombie query and stuck-master check."""
        interval = self.config.failover_timeout_ms / 2000
        poll = self.config.poll_interval_ms / 1000
        stuck_after = 2 * self.config.failover_timeout_ms / 1000  # as the master's eviction
        query_every = self.config.failover_timeout_ms / 1000
        # A quarter of the poll interval: an idle node polls within 1.25 x poll_interval_ms.
        step = min(interval, poll / 4) if poll > 0 else interval
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
                self._preferred = (self._preferred + 1) % len(self.endpoints)
                self._close_connection(abort=True)
                return
            if not self.heartbeating:
                continue
            if self._listed is not False and now - self._nodes_asked_at >= query_every:
                self._nodes_asked_at = now
                self.send(m.GET_CONNECTED_NODES)
            if now - self.last_heartbeat_at >= interval or (
                poll > 0 and now - self.last_write_at >= poll and self._has_capacity()
            ):
                self.send_heartbeat()  # which records how late it left

    def _observe_lateness(self, late: float, interval: float) -> None:
        """Record how late a periodic heartbeat left; warn (at most every _LATE_WARN_EVERY_S)
        when it was later than half an interval: the master evicts a node silent for two
        failover timeouts, four intervals, so an operator should hear of it well before."""
        self.heartbeat_lateness.observe(late)
        if late <= interval / 2:
            return
        if count := self._late_heartbeats.hit():
            log.warning(
                "heartbeat to master %s left %.0f ms late (every %.0f ms planned; %d late since"
                " the last warning): the event loop was blocked or the host is overloaded",
                self.peer,
                late * 1000,
                interval * 1000,
                count,
            )

    def _note_progress(self, now: float) -> None:
        """A master that still takes our bytes off the wire is slow, not stuck: a large backlog
        of results can delay its `HeartbeatAck` well past `failover_timeout_ms`.

        Bytes taken off the wire only prove the master reads while they are bytes written up
        to the oldest unanswered heartbeat: later ones may just fill the receive buffer of its
        kernel (a deadlocked master's kernel still accepts a stream of heartbeats)."""
        if self.last_bytes_at > self.last_progress_at:
            self.last_progress_at = self.last_bytes_at
        connection = self._connection
        if connection is None or connection.transport is None:
            return
        transport = connection.transport
        queued = transport.get_write_buffer_size() + _unsent_bytes(transport)
        if connection.writer is not None:
            queued += connection.writer.backlog_bytes
        consumed = self.bytes_written - queued
        if consumed > self._consumed:
            ends = self._heartbeat_ends
            if not ends or self._consumed < ends[0]:
                self.last_progress_at = now
            self._consumed = consumed

    def _close_connection(self, *, abort: bool = False) -> None:
        """Close the connection after what was written (`abort`: at once, dropping it: a
        stuck master reads nothing, so a close would wait for ever behind a full buffer; the
        results stay in the outbox for the next connection)."""
        connection = self._connection
        if connection is None or connection.transport is None:
            return
        if abort:
            connection.transport.abort()
        elif connection.writer is not None:
            connection.writer.close()
        else:
            connection.transport.close()

    def begin_drain(self) -> None:
        """Stop heartbeats, polls and queries for good; reconnect only to deliver results."""
        self.heartbeating = False
        self.draining = True

    def close(self) -> None:
        self._closing = True
        self.state = LinkState.CLOSED
        self._close_connection()
        if self._results_waiter is not None and not self._results_waiter.done():
            self._results_waiter.set_result(None)


def _reason(exc: BaseException) -> str:
    """Why a connection attempt failed, in a few words."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


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
