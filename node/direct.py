"""Direct links: tasks between nodes (and from clients) without the master in between.

    dialer ──TCP, or TLS by the upstream rule──▶ token ──▶ "OK" | "Invalid token" (closed)
    then, either way:  AssignTask{id, task} ──▶ this node's Dispatcher ──▶ TaskResult{id, result}
                       Heartbeat ──▶ HeartbeatAck           Disconnect ──▶ closed

Upstream direct links carry no authentication; ours start exactly like the master handshake
(the cluster token from join.json, compared in constant time) and are TLS under the same rule
(`node/tls.py`: a listener serves whichever the peer starts with). The connections not
authenticated yet are bounded (`node/admission.py`), as the master's.

Who uses them:
- `DirectServer` (a node with `direct_port`): runs what a peer sends with the same dispatcher as
  master work. Each link renames the ids it hands in (a prefix unique to the link, inserted
  into the JSON string without decoding the payload), so a peer's ids never collide with the
  master's or another peer's, and its results go back on that link, not to the master.
- `DirectPeer` (`connect_to`, `--connect-to HOST:PORT`): keeps a link to a peer's direct port
  and lends the node the peer's capacity: a master task that arrives while this node's workers
  have no room goes to the peer (at most `direct_window` at once), and its result is delivered
  to the master like any other. When the link is lost, tasks safe to repeat run here instead;
  the others get an `Error` saying the peer was lost.
- `DirectClient` (`cpnode-submit --direct`): sends tasks to a node's direct port and awaits their
  results, which are pushed, not polled.
- `ConnectionInfo(addr, port)` from the master, as upstream meant it: listen on `port` (on
  `direct_host`) and dial the host of `addr` on `port`, the first connection wins, within
  `failover_timeout_ms`; the link then runs what the peer sends. Dialing sends the cluster token,
  so only an answer to a `RequestConnection` this node sent on the current master connection,
  not answered yet, is acted on (`ConnectionRequests`), and only when `network_allow` and
  `network_deny` let this node reach that host (the check `Tcp` tasks pass); anything else is
  logged and ignored: no listener, no dial.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hmac
import ipaddress
import itertools
import logging
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

from node.admission import Admission, Slot
from node.config import Config, JoinInfo, format_address, parse_address, plain_peer_refusal
from node.dispatch import NOT_STARTED, Dispatcher, _is_idempotent
from node.errors import ConfigError, CpnodeError
from node.pacing import PacedReader, PacedWriter
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import FrameTooLarge, RemoteProtocolError
from node.protocol.framing import FrameDecoder, frame, frame_joined
from node.throttle import Throttle, more_since
from node.tls import (
    ClientTls,
    ServerTls,
    TlsListener,
    TlsVerifyError,
    client_tls,
    ensure_certificate,
    server_tls,
    verify_failure,
    wants_tls,
)
from shm.bytesjson import ByteArrayError, decode_byte_array, encode_byte_array
from workers.channel import Frames

if TYPE_CHECKING:  # the client library (`DirectClient`) need not load the I/O tasks' aiohttp
    from node.iotasks import NetworkPolicy

__all__ = [
    "ConnectionRequests",
    "DirectClient",
    "DirectError",
    "DirectLinkRefused",
    "DirectLinks",
    "DirectPeer",
    "DirectServer",
    "accept_connection_info",
]

log = logging.getLogger("cpnode.direct")

_OK: Final = b"OK"
_INVALID_TOKEN: Final = b"Invalid token"
_TOKEN_FRAME_LIMIT: Final = 4096
_AUTH_TIMEOUT_S: Final = 10.0
_ASSIGN_HEAD: Final = b'{"AssignTask":{"id":"'
_RESULT_HEAD: Final = b'{"TaskResult":{"id":"'
_NOT_STARTED_TAIL: Final = b',"result":' + codec.result_to_json(NOT_STARTED) + b"}}"
_HEARTBEAT_FRAME: Final = codec.encode(m.HEARTBEAT)
_ACK_FRAME: Final = codec.encode(m.HEARTBEAT_ACK)
_BACKOFF_FIRST_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0
# Connections a direct port holds before they authenticate (node/admission.py): peers and
# clients do in milliseconds, and each one waiting holds a file descriptor of the node's. A
# direct port serves a few peers (`connect_to` links, `cpnode-submit --direct`), each dialing
# once and seldom at the same moment: 64 in flight at once is far more than they need, and a
# few descriptors of the node's thousands. When all are held, the oldest of the address
# holding the most gives way to a newcomer.
_MAX_UNAUTHENTICATED: Final = 64
# A peer's result this long (or with this many JSON values) is checked in a thread, not on the
# event loop: its byte array by the vectorised codec, which lets go of the GIL.
_CHECK_ON_LOOP_BYTES: Final = 64 * 1024

_link_numbers = itertools.count(1)
# Whoever reaches a direct port can offer wrong tokens as fast as it connects: a line each
# would fill the log's disk.
_REFUSED_TOKENS = Throttle(10.0)
_BAD_HANDSHAKES = Throttle(10.0)  # no token, or something else in its place


class DirectError(CpnodeError, ConnectionError):
    """A direct link could not be opened or was lost."""


class DirectLinkRefused(DirectError):
    """The peer answered `Invalid token`."""


class _Phase(enum.Enum):
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSED = "closed"


class DirectConnection(asyncio.Protocol):
    """One direct link's bytes, whichever side dialed.

    `on_task(link, id, payload)` runs an `AssignTask` from the peer (None: answered with an
    `Error`); `on_result(id, payload)` takes a `TaskResult` for a task this side sent;
    `on_made(link)` is told when the connection is made (over TLS: once the handshake
    succeeded; a link whose handshake fails is never made, nor lost). `slot`: the link's place
    among a listener's connections not authenticated yet (node/admission.py), given back when
    it opens or ends; taking it back closes the link at once. `plain_name`: (the name dialed,
    the `tls` mode) of a dialer's plain-TCP link, whose token goes out only once the address
    reached is known to be local (`plain_peer_refusal`).
    """

    def __init__(
        self,
        *,
        token: str,
        dialer: bool,
        max_frame_bytes: int,
        on_task: Callable[[DirectConnection, str, bytes], None] | None = None,
        on_result: Callable[[str, bytes], None] | None = None,
        on_made: Callable[[DirectConnection], None] | None = None,
        what: str = "direct link",
        slot: Slot | None = None,
        plain_name: tuple[str, str] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.number = next(_link_numbers)
        # Inserted at the start of every id this link hands to the dispatcher; raw UTF-8 in
        # JSON, so it is added and removed in the bytes.
        self.prefix = f"⇄{self.number}⇄"
        self._prefix_bytes = self.prefix.encode()
        self._token = token.encode()
        self.dialer = dialer
        self.phase = _Phase.AUTHENTICATING
        self._decoder = FrameDecoder(max_frame_bytes)
        self._on_task = on_task
        self._on_result = on_result
        self._on_made = on_made
        self.what = what
        self._slot = slot
        self._plain_name = plain_name
        self.transport: asyncio.Transport | None = None
        self._writer: PacedWriter | None = None
        self._reader: PacedReader = None  # type: ignore[assignment]  # set on connect
        self.peer = "?"
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.last_bytes_at = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self.tasks_run = 0
        self.results_received = 0

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._writer = PacedWriter(self.transport)  # type: ignore[arg-type]
        self._reader = PacedReader(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = format_address(str(peer[0]), int(peer[1]))
        if self.dialer:
            if self._plain_name is not None and (
                refusal := plain_peer_refusal(*self._plain_name, peer)
            ):
                self._end(DirectError(f"{self.what} {self.peer}: {refusal}"))
                transport.abort()  # type: ignore[attr-defined]
                return
            transport.write(frame(self._token))  # type: ignore[attr-defined]
        if self._slot is not None:
            if not self._slot.held:
                # Taken back while its TLS handshake ended in the same turn of the loop: the
                # listener's cancel comes next; no token is read on a link closed anyway.
                self.abort()
                return
            self._slot.evict = self.abort
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(_AUTH_TIMEOUT_S, self._auth_expired)
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.phase is _Phase.CLOSED:
            return
        self._reader.received(len(data))  # a burst is handled 256 KiB per turn of the loop
        self.last_bytes_at = time.monotonic()
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as error:
            # Before the handshake, from whoever reaches the port: as often as it connects.
            if count := self._trouble_count() if self.phase is _Phase.AUTHENTICATING else 1:
                log.warning("%s %s: %s; closing%s", self.what, self.peer, error, more_since(count))
            self.close()
            return
        for payload in payloads:
            if self.phase is _Phase.AUTHENTICATING:
                self._authenticate(payload)
            elif self.phase is _Phase.OPEN:
                self._received(payload)
        if self.phase is _Phase.AUTHENTICATING and self._decoder.expecting > _TOKEN_FRAME_LIMIT:
            # Not a token (a TLS handshake read as a length asks for ~370 MB): never buffer it.
            if count := self._trouble_count():
                log.warning(
                    "%s %s: first frame is not a token; closing%s", self.what, self.peer,
                    more_since(count),
                )  # fmt: skip
            self._fail(DirectError(f"{self.what} {self.peer}: first frame is not a token"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(DirectError(f"{self.what} {self.peer} closed" + (f": {exc}" if exc else "")))

    # --- handshake -----------------------------------------------------------------------------

    def _authenticate(self, payload: bytes) -> None:
        if self.dialer:
            answer = payload.strip()
            if answer == _OK:
                self._open()
            elif answer == _INVALID_TOKEN:
                self._fail(DirectLinkRefused(f"{self.what} {self.peer} answered Invalid token"))
            else:
                self._fail(DirectError(f"{self.what} {self.peer} answered {answer[:60]!r}"))
            return
        try:
            offered = payload.decode("utf-8").strip().encode()
        except UnicodeDecodeError:
            offered = b""
        if offered and hmac.compare_digest(offered, self._token):
            self._write(frame(_OK))
            self._open()
            log.info("%s from %s opened", self.what, self.peer)
        else:
            if count := _REFUSED_TOKENS.hit():
                log.warning(
                    "%s from %s: invalid token; refused and closed%s", self.what, self.peer,
                    more_since(count),
                )  # fmt: skip
            self._write(frame(_INVALID_TOKEN))
            self._fail(DirectLinkRefused(f"{self.what} from {self.peer}: invalid token"))

    def _open(self) -> None:
        self.phase = _Phase.OPEN
        self._release_slot()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.opened.done():
            self.opened.set_result(None)

    def _release_slot(self) -> None:
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    def _trouble_count(self) -> int:
        """How many handshake troubles the line due now covers (0: none due): throttled for
        links others dial in on (anyone reaching the port can repeat them at will), never for
        this node's own dials, whose troubles an operator must always see."""
        return 1 if self.dialer else _BAD_HANDSHAKES.hit()

    def _auth_expired(self) -> None:
        self._timer = None
        if self.phase is _Phase.AUTHENTICATING:
            if count := self._trouble_count():
                log.warning(
                    "%s %s: no handshake within %.0f s%s", self.what, self.peer, _AUTH_TIMEOUT_S,
                    more_since(count),
                )  # fmt: skip
            self._fail(DirectError(f"{self.what} {self.peer}: no handshake in time"))

    # --- after the handshake -------------------------------------------------------------------

    def _received(self, payload: bytes) -> None:
        if payload.startswith(b'{"AssignTask":'):
            self._run(payload)
            return
        if payload.startswith(b'{"TaskResult":'):
            self._result(codec.peek_id(payload), payload)
            return
        if codec.costly_to_parse(payload):
            log.warning(
                "%s %s: skipping a %d-byte frame: too many JSON values to parse on the event loop",
                self.what, self.peer, len(payload),
            )  # fmt: skip
            return
        try:
            message = codec.decode(payload)
        except RemoteProtocolError as error:
            log.warning("%s %s: skipping a malformed frame: %s", self.what, self.peer, error)
            return
        if isinstance(message, m.Heartbeat):
            self._write(_ACK_FRAME)
        elif isinstance(message, m.Disconnect):
            self.close()
        elif isinstance(message, m.AssignTask):  # valid JSON in another form than serde's
            self._start(message.id, payload)
        elif isinstance(message, m.TaskResult):
            self._result(message.id, payload)
        elif not isinstance(message, m.HeartbeatAck):
            log.debug("%s %s: ignoring %s", self.what, self.peer, type(message).__name__)

    def _result(self, ident: str | None, payload: bytes) -> None:
        if ident is not None and self._on_result is not None:
            self.results_received += 1
            self._on_result(ident, payload)
        else:
            log.debug("%s %s: result nobody waits for", self.what, self.peer)

    def _run(self, payload: bytes) -> None:
        try:
            ident = codec.peek(payload).id
        except RemoteProtocolError as error:
            ident, why = None, f": {error}"
        else:
            why = ""
        if ident is None:
            log.warning(
                "%s %s: skipping an AssignTask whose id cannot be read%s", self.what, self.peer, why
            )
            return
        self._start(ident, payload)

    def _start(self, ident: str, payload: bytes) -> None:
        if self._on_task is None:
            refusal = m.Error("this end of the direct link runs no tasks")
            self._write(frame(codec.task_result_payload(ident, refusal)))
            return
        self.tasks_run += 1
        self._on_task(self, ident, payload)

    def rename(self, ident: str, payload: bytes) -> tuple[str, bytes]:
        """The id and payload the dispatcher gets: the id with this link's prefix."""
        if payload.startswith(_ASSIGN_HEAD):
            head = len(_ASSIGN_HEAD)
            return self.prefix + ident, _ASSIGN_HEAD + self._prefix_bytes + payload[head:]
        message = codec.decode(payload)  # rare: a payload our encoder would not have written
        assert isinstance(message, m.AssignTask)
        renamed = m.AssignTask(self.prefix + ident, message.task)
        return renamed.id, codec.encode_payload(renamed)

    def send_results(self, blob: Frames, ids: list[str]) -> None:
        """The dispatcher's reply sink: result frames with renamed ids (`ids`, in order)."""
        count = len(ids)
        if self.phase is not _Phase.OPEN:
            log.debug("%s %s: closed; dropping %d results", self.what, self.peer, count)
            return
        if type(blob) is memoryview:  # one big frame mapped from a segment: rare here
            blob = blob.tobytes()
        out: list[bytes] = []
        position = 0
        head, prefix = len(_RESULT_HEAD), self._prefix_bytes
        for _ in range(count):
            size = int.from_bytes(blob[position : position + 4], "big")
            payload = blob[position + 4 : position + 4 + size]
            position += 4 + size
            if payload.startswith(_RESULT_HEAD + prefix):
                out.append(frame(_RESULT_HEAD + payload[head + len(prefix) :]))
            else:  # rare: decode and encode again
                message = codec.decode(payload)
                assert isinstance(message, m.TaskResult)
                original = message.id.removeprefix(self.prefix)
                out.append(frame(codec.task_result_payload(original, message.result)))
        self._write(b"".join(out))

    def send_task(self, payload: bytes) -> None:
        """Write an `AssignTask` payload to the peer."""
        self._write(frame(payload))

    def heartbeat(self) -> None:
        self._write(_HEARTBEAT_FRAME)

    # --- closing -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport, writer = self.transport, self._writer
        if transport is not None and writer is not None and not transport.is_closing():
            writer.write(data)

    def _fail(self, error: DirectError) -> None:
        self._end(error)
        if self._writer is not None:
            self._writer.close()  # what was written before goes out first
        elif self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        self._fail(DirectError(f"{self.what} {self.peer} closed here"))

    def abort(self) -> None:
        self._end(DirectError(f"{self.what} {self.peer} aborted here"))
        if self.transport is not None:
            self.transport.abort()

    def _end(self, error: DirectError) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.phase = _Phase.CLOSED
        self._release_slot()
        if not self.opened.done():
            self.opened.set_exception(error)
            self.opened.exception()  # read here: nobody may be waiting any more
        if not self.closed.done():
            self.closed.set_result(None)


# --- dialing -------------------------------------------------------------------------------------


async def dial(
    host: str,
    port: int,
    *,
    token: str,
    tls_mode: str,
    tls: ClientTls | None,
    timeout: float,
    max_frame_bytes: int,
    on_task: Callable[[DirectConnection, str, bytes], None] | None = None,
    on_result: Callable[[str, bytes], None] | None = None,
    what: str = "direct peer",
    server_name: str | None = None,
) -> DirectConnection:
    """Connect to a direct port and authenticate; DirectError (DirectLinkRefused for a wrong
    token, TlsVerifyError for a certificate) when that fails. `server_name`: the name `host`
    was resolved from, which the TLS rule and the certificate check go by (default `host`)."""
    loop = asyncio.get_running_loop()
    name = server_name or host
    use_tls = wants_tls(name, tls_mode)
    if use_tls and tls is None:
        raise DirectError(f"{what} {format_address(name, port)} needs TLS but has no CA set up")

    def factory() -> DirectConnection:
        return DirectConnection(
            token=token, dialer=True, max_frame_bytes=max_frame_bytes,
            on_task=on_task, on_result=on_result, what=what,
            plain_name=None if use_tls else (name, tls_mode),
        )  # fmt: skip

    where = format_address(name, port)
    connection: DirectConnection | None = None
    try:
        async with asyncio.timeout(timeout):
            _, connection = await loop.create_connection(
                factory, host, port,
                ssl=tls.context if use_tls and tls else None,
                server_hostname=name if use_tls else None,
            )  # fmt: skip
            await asyncio.shield(connection.opened)
    except ssl.SSLCertVerificationError as error:
        assert tls is not None
        raise await verify_failure(error, what, name, port, tls.trust) from None
    except DirectError:
        raise
    except TimeoutError:
        if connection is not None:
            connection.abort()
        raise DirectError(f"{what} {where}: no link within {timeout:g} s") from None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise DirectError(f"{what} {where}: {reason}") from None
    except BaseException:
        if connection is not None:
            connection.abort()
        raise
    return connection


# --- serving -------------------------------------------------------------------------------------


class DirectServer:
    """A node's `direct_port`: every authenticated link runs what its peer sends."""

    def __init__(self, config: Config, join: JoinInfo, dispatcher: Dispatcher) -> None:
        self.config = config
        self.join = join
        self.dispatcher = dispatcher
        self.links: set[DirectConnection] = set()
        self.admission = Admission(_MAX_UNAUTHENTICATED, "direct links")
        self._listener: TlsListener | None = None
        self.port = 0
        self.tls = self.server_tls()

    def server_tls(self) -> ServerTls:
        """The certificate for TLS links: `cert_path`/`key_path` (made self-signed when both
        are missing); without them, plain links only (unless tls is "always": ConfigError)."""
        config = self.config
        if config.tls == "never" or (config.cert_path is None and config.key_path is None):
            if config.tls == "always":
                raise ConfigError(
                    'config: tls is "always" and `direct_port` is set, so `cert_path` and '
                    "`key_path` must name the certificate its direct links present"
                )
            return ServerTls(None, config.tls)
        cert_path = config.cert_path or "node_cert.pem"
        key_path = config.key_path or "node_key.pem"
        ensure_certificate(cert_path, key_path, [config.direct_host, "localhost", "127.0.0.1"])
        return ServerTls(server_tls(cert_path, key_path), config.tls)

    async def start(self) -> None:
        port = self.config.direct_port
        assert port is not None
        tls = self.tls
        self._listener = await TlsListener.start(
            self._connection, self.config.direct_host, port,
            context=tls.context, mode=tls.mode, what="direct links", admission=self.admission,
        )  # fmt: skip
        self.port = int(self._listener.sockets[0].getsockname()[1])
        if tls.context is None:
            served = "plain TCP"
        elif tls.mode == "always":  # the listener refuses a peer that does not start TLS
            served = "TLS only"
        else:
            served = "TLS or plain TCP"
        log.info(
            "accepting direct links on %s (%s)",
            format_address(self.config.direct_host, self.port),
            served,
        )

    def _connection(self, slot: Slot | None) -> DirectConnection:
        return DirectConnection(
            token=self.join.token,
            dialer=False,
            max_frame_bytes=self.config.max_frame_bytes,
            on_task=self.run_task,
            on_made=self._made,
            what="direct link",
            slot=slot,
        )

    def _made(self, link: DirectConnection) -> None:
        # Kept from here, not from the factory: a link whose TLS handshake fails is never told
        # it was made or lost, and would stay here for good. (Its admission slot is the
        # listener's until then, given back when the handshake fails.)
        self.links.add(link)
        link.closed.add_done_callback(lambda _: self._closed(link))

    def _closed(self, link: DirectConnection) -> None:
        self.links.discard(link)
        if link.tasks_run:
            log.info("direct link from %s closed; it sent %d tasks", link.peer, link.tasks_run)

    def run_task(self, link: DirectConnection, ident: str, payload: bytes) -> None:
        """Hand a peer's task to the dispatcher; its result goes back on `link`."""
        hand_over(self.dispatcher, link, ident, payload)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None
        links = list(self.links)
        for link in links:
            link.close()
        if links:
            await asyncio.wait([link.closed for link in links], timeout=2.0)
        for link in links:
            if not link.closed.done():
                link.abort()


# --- lending a peer's capacity (connect_to) ------------------------------------------------------


class DirectPeer:
    """A dialed link kept open to one peer's direct port; takes overflow master tasks."""

    def __init__(
        self, address: str, config: Config, join: JoinInfo, dispatcher: Dispatcher
    ) -> None:
        self.address = address
        self.host, self.port = parse_address(address)
        self.config = config
        self.join = join
        self.dispatcher = dispatcher
        self.window = config.direct_window
        self._tls = (
            client_tls(config.ca_cert, config.ca_cert_path)
            if wants_tls(self.host, config.tls)
            else None
        )
        self._link: DirectConnection | None = None
        self._in_flight: dict[str, bytes] = {}
        self._peer_stopping = False  # it answers what it will not start: offer it nothing more
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._checking: set[asyncio.Future[bytes]] = set()  # big results read in a thread
        self.offloaded = 0

    @property
    def open(self) -> bool:
        return self._link is not None and self._link.phase is _Phase.OPEN

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def offer(self, ident: str, payload: bytes) -> bool:
        """Send a master task to the peer when the link is open and has room."""
        link = self._link
        if (
            link is None
            or link.phase is not _Phase.OPEN
            or self._peer_stopping
            or len(self._in_flight) >= self.window
        ):
            return False
        if ident in self._in_flight:
            return True
        self._in_flight[ident] = payload
        link.send_task(payload)
        self.offloaded += 1
        return True

    def _result(self, ident: str, payload: bytes) -> None:
        """The peer's answer to a master task: checked and written again in our encoder's
        form before it joins the outbox. The master drops a connection that sends a frame it
        cannot parse, and the outbox sends an unconfirmed result again on every connection, so
        one malformed result passed on as it came would keep this node from ever delivering
        anything (and the peer of a plain link need not even know the token). A task the peer
        did not start (it is draining) runs here."""
        task = self._in_flight.pop(ident, None)
        if task is None:
            return
        if payload.endswith(_NOT_STARTED_TAIL):  # the peer is draining and did not start it
            if not self._peer_stopping:
                self._peer_stopping = True
                log.info(
                    "direct peer %s is stopping: what it did not start runs here", self.address
                )
            self.dispatcher.run_locally(ident, task)
            return
        if len(payload) <= _CHECK_ON_LOOP_BYTES and not codec.costly_to_parse(payload):
            self.dispatcher.io_finished(ident, _peer_result(ident, payload, self.address))
            return
        loop = asyncio.get_running_loop()
        checking = loop.run_in_executor(None, _peer_result, ident, payload, self.address)
        self._checking.add(checking)
        checking.add_done_callback(functools.partial(self._checked, ident))

    def _checked(self, ident: str, checking: asyncio.Future[bytes]) -> None:
        self._checking.discard(checking)
        if checking.cancelled():
            return
        error = checking.exception()
        if error is not None:
            failure = m.Error(f"direct peer {self.address}: its result could not be read: {error}")
            result = frame(codec.task_result_payload(ident, failure))
        else:
            result = checking.result()
        self.dispatcher.io_finished(ident, result)

    async def _run(self) -> None:
        attempt = 0
        timeout = self.config.failover_timeout_ms / 1000
        while not self._closing:
            try:
                link = await dial(
                    self.host, self.port, token=self.join.token, tls_mode=self.config.tls,
                    tls=self._tls, timeout=timeout, max_frame_bytes=self.config.max_frame_bytes,
                    on_result=self._result, what="direct peer",
                )  # fmt: skip
            except DirectLinkRefused as error:
                log.error("%s; not dialing %s again", error, self.address)
                return
            except (DirectError, ConnectionError, OSError) as error:
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:
                    log.warning("cannot open a direct link to %s: %s", self.address, error)
                delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            attempt = 0
            self._link = link
            self._peer_stopping = False
            log.info(
                "direct link to %s open: it takes tasks this node has no room for", self.address
            )
            try:
                await self._keep(link, timeout)
            finally:
                self._link = None
                link.close()
                self._reclaim()
            if not self._closing:
                log.warning("direct link to %s lost; dialing again", self.address)

    async def _keep(self, link: DirectConnection, timeout: float) -> None:
        """Heartbeat; close a link whose peer sent nothing for two periods."""
        interval = timeout / 2
        while not link.closed.done():
            done, _ = await asyncio.wait({link.closed}, timeout=interval)
            if done:
                return
            if time.monotonic() - link.last_bytes_at > 2 * timeout:
                log.warning("direct peer %s silent for %.1f s; closing", self.address, 2 * timeout)
                return
            link.heartbeat()

    def _reclaim(self) -> None:
        """The link is gone: run its tasks here when safe to repeat, else answer them."""
        in_flight, self._in_flight = self._in_flight, {}
        for ident, payload in in_flight.items():
            if _is_idempotent(payload):
                self.dispatcher.run_locally(ident, payload)
            else:
                error = m.Error(f"direct peer {self.address} was lost while running this task")
                self.dispatcher.io_finished(ident, frame(codec.task_result_payload(ident, error)))
        if in_flight:
            log.warning(
                "direct link to %s lost with %d tasks in flight; re-run or answered here",
                self.address,
                len(in_flight),
            )

    async def close(self) -> None:
        self._closing = True
        log.info("direct peer %s ran %d tasks for this node", self.address, self.offloaded)
        if self._link is not None:
            self._link.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._checking:
            await asyncio.wait(set(self._checking))


def _peer_result(ident: str, payload: bytes, peer: str) -> bytes:
    """The `TaskResult` frame to deliver for `ident` from a peer's `payload`: its result in
    our encoder's form, or an `Error` saying what was wrong with it (a payload that is no
    `TaskResult` for `ident`, or not one the master could parse). Big byte arrays are read
    and written by the vectorised codec (see `_CHECK_ON_LOOP_BYTES`), and the frame is joined
    in one copy: `bytes.join` lets go of the GIL for big pieces, where each `+` of a 70 MB
    result held it, and so the event loop, for about 50 ms."""
    try:
        result = _read_peer_result(ident, payload)
    except (RemoteProtocolError, ByteArrayError) as error:
        log.warning("direct peer %s sent a malformed result for %.100r: %s", peer, ident, error)
        result = m.Error(f"direct peer {peer} sent a malformed result: {error}")
    if type(result) is not m.Bytes:
        return frame(codec.task_result_payload(ident, result))
    return frame_joined(
        [
            b'{"TaskResult":{"id":', codec.json_str(ident), b',"result":{"Bytes":',
            encode_byte_array(result.data), b"}}}",
        ]
    )  # fmt: skip


def _read_peer_result(ident: str, payload: bytes) -> m.Result:
    around = codec.around_blob(payload) if len(payload) > _CHECK_ON_LOOP_BYTES else None
    data: bytes | None = None
    if around is None:
        message = codec.decode(payload)
    else:
        value, start, end = around
        ((variant, body),) = value.items()  # the shape around_blob checked
        if variant != "TaskResult":
            raise RemoteProtocolError(f"expected a TaskResult, got {variant}")
        body["result"] = {"Bytes": []}
        message = codec.message_from_json(value)
        data = decode_byte_array(memoryview(payload)[start:end])
    if not isinstance(message, m.TaskResult):
        raise RemoteProtocolError(f"expected a TaskResult, got {type(message).__name__}")
    if message.id != ident:
        raise RemoteProtocolError(f"a TaskResult for id {message.id!r} in its place")
    return message.result if data is None else m.Bytes(data)


class Offloader:
    """The dispatcher's `offload` hook over every `connect_to` peer, in turn."""

    def __init__(self, peers: Iterable[DirectPeer]) -> None:
        self.peers = list(peers)
        self._turn = itertools.count()

    def __call__(self, ident: str, payload: bytes) -> bool:
        peers = self.peers
        start = next(self._turn) % len(peers)
        return any(peer.offer(ident, payload) for peer in peers[start:] + peers[:start])


# --- ConnectionInfo, as upstream meant it --------------------------------------------------------


class ConnectionRequests:
    """The `RequestConnection`s sent on the current master connection and not answered yet.

    A `ConnectionInfo` is acted on only when it answers one of them, once: dialing sends the
    cluster token, so a master may not aim a node at an address the node never asked for.
    Addresses are compared as host and port, an IP host as `ipaddress` writes it (an
    IPv4-mapped one as its IPv4 address), a name in lower case without a final dot; text that
    is no address only as it is.
    """

    def __init__(self) -> None:
        self._unanswered: list[tuple[str, int] | str] = []

    def sent(self, addresses: Iterable[str]) -> None:
        """A new master connection was asked for these; what an earlier one was asked is void."""
        self._unanswered = [_address_key(address) for address in addresses]

    def answer(self, addr: str) -> bool:
        """True when `addr` answers a request not answered yet (which it then answers)."""
        key = _address_key(addr)
        if key not in self._unanswered:
            return False
        self._unanswered.remove(key)
        return True


def _address_key(text: str) -> tuple[str, int] | str:
    try:
        host, port = parse_address(text)
    except ValueError:
        return text
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().removesuffix("."), port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return str(ip), port


async def _addresses_to_dial(
    host: str, port: int, policy: NetworkPolicy, timeout: float
) -> list[str]:
    """The addresses `host` resolves to (within `timeout`) that `policy` lets this node reach
    (the check a `Tcp` task passes), in the resolver's order; `NetworkRefused` naming the rule
    when there is none, OSError when `host` does not resolve. The addresses, not the name,
    are dialed: a second look-up could answer others."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    allowed = policy.filter(infos)
    if not allowed:
        raise OSError(f"{host} resolves to no address")
    return list(dict.fromkeys(str(info[4][0]) for info in allowed))


async def _dial_each(
    addresses: list[str], port: int, *, timeout: float, **options: Any
) -> DirectConnection:
    """`dial` the addresses in turn, all within `timeout`, until one links (as a name's
    connection would try each of its addresses); the last failure when none does. A refused
    token or certificate ends it: the peer answered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    failure: Exception = DirectError(f"no address to dial for port {port}")
    for address in addresses:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            return await dial(address, port, timeout=left, **options)
        except (DirectLinkRefused, TlsVerifyError):
            raise
        except DirectError as error:
            failure = error
    raise failure


async def accept_connection_info(
    info: m.ConnectionInfo,
    *,
    config: Config,
    join: JoinInfo,
    on_task: Callable[[DirectConnection, str, bytes], None],
    links: set[DirectConnection],
    listen_tls: ServerTls,
    policy: NetworkPolicy,
) -> DirectConnection | None:
    """Listen on `info.port` (on `direct_host`) and dial the host of `info.addr` on it; keep the
    first link that authenticates (within `failover_timeout_ms`), close the rest. None when
    neither did, or when `policy` (`network_allow`/`network_deny`) refuses that host: then
    nothing listens and nothing is dialed."""
    try:
        host, _ = parse_address(info.addr)
    except ValueError as error:
        log.warning("ConnectionInfo %r: %s; ignored", info.addr, error)
        return None
    timeout = config.failover_timeout_ms / 1000
    try:
        addresses = await _addresses_to_dial(host, info.port, policy, timeout)
    except OSError as error:  # TimeoutError included
        reason = (
            f"no address within {timeout:g} s"
            if isinstance(error, TimeoutError)
            else error.strerror or error
        )
        log.warning(
            "ConnectionInfo %s port %d: %s; no listener, no dial", info.addr, info.port, reason
        )
        return None
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[DirectConnection] = loop.create_future()

    def inbound(slot: Slot | None) -> DirectConnection:
        link = DirectConnection(
            token=join.token, dialer=False, max_frame_bytes=config.max_frame_bytes,
            on_task=on_task, what="direct link", slot=slot,
        )  # fmt: skip

        def opened(future: asyncio.Future[None]) -> None:
            if not future.exception() and not accepted.done():
                accepted.set_result(link)
            elif not future.exception():
                link.close()

        link.opened.add_done_callback(opened)
        return link

    tls = client_tls(config.ca_cert, config.ca_cert_path) if wants_tls(host, config.tls) else None
    started = loop.time()
    # Bounded like the direct port's (whoever reaches this port for the moment it listens
    # could hold a descriptor per connection until each one's token is due).
    admission = Admission(_MAX_UNAUTHENTICATED, "direct link (ConnectionInfo)")
    listener = await TlsListener.start(
        inbound, config.direct_host, info.port, context=listen_tls.context, mode=listen_tls.mode,
        what="direct link (ConnectionInfo)", admission=admission,
    )  # fmt: skip
    dialing = asyncio.ensure_future(
        _dial_each(
            addresses,
            info.port,
            token=join.token,
            tls_mode=config.tls,
            tls=tls,
            timeout=timeout,
            max_frame_bytes=config.max_frame_bytes,
            on_task=on_task,
            what="direct peer",
            server_name=host,
        )
    )
    winner: DirectConnection | None = None
    try:
        done, _ = await asyncio.wait(
            {accepted, dialing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if accepted in done:
            winner = accepted.result()
        elif dialing in done and dialing.exception() is None:
            winner = dialing.result()
        elif dialing in done:
            # Our dial failed; the peer may still dial us until the deadline.
            remaining = max(0.0, timeout - (loop.time() - started))
            done, _ = await asyncio.wait({accepted}, timeout=remaining)
            winner = accepted.result() if accepted in done else None
    finally:
        listener.close()
        await listener.wait_closed()
        if not dialing.done():
            dialing.cancel()
        await asyncio.gather(dialing, return_exceptions=True)
        if (
            not dialing.cancelled()
            and dialing.exception() is None
            and dialing.result() is not winner
        ):
            dialing.result().close()
        if not accepted.done():
            accepted.cancel()
    if winner is None:
        log.warning(
            "ConnectionInfo %s port %d: no direct link within %.1f s", info.addr, info.port, timeout
        )
        return None
    links.add(winner)
    winner.closed.add_done_callback(lambda _: links.discard(winner))
    log.info("direct link with %s open (ConnectionInfo)", winner.peer)
    return winner


# --- the client library --------------------------------------------------------------------------


class DirectClient:
    """Send tasks to a node's direct port and await their results (pushed, not polled).

    async with DirectClient.connect("127.0.0.1", 56000, token) as client:
        result = await client.run(Compute("1+2"))
    """

    def __init__(self, link: DirectConnection, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()
        self._waiting: dict[str, asyncio.Future[m.Result]] = {}

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        token: str,
        *,
        timeout: float = 10.0,
        tls: str = "auto",
        ca_cert: str | None = None,
        ca_cert_path: str | None = None,
        max_frame_bytes: int = 1 << 30,
    ) -> DirectClient:
        """Dial and authenticate; `DirectLinkRefused` for a wrong token, `DirectError` (or
        `TlsVerifyError`) when no link could be made, `ConfigError` for an unusable CA."""
        security = (
            client_tls(ca_cert, ca_cert_path, source="client") if wants_tls(host, tls) else None
        )
        holder: list[DirectClient] = []

        def on_result(ident: str, payload: bytes) -> None:
            holder[0]._result(ident, payload)

        link = await dial(
            host, port, token=token, tls_mode=tls, tls=security, timeout=timeout,
            max_frame_bytes=max_frame_bytes, on_result=on_result, what="node",
        )  # fmt: skip
        client = cls(link, timeout)
        holder.append(client)
        link.closed.add_done_callback(lambda _: client._lost())
        return client

    async def __aenter__(self) -> DirectClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _result(self, ident: str, payload: bytes) -> None:
        waiter = self._waiting.pop(ident, None)
        if waiter is None or waiter.done():
            return
        try:
            message = codec.decode(payload)
        except RemoteProtocolError as error:
            waiter.set_exception(DirectError(f"the node sent an unreadable result: {error}"))
            return
        if isinstance(message, m.TaskResult):
            waiter.set_result(message.result)

    def _lost(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            if not waiter.done():
                waiter.set_exception(DirectError(f"the direct link to {self._link.peer} closed"))

    def submit(self, task: m.Task) -> tuple[str, asyncio.Future[m.Result]]:
        """Send `task`; returns its id and the future of its result."""
        if self._link.phase is not _Phase.OPEN:
            raise DirectError(f"the direct link to {self._link.peer} is closed")
        ident = f"{self._prefix}-{next(self._counter)}"
        waiter: asyncio.Future[m.Result] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        # A caller that stops waiting (a timeout) does not leave its waiter here for good.
        waiter.add_done_callback(lambda _: self._waiting.pop(ident, None))
        self._link.send_task(codec.encode_payload(m.AssignTask(ident, task)))
        return ident, waiter

    @property
    def pending(self) -> int:
        """Tasks sent and still awaited."""
        return len(self._waiting)

    async def run(self, task: m.Task, timeout: float | None = None) -> m.Result:
        """Send `task` and wait for its result (TimeoutError after `timeout` seconds)."""
        (result,) = await self.run_many([task], timeout)
        return result

    async def run_many(
        self, tasks: Iterable[m.Task], timeout: float | None = None
    ) -> list[m.Result]:
        """Send every task in one write and wait for all results, in task order."""
        waiters = [self.submit(task)[1] for task in tasks]
        async with asyncio.timeout(timeout if timeout is not None else self._timeout):
            return list(await asyncio.gather(*waiters))

    async def close(self) -> None:
        link = self._link
        if link.phase is _Phase.OPEN:
            link._write(codec.encode(m.DISCONNECT))
        link.close()
        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(link.closed)
        except TimeoutError:
            link.abort()


# --- the node's direct links -------------------------------------------------------------------


class DirectLinks:
    """Everything direct a node does: its `direct_port`, its `connect_to` peers, the links that
    `ConnectionInfo` opens, and the `RequestConnection`s it was asked to send (and which of
    them are still unanswered)."""

    def __init__(
        self, config: Config, join: JoinInfo, dispatcher: Dispatcher, policy: NetworkPolicy
    ) -> None:
        self.config = config
        self.join = join
        self.dispatcher = dispatcher
        self.policy = policy  # the I/O tasks' own: a ConnectionInfo's peer passes the same check
        # Built now, so a bad certificate setting is a config error before anything starts.
        self.server = DirectServer(config, join, dispatcher) if config.direct_port else None
        # Without a direct port there is no certificate: a `ConnectionInfo`'s listener then
        # takes plain links, unless tls is "always", where it takes none (as the port would).
        no_port = ServerTls(None, config.tls)
        self._listen_tls = self.server.tls if self.server is not None else no_port
        self.peers = [
            DirectPeer(address, config, join, dispatcher) for address in config.connect_to
        ]
        if self.peers:
            dispatcher.offload = Offloader(self.peers)
        self.request_connections: list[str] = []
        self.requests = ConnectionRequests()
        self.links: set[DirectConnection] = set()
        self._pending: set[asyncio.Task[DirectConnection | None]] = set()

    async def start(self) -> None:
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as error:
                log.error(
                    "cannot accept direct links on %s: %s; running without them",
                    format_address(self.config.direct_host, self.config.direct_port or 0),
                    error.strerror or error,
                )
        for peer in self.peers:
            peer.start()

    def registered(self, send: Callable[[m.Message], None]) -> None:
        """Connected to a master: ask it for the connections we were asked to request."""
        self.requests.sent(self.request_connections)
        for address in self.request_connections:
            send(m.RequestConnection(address))

    def connection_info(self, info: m.ConnectionInfo, *, registered: bool) -> None:
        """The master's answer to a `RequestConnection`: open that link, in the background.
        `registered`: the master connection it came on has registered (a frame read together
        with the master's "OK" comes before that connection's requests were sent)."""
        if not (registered and self.requests.answer(info.addr)):
            log.warning(
                "ignoring a ConnectionInfo for %.200r: this node did not request it", info.addr
            )
            return
        on_task = functools.partial(hand_over, self.dispatcher)
        task = asyncio.ensure_future(
            accept_connection_info(
                info, config=self.config, join=self.join, on_task=on_task, links=self.links,
                listen_tls=self._listen_tls, policy=self.policy,
            )
        )  # fmt: skip
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_log_link_failure)

    async def close(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        for peer in self.peers:
            await peer.close()
        for link in list(self.links):
            link.close()
        if self.server is not None:
            await self.server.close()


def hand_over(dispatcher: Dispatcher, link: DirectConnection, ident: str, payload: bytes) -> None:
    """Queue a peer's task under the link's prefix; its result goes back on `link`. A task the
    renaming cannot read is answered `Error` at once."""
    try:
        internal, renamed = link.rename(ident, payload)
    except (RemoteProtocolError, AssertionError) as error:
        failure = m.Error(f"malformed task: {error}")
        link._write(frame(codec.task_result_payload(ident, failure)))
        return
    dispatcher.accept(internal, renamed, reply=link.send_results)


def _log_link_failure(task: asyncio.Task[DirectConnection | None]) -> None:
    """A link opened for a `ConnectionInfo` runs in the background: say why it failed."""
    if not task.cancelled() and task.exception() is not None:
        log.error("the direct link the master told us of failed: %s", task.exception())
