"""`HttpRequest`, `Tcp` and `Udp` tasks, run as coroutines in the supervisor's event loop.

    Dispatcher.accept ──io_runner = IoTaskRunner.submit(id, payload)──▶ waiting (FIFO)
        ──at most `io_concurrency` at once──▶ decode ──▶ HTTP GET | TCP exchange | UDP exchange
            every target address ──NetworkPolicy (network_allow / network_deny)──▶ or Error
        ──▶ Response | Bytes | Error ──▶ TaskResult frame ──▶ Dispatcher.io_finished(id, frame)

These tasks wait, they do not compute (DESIGN contract 3), so they stay out of the worker
processes. A task that waits for its turn costs one deque entry, not a coroutine, so a burst of
100,000 slow URLs never delays a heartbeat. Each task runs within `task_timeout_ms` (from when
it starts, not from when it was queued) and is answered exactly once, with `Error` naming the
reason when it fails. On `close()` tasks still running are cancelled without an answer: the
node is stopping and the master re-queues what it did not get.

Where a task may go: every address a target resolves to is checked against `network_allow` and
`network_deny`; the most specific matching rule decides (deny wins a tie) and an address no rule
matches is refused. HTTP checks every connection it opens (redirects included) in the socket
factory, and host names in the resolver so the refusal names the rule.

Internet role: every port of `internet_ports` is reserved at start-up for TCP (a socket bound
with SO_REUSEADDR, never listening: a listening socket would stop connections from leaving its
port on Linux) and for UDP (a socket that `Udp` tasks send from). `Tcp` tasks connect from those
ports in turn (SO_REUSEADDR + bind before connect; a port already talking to the same target is
waited for, and the connection ends with a reset so the port is free for that target again at
once); `Udp` tasks send from those sockets in turn, and replies are matched to the waiting
task by the address they come from. Both are IPv4 ports, bound on 0.0.0.0 as upstream binds
them; IPv6 targets use a port of the kernel's choice.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import errno
import functools
import ipaddress
import itertools
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

import aiohttp
import orjson
import webencodings
from aiohttp.abc import AbstractResolver, ResolveResult

from node.config import Config, parse_address
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import RemoteProtocolError
from node.protocol.framing import frame, frame_joined
from shm.bytesjson import ByteArrayError, encode_byte_array
from shm.segments import read_spilled, spilled
from workers.storage import BLOB_FAST_PATH_BYTES, decode_blob_task, decode_blob_task_in_any_form

__all__ = ["InternetPorts", "IoTaskRunner", "NetworkPolicy", "NetworkRefused"]

log = logging.getLogger("cpnode.io")

# Payloads and bodies above this are decoded and encoded in a thread (a 1 MiB Tcp task took
# 14.5 ms of the event loop with orjson); below it a thread hop costs more than the work, but
# for a payload with more values than `codec.costly_to_parse` allows on the loop.
_OFFLOAD_BYTES: Final = BLOB_FAST_PATH_BYTES
_EMPTY_ARRAY_END: Final = b"[]}}}"  # how an empty `Bytes` result payload ends
_MAX_REDIRECTS: Final = 10  # as reqwest, which upstream uses
_UDP_MAX_DATAGRAM: Final = 65535
_PORT_BUSY: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkRefused(OSError):
    """A target address is refused by `network_allow`/`network_deny`; the message names the rule."""


class NetworkPolicy:
    """Which addresses network tasks may reach: the most specific matching rule decides."""

    def __init__(self, allow: Iterable[str], deny: Iterable[str]) -> None:
        rules: list[tuple[IpNetwork, bool]] = [(ipaddress.ip_network(n), True) for n in allow]
        rules += [(ipaddress.ip_network(n), False) for n in deny]
        # Longest prefix first; at equal length deny first, so the first match decides.
        rules.sort(key=lambda rule: (-rule[0].prefixlen, rule[1]))
        self._rules = rules

    def refusal(self, address: str | IpAddress) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        given = _unmapped(address)
        # Linux connects 0.0.0.0 to 127.0.0.1 and :: to ::1: judge them as loopback.
        ip = _LOOPBACK[given.version] if given.is_unspecified else given
        shown = f"{given} (which reaches {ip})" if ip is not given else str(ip)
        for network, allowed in self._rules:
            if ip.version == network.version and ip in network:
                return None if allowed else f"{shown} is refused by network_deny {network}"
        return f"{shown} is in no network of network_allow"

    def check(self, address: str | IpAddress) -> None:
        """Raise `NetworkRefused` when `address` may not be reached."""
        reason = self.refusal(address)
        if reason is not None:
            raise NetworkRefused(errno.EACCES, reason)

    def filter(self, infos: list[Any]) -> list[Any]:
        """Keep the getaddrinfo entries that may be reached; `NetworkRefused` when none may."""
        allowed = [info for info in infos if self.refusal(info[4][0]) is None]
        if infos and not allowed:
            self.check(infos[0][4][0])
        return allowed


def _unmapped(address: str | IpAddress) -> IpAddress:
    """`address` as an address; ::ffff:169.254.169.254 reaches 169.254.169.254, so an
    IPv4-mapped one is judged as the IPv4 address it is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_LOOPBACK: Final = {4: ipaddress.ip_address("127.0.0.1"), 6: ipaddress.ip_address("::1")}


class _PolicyResolver(AbstractResolver):
    """aiohttp's host-name resolution through the loop's getaddrinfo, filtered by the policy."""

    def __init__(self, policy: NetworkPolicy) -> None:
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, family=family)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"{host} resolves to no address")
        return [
            ResolveResult(
                hostname=host,
                host=str(info[4][0]),
                port=int(info[4][1]),
                family=info[0],
                proto=info[2],
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for info in self._policy.filter(infos)
        ]

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------------------- Internet role


class _UdpPort(asyncio.DatagramProtocol):
    """One `internet_ports` UDP socket; replies go to the oldest task waiting on their sender."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None
        self._waiting: dict[tuple[str, int], collections.deque[asyncio.Future[bytes]]] = {}
        self._sending: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, data: bytes, key: tuple[str, int], waiter: asyncio.Future[bytes]) -> None:
        """Send `data` to `key` for `waiter`, which gets the error if the send fails (the
        transport reports a failed send to `error_received`, from inside `sendto`)."""
        assert self.transport is not None
        self._sending = waiter
        try:
            self.transport.sendto(data, key)
        finally:
            self._sending = None

    def error_received(self, exc: Exception) -> None:
        waiter = self._sending
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        else:  # an ICMP error for an earlier datagram: the socket names no sender
            log.debug("UDP port %d: %s", self.port, exc)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        queue = self._waiting.get((str(addr[0]), int(addr[1])))
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(data)
                return
        log.debug("UDP port %d: dropped a datagram from %s nobody waits for", self.port, addr)

    def busy_toward(self, key: tuple[str, int]) -> bool:
        return bool(self._waiting.get(key))

    def expect(self, key: tuple[str, int]) -> asyncio.Future[bytes]:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, collections.deque()).append(waiter)
        return waiter

    def forget(self, key: tuple[str, int], waiter: asyncio.Future[bytes]) -> None:
        queue = self._waiting.get(key)
        if queue is not None:
            if waiter in queue:
                queue.remove(waiter)
            if not queue:
                del self._waiting[key]


class InternetPorts:
    """The `internet_ports` of an Internet node: TCP ports reserved, UDP sockets open."""

    def __init__(self) -> None:
        self.tcp: list[tuple[int, socket.socket]] = []
        self.udp: list[_UdpPort] = []
        self._tcp_turn = itertools.count()
        self._udp_turn = itertools.count()
        self._tcp_busy: set[tuple[int, tuple[str, int]]] = set()
        self._tcp_freed: list[asyncio.Future[None]] = []

    @classmethod
    async def bind(cls, ports: Iterable[int]) -> InternetPorts:
        """Bind every port for TCP and UDP; log which bound and which failed (and why)."""
        self = cls()
        loop = asyncio.get_running_loop()
        failed: list[str] = []
        for port in ports:
            reserve = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reserve.bind(("0.0.0.0", port))
            except OSError as error:
                reserve.close()
                failed.append(f"TCP {port} ({error.strerror or error})")
            else:
                self.tcp.append((port, reserve))
            try:
                _, protocol = await loop.create_datagram_endpoint(
                    functools.partial(_UdpPort, port),
                    local_addr=("0.0.0.0", port),
                    family=socket.AF_INET,
                )
            except OSError as error:
                failed.append(f"UDP {port} ({error.strerror or error})")
            else:
                self.udp.append(protocol)
        bound = [f"TCP {port}" for port, _ in self.tcp] + [f"UDP {u.port}" for u in self.udp]
        log.info("internet_ports bound: %s", ", ".join(bound) or "none")
        if failed:
            log.warning("internet_ports failed to bind: %s", ", ".join(failed))
        return self

    async def claim_tcp(self, target: tuple[str, int], tried: set[int]) -> int | None:
        """The next TCP port in turn not yet `tried` and free toward `target`, now claimed;
        waits while every such port talks to `target`; None when all were tried.

        A port carries one connection per target at a time (the kernel refuses a second with
        the same four-tuple). Hand the port back with `release_tcp`.
        """
        while True:
            start = next(self._tcp_turn) % len(self.tcp)
            ordered = [port for port, _ in self.tcp[start:] + self.tcp[:start]]
            untried = [port for port in ordered if port not in tried]
            if not untried:
                return None
            for port in untried:
                if (port, target) not in self._tcp_busy:
                    self._tcp_busy.add((port, target))
                    return port
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._tcp_freed.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._tcp_freed:
                    self._tcp_freed.remove(waiter)

    def release_tcp(self, port: int, target: tuple[str, int]) -> None:
        self._tcp_busy.discard((port, target))
        waiters, self._tcp_freed = self._tcp_freed, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def udp_port(self, key: tuple[str, int]) -> _UdpPort | None:
        """The next UDP socket in turn, preferring one with no task waiting on `key`."""
        if not self.udp:
            return None
        start = next(self._udp_turn) % len(self.udp)
        ordered = self.udp[start:] + self.udp[:start]
        return next((u for u in ordered if not u.busy_toward(key)), ordered[0])

    def close(self) -> None:
        for _, reserve in self.tcp:
            reserve.close()
        for protocol in self.udp:
            if protocol.transport is not None:
                protocol.transport.close()
        self.tcp.clear()
        self.udp.clear()


class _OneDatagram(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


# ------------------------------------------------------------------------------- the runner


class _TaskFailed(Exception):
    """Ends a task with `Error(message)`."""


class IoTaskRunner:
    """Runs the I/O tasks the dispatcher hands over; answers each through `on_done`."""

    def __init__(self, config: Config, on_done: Callable[[str, bytes], None]) -> None:
        self.config = config
        self._on_done = on_done
        self.policy = NetworkPolicy(config.network_allow, config.network_deny)
        self._limit = config.io_concurrency
        self._timeout = config.task_timeout_ms / 1000 or None
        self._waiting: collections.deque[tuple[str, bytes]] = collections.deque()
        self._running: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.internet: InternetPorts | None = None
        self._closed = False
        self.started = 0
        self.finished = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        """Open the HTTP client; on Internet nodes bind `internet_ports`."""
        if self.config.role is m.Role.Internet and self.config.internet_ports:
            self.internet = await InternetPorts.bind(self.config.internet_ports)
        connector = aiohttp.TCPConnector(
            limit=self._limit,
            resolver=_PolicyResolver(self.policy),
            socket_factory=self._http_socket,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Tasks from different senders must not see each other's cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
        )

    async def close(self) -> None:
        """Cancel running tasks (unanswered: the node is stopping), close every socket."""
        self._closed = True
        self._waiting.clear()
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.internet is not None:
            self.internet.close()
            self.internet = None

    # --- scheduling ---------------------------------------------------------------------------

    def submit(self, ident: str, payload: bytes) -> None:
        """Queue an `AssignTask` payload; it starts as soon as fewer than the limit run."""
        if self._closed:
            return
        self._waiting.append((ident, payload))
        self._pump()

    def stop_starting(self) -> list[tuple[str, bytes]]:
        """Start a drain: drop the tasks that wait for a slot (the master takes them back) and
        return them, (id, payload); those running go on."""
        dropped = list(self._waiting)
        self._waiting.clear()
        return dropped

    def _pump(self) -> None:
        while self._waiting and len(self._running) < self._limit:
            ident, payload = self._waiting.popleft()
            task = asyncio.ensure_future(self._run(ident, payload))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            self.started += 1

    async def _run(self, ident: str, payload: bytes) -> None:
        try:
            result_frame = await self._execute(ident, payload)
        except Exception as exc:  # a bug here must still answer the task
            log.exception("I/O task %s failed unexpectedly", ident)
            result_frame = _result_frame(ident, m.Error(f"internal error: {exc!r}"))
        finally:
            # Its slot is free now (the done callback, which removes it too, runs only after
            # the `_pump` scheduled here: the next task would find every slot taken).
            self._running.discard(asyncio.current_task())
            if not self._closed:
                asyncio.get_running_loop().call_soon(self._pump)
        self.finished += 1
        self._on_done(ident, result_frame)

    async def _execute(self, ident: str, payload: bytes) -> bytes:
        if (
            spilled(payload) is not None
            or len(payload) > _OFFLOAD_BYTES
            or codec.costly_to_parse(payload)
        ):
            # A big byte array: read (from its segment, when it was spilled) and decoded in a
            # thread by the vectorised codec, which lets go of the GIL (orjson would hold it,
            # and the event loop, for 75 ms per MiB of data). A malformed array is answered
            # from the codec's own diagnosis, as a worker answers a big StoreData. A smaller
            # payload with too many values to parse on the loop goes the same way (see
            # `_decode_off_loop`).
            loop = asyncio.get_running_loop()
            try:
                task = await loop.run_in_executor(None, self._decode_off_loop, payload)
            except (ByteArrayError, RemoteProtocolError) as exc:
                return _result_frame(ident, m.Error(f"malformed task: {exc}"))
            except OSError as exc:
                return _result_frame(ident, m.Error(f"the task's payload was lost: {exc}"))
        else:
            try:
                message = codec.decode(payload)
            except RemoteProtocolError as exc:
                return _result_frame(ident, m.Error(f"malformed task: {exc}"))
            task = message.task if isinstance(message, m.AssignTask) else None
        try:
            async with asyncio.timeout(self._timeout):
                match task:
                    case m.HttpRequest(url):
                        return await self._http(ident, url)
                    case m.Tcp(addr, data):
                        return await _bytes_frame(ident, await self._tcp(addr, data))
                    case m.Udp(addr, data):
                        return await _bytes_frame(ident, await self._udp(addr, data))
                    case _:
                        return _result_frame(ident, m.Error("not an HttpRequest, Tcp or Udp task"))
        except _TaskFailed as failure:
            return _result_frame(ident, m.Error(str(failure)))
        except TimeoutError:
            text = f"no answer within {self.config.task_timeout_ms} ms (task_timeout_ms)"
            return _result_frame(ident, m.Error(f"{_describe(task)}: {text}"))
        except NetworkRefused as refused:
            return _result_frame(ident, m.Error(f"{_describe(task)}: {refused.strerror}"))
        except OSError as error:
            return _result_frame(ident, m.Error(f"{_describe(task)}: {_os_reason(error)}"))

    # --- HttpRequest --------------------------------------------------------------------------

    def _http_socket(self, info: Any) -> socket.socket:
        # Every connection aiohttp opens passes here, IP-literal URLs and redirects included.
        family, kind, proto, _, address = info
        self.policy.check(address[0])
        sock = socket.socket(family=family, type=kind, proto=proto)
        sock.setblocking(False)
        return sock

    async def _http(self, ident: str, url: str) -> bytes:
        what = f"HttpRequest {url}"
        session = self._session
        if session is None:
            raise _TaskFailed(f"{what}: the HTTP client is not running")
        limit = self.config.http_max_body_bytes
        try:
            async with session.get(url, max_redirects=_MAX_REDIRECTS) as response:
                length = response.content_length
                if length is not None and length > limit:
                    raise _TaskFailed(
                        f"{what}: body of {length} bytes is larger than http_max_body_bytes "
                        f"({limit})"
                    )
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise _TaskFailed(
                            f"{what}: body is larger than http_max_body_bytes ({limit})"
                        )
                    chunks.append(chunk)
                charset = response.charset
        except aiohttp.TooManyRedirects:
            raise _TaskFailed(f"{what}: more than {_MAX_REDIRECTS} redirects") from None
        except aiohttp.ClientConnectorCertificateError as error:
            raise _TaskFailed(
                f"{what}: the TLS certificate of {error.host} failed verification: "
                f"{error.certificate_error}"
            ) from None
        except aiohttp.ClientConnectorError as error:
            cause = error.os_error
            if isinstance(cause, NetworkRefused):
                raise _TaskFailed(f"{what}: {cause.strerror}") from None
            raise _TaskFailed(
                f"{what}: cannot connect to {error.host}:{error.port}: {_os_reason(cause)}"
            ) from None
        except aiohttp.InvalidURL as error:
            raise _TaskFailed(f"{what}: not a valid http(s) URL ({error})") from None
        except UnicodeError as error:  # a host name IDNA cannot encode (a label too long, ...)
            raise _TaskFailed(f"{what}: not a valid http(s) URL ({error})") from None
        except aiohttp.ClientError as error:
            raise _TaskFailed(f"{what}: {type(error).__name__}: {error}") from None
        body = b"".join(chunks)
        if len(body) > _OFFLOAD_BYTES:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, _response_frame, ident, body, charset)
        return _response_frame(ident, body, charset)

    def _decode_off_loop(self, payload: bytes) -> m.Task | None:
        """The task of a big, spilled or costly payload (run in a thread); None when it is no
        task.

        Below `BLOB_FAST_PATH_BYTES` a payload comes here only when `codec.costly_to_parse`
        finds more values in it than the loop may parse: a task holds that many only in a
        `Tcp`/`Udp` byte array, which `decode_blob_task_in_any_form` decodes without the GIL.
        Any other such payload is malformed or carries fields no master writes; the generic
        decoder answers it here as it did on the loop, but orjson (and the garbage collector,
        after thousands of arrays) holds the GIL while it parses, so for such a payload the
        loop still waits about as long as before (2-5 ms median for 64 KiB of such JSON,
        measured on a busy 2-core host; tens of ms when the collector runs)."""
        whole = read_spilled(self.config.shm_dir, payload)
        if len(whole) >= BLOB_FAST_PATH_BYTES:
            blob = decode_blob_task(whole)
        else:
            # Anything it cannot read, or finds wrong, is left to the generic decoder below,
            # which names what is wrong in its words, as it did on the loop.
            try:
                blob = decode_blob_task_in_any_form(whole)
            except (ByteArrayError, RemoteProtocolError):
                blob = None
        if blob is not None:
            return blob[1]
        message = codec.decode(whole)  # no blob task the vectorised codec reads: rare
        return message.task if isinstance(message, m.AssignTask) else None

    # --- Tcp and Udp --------------------------------------------------------------------------

    async def _resolve(self, addr: str, kind: socket.SocketKind) -> list[Any]:
        try:
            host, port = parse_address(addr)
        except ValueError as error:
            raise _TaskFailed(f"{_kind_name(kind)} {addr}: {error}") from None
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=kind)
        except socket.gaierror as error:
            what = f"{_kind_name(kind)} {addr}"
            raise _TaskFailed(f"{what}: cannot resolve {host}: {error}") from None
        return self.policy.filter(infos)

    async def _tcp(self, addr: str, data: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        infos = await self._resolve(addr, socket.SOCK_STREAM)
        failure: OSError = OSError(errno.EHOSTUNREACH, "no address to connect to")
        for family, _, _, _, address in infos:
            internet = self.internet
            try:
                if internet is not None and internet.tcp and family == socket.AF_INET:
                    sock, port = await self._tcp_connect_from(internet, address)
                else:
                    sock, port = await self._tcp_connect(family, address, None), None
            except OSError as error:
                failure = error
                continue
            try:
                await loop.sock_sendall(sock, data)
                return await loop.sock_recv(sock, self.config.tcp_read_bytes)
            finally:
                if port is not None:
                    # Close with a reset: no TIME_WAIT, so this port can reach this target
                    # again at once rather than a minute later.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.close()
                if internet is not None and port is not None:
                    internet.release_tcp(port, (str(address[0]), int(address[1])))
        raise failure

    async def _tcp_connect_from(
        self, internet: InternetPorts, address: Any
    ) -> tuple[socket.socket, int]:
        """Connect from the internet_ports, in turn; a port busy toward the target is skipped."""
        target = (str(address[0]), int(address[1]))
        tried: set[int] = set()
        while (port := await internet.claim_tcp(target, tried)) is not None:
            try:
                return await self._tcp_connect(socket.AF_INET, address, port), port
            except OSError as error:
                internet.release_tcp(port, target)
                if error.errno not in _PORT_BUSY:
                    raise
                tried.add(port)  # something else holds this port toward this target
            except BaseException:
                internet.release_tcp(port, target)
                raise
        raise OSError(
            errno.EADDRNOTAVAIL,
            f"every internet_ports port is in use toward {target[0]}:{target[1]}",
        )

    @staticmethod
    async def _tcp_connect(family: int, address: Any, port: int | None) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if port is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", port))
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _udp(self, addr: str, data: bytes) -> bytes:
        infos = await self._resolve(addr, socket.SOCK_DGRAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, "no address to send to")
        family, _, _, _, address = infos[0]
        if self.internet is not None and self.internet.udp:
            v4 = [info for info in infos if info[0] == socket.AF_INET]
            if v4:
                return await self._udp_from_port(v4[0][4], data)
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            _OneDatagram, remote_addr=address[:2], family=family
        )
        try:
            transport.sendto(data)
            return await protocol.reply
        finally:
            transport.close()

    async def _udp_from_port(self, address: Any, data: bytes) -> bytes:
        assert self.internet is not None
        key = (str(address[0]), int(address[1]))
        port = self.internet.udp_port(key)
        assert port is not None and port.transport is not None
        waiter = port.expect(key)
        try:
            port.send(data, key, waiter)
            return await waiter
        finally:
            port.forget(key, waiter)


def _kind_name(kind: socket.SocketKind) -> str:
    return "Tcp" if kind == socket.SOCK_STREAM else "Udp"


def _describe(task: m.Task | None) -> str:
    match task:
        case m.HttpRequest(url):
            return f"HttpRequest {url}"
        case m.Tcp(addr, _) | m.Udp(addr, _):
            return f"{type(task).__name__} {addr}"
    return "task"


def _os_reason(error: OSError | None) -> str:
    if error is None:
        return "unknown error"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error}"
    reason = error.strerror or str(error) or type(error).__name__
    if reason.startswith("Connect call failed") and error.errno:
        return os.strerror(error.errno)  # asyncio's text hides the reason the kernel gave
    return reason


async def _bytes_frame(ident: str, data: bytes) -> bytes:
    """The result frame of a `Bytes` answer. A big one (`tcp_read_bytes` allows 64 MiB) is
    encoded in a thread by the vectorised codec, which lets go of the GIL, inside the envelope
    the codec writes for an empty array."""
    if len(data) <= _OFFLOAD_BYTES // 4:  # about 3.6 bytes of JSON per byte
        return _result_frame(ident, m.Bytes(data))
    empty = codec.task_result_payload(ident, m.Bytes(b""))
    head, tail = empty[: -len(_EMPTY_ARRAY_END)], _EMPTY_ARRAY_END[2:]
    # Joined and framed in the thread too: for 64 MiB of data, 240 MB of JSON.
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: frame_joined((head, encode_byte_array(data), tail))
    )


def _result_frame(ident: str, result: m.Result) -> bytes:
    return frame(codec.task_result_payload(ident, result))


def _response_frame(ident: str, body: bytes, charset: str | None) -> bytes:
    """The result frame of a `Response`: the body as text, as upstream (reqwest's `text()`,
    encoding_rs) reads it: a byte-order mark wins, then the charset of Content-Type as the
    WHATWG Encoding Standard labels it (webencodings: "iso-8859-1" and "us-ascii" mean
    windows-1252, a label it does not know means UTF-8), else UTF-8; what does not decode
    becomes U+FFFD. Decoded and escaped a slice at a time: a thread doing it in one call would
    hold the GIL (and so the event loop) for as long as 16 MiB takes."""
    info, start = _text_codec(body, charset)
    if len(body) <= _TEXT_SLICE:  # most bodies: one slice, the codec frames it
        try:
            text = "".join(_text_slices(body, start, info))
        except (UnicodeError, TypeError, ValueError):  # a codec that fails its own way: UTF-8
            text = body.decode("utf-8", "replace")
        return _result_frame(ident, m.Response(text))
    empty = codec.task_result_payload(ident, m.Response(""))
    head, tail = empty[: -len(_EMPTY_TEXT_END)], _EMPTY_TEXT_END[1:]
    try:
        pieces = [_dumps(text)[1:-1] for text in _text_slices(body, start, info)]
    except (UnicodeError, TypeError, ValueError):
        pieces = [_dumps(text)[1:-1] for text in _text_slices(body, 0, _UTF_8)]
    return frame_joined([head, b'"', *pieces, tail])


def _text_slices(body: bytes, start: int, info: codecs.CodecInfo) -> Iterator[str]:
    """The text of `body[start:]`, a slice of the body at a time."""
    if info.name == "replacement":  # WHATWG's encoding for labels not to be decoded
        yield "\ufffd" if len(body) > start else ""
        return
    assert info.incrementaldecoder is not None
    decoder = info.incrementaldecoder(_C1_ERRORS if info.name in _WINDOWS_CODECS else "replace")
    view = memoryview(body)
    for offset in range(start, len(body), _TEXT_SLICE):
        final = offset + _TEXT_SLICE >= len(body)
        yield decoder.decode(view[offset : offset + _TEXT_SLICE], final)
    if start >= len(body):
        yield decoder.decode(b"", True)


def _text_codec(body: bytes, charset: str | None) -> tuple[codecs.CodecInfo, int]:
    """The codec to read `body` with, and where its text starts (after a byte-order mark)."""
    for mark, label in _BOMS:
        if body.startswith(mark):
            return webencodings.lookup(label).codec_info, len(mark)
    encoding = webencodings.lookup(charset) if charset else None
    return (encoding.codec_info if encoding is not None else _UTF_8), 0


def _c1_errors(error: UnicodeError) -> tuple[str, int]:
    """WHATWG's windows-* encodings decode the 0x80-0x9F bytes Python's codecs leave undefined
    as the C1 controls of the same number; any other byte that does not decode is U+FFFD."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    byte = error.object[error.start]
    return (chr(byte) if 0x80 <= byte <= 0x9F else "\ufffd"), error.start + 1


_C1_ERRORS: Final = "cpnode-whatwg-c1"
codecs.register_error(_C1_ERRORS, _c1_errors)
_WINDOWS_CODECS: Final = frozenset({"cp874", *(f"cp{n}" for n in range(1250, 1259))})
_UTF_8: Final = codecs.lookup("utf-8")
_BOMS: Final = ((b"\xef\xbb\xbf", "utf-8"), (b"\xfe\xff", "utf-16be"), (b"\xff\xfe", "utf-16le"))
_EMPTY_TEXT_END: Final = b'""}}}'  # how an empty `Response` result payload ends
_TEXT_SLICE: Final = 1 << 18
_dumps: Final = orjson.dumps
