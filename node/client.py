"""An asyncio client for a CPCluster master: authenticate, submit tasks, poll their results.

    Client.connect(join) ──TCP (TLS when the master is not local)──▶ master
      token                  ──▶ "OK" | "Invalid token"
      SubmitTask{id, task} … ──▶ TaskAccepted(id) …                          submit, submit_many
      GetTaskResult(id) …    ──▶ TaskResult{id, result} | DirectMessage("Pending") …  result(s)

The master handles one connection's frames in order and answers every request frame with exactly
one frame. So the connection keeps a FIFO of exchanges ("these N frames were written, N answers
are due") and hands answers to the oldest one as they arrive: any number of requests may be in
flight, from any number of coroutines, and 100,000 submits are one write and one exchange. A
caller that gives up (timeout, cancellation) leaves its exchange in the FIFO, so the answers that
still come keep lining up with the requests behind it.

Every wait has a deadline. An answer is overdue when the master has sent no byte for `timeout`
seconds (liveness is judged by bytes, so a large answer in transit is never overdue); a result is
overdue after the `timeout` given to `result`/`results`/`run`.

Errors, by fault and by whether retrying helps (all derive from `node.errors.CpnodeError`):
- `MasterUnreachable`: no connection (refused, unreachable, timed out); retry later.
- `AuthenticationError`: the master said `Invalid token`; fix join.json or CPCLUSTER_TOKEN.
- `ConnectionClosed`: the connection ended; tasks already accepted stay on the master.
- `MasterProtocolError`: the master sent something the protocol does not allow.
- `MasterTimeout`: the master stopped answering; the connection is closed.
- `ResultTimeout`: the task is not finished yet; it stays on the master, poll again later.

Whatever error ends a submission or a wait for results carries what the call had: `done`, the
results that arrived, and `pending`, the ids still without one, so that no result received is
lost and every task can be asked for again (`result(id)`) on a new connection.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import Any, Final, Self, cast

from node.config import JoinInfo, load_join, plain_peer_refusal
from node.errors import ConfigError, CpnodeError
from node.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    DirectMessage,
    FrameDecoder,
    FrameTooLarge,
    GetTaskResult,
    RemoteProtocolError,
    Result,
    SubmitTask,
    Task,
    TaskAccepted,
    TaskResult,
    decode,
    encode,
    frame,
)
from node.protocol.messages import DISCONNECT
from node.tls import ClientTls, client_tls, verify_failure, wants_tls

__all__ = [
    "DEFAULT_RESULT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "AuthenticationError",
    "Client",
    "ClientError",
    "ConnectionClosed",
    "MasterCertificateError",
    "MasterProtocolError",
    "MasterTimeout",
    "MasterUnreachable",
    "ResultTimeout",
]

DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_RESULT_TIMEOUT: Final = 60.0
DEFAULT_POLL_INTERVAL: Final = 0.05

# Polling starts this fast and doubles while nothing finishes, up to `poll_interval`.
_FIRST_POLL_INTERVAL: Final = 0.001
# Ids polled per write. A round stops at a chunk in which nothing finished (the tasks behind it,
# submitted later, are most likely still queued); every `_FULL_SWEEP_EVERY`th round polls them
# all, so a result that finished out of order is still seen within a few rounds.
_POLL_CHUNK: Final = 4096
_FULL_SWEEP_EVERY: Final = 8
_CLOSE_TIMEOUT: Final = 2.0

_AUTH_OK: Final = b"OK"
_AUTH_REJECTED: Final = b"Invalid token"
_PENDING_PAYLOAD: Final = b'{"DirectMessage":"Pending"}'
_PENDING: Final = DirectMessage("Pending")


class ClientError(CpnodeError):
    """Base of the errors the client raises.

    One that ends `submit_many`, `results`, `result` or `run` carries what the call had:
    `done`, the results that arrived, by id, and `pending`, the ids of the tasks still without
    one (submitted, perhaps not accepted; the master keeps the accepted ones as long as it
    keeps its tasks, so poll them again later). Both are empty for any other error.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.done: dict[str, Result] = {}
        self.pending: list[str] = []


class MasterUnreachable(ClientError, ConnectionError):
    """No connection to the master could be made; retrying later may help."""


class MasterCertificateError(MasterUnreachable):
    """The master's TLS certificate failed verification; the message says which and why."""


class AuthenticationError(ClientError):
    """The master rejected the token; retrying with the same token cannot help."""


class ConnectionClosed(ClientError, ConnectionError):
    """The connection to the master ended (closed by the master, or by this client)."""


class MasterProtocolError(ClientError):
    """The master sent a frame the protocol does not allow here; the connection is closed."""


class MasterTimeout(ClientError, TimeoutError):
    """The master stopped answering requests; the connection is closed."""


class ResultTimeout(ClientError, TimeoutError):
    """Some tasks had no result before the deadline; they stay on the master.

    `pending` lists their ids (poll them again later); `done` holds the results that did
    arrive, by id (as for every `ClientError`); `timeout` is the deadline that passed, in seconds.
    """

    def __init__(
        self, message: str, pending: list[str], done: dict[str, Result], timeout: float
    ) -> None:
        super().__init__(message)
        self.pending = pending
        self.done = done
        self.timeout = timeout


class _Phase(enum.Enum):
    """Where a connection is. It only moves forward: AUTHENTICATING → READY → CLOSED, or
    straight to CLOSED; requests are written in AUTHENTICATING (the token) and READY only."""

    AUTHENTICATING = "authenticating"
    READY = "ready"
    CLOSED = "closed"


def _retrieve(future: asyncio.Future[list[bytes]]) -> None:
    # An exchange whose caller gave up still gets an exception when the connection dies; reading
    # it here keeps asyncio from reporting "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class _Exchange:
    """Request frames already written whose `expected` answers are still arriving."""

    __slots__ = ("answers", "expected", "future")

    def __init__(self, expected: int, future: asyncio.Future[list[bytes]]) -> None:
        self.expected = expected
        self.answers: list[bytes] = []
        self.future = future
        future.add_done_callback(_retrieve)


class _MasterConnection(asyncio.Protocol):
    """One connection's bytes: frames out, answers matched in order to the exchanges in flight."""

    def __init__(self, address: str, max_frame_bytes: int) -> None:
        self.address = address
        self.phase = _Phase.AUTHENTICATING
        self.failure: ClientError | None = None
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._exchanges: deque[_Exchange] = deque()
        self._transport: asyncio.Transport | None = None
        self._lost: asyncio.Future[None] = self._loop.create_future()

    @property
    def received(self) -> int:
        """Bytes received so far: moves whenever the master is sending anything."""
        return self._decoder.received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.phase is _Phase.CLOSED:
            return
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as error:
            self.fail(MasterProtocolError(f"the master at {self.address} sent a {error}"))
            return
        exchanges = self._exchanges
        for payload in payloads:
            if not exchanges:
                self.fail(
                    MasterProtocolError(
                        f"the master at {self.address} sent a frame nothing asked for: "
                        f"{_preview(payload)}"
                    )
                )
                return
            exchange = exchanges[0]
            exchange.answers.append(payload)
            if len(exchange.answers) == exchange.expected:
                exchanges.popleft()
                if not exchange.future.done():
                    exchange.future.set_result(exchange.answers)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is not _Phase.CLOSED:
            reason = f": {exc}" if exc is not None else ""
            self._close_with(
                ConnectionClosed(f"the master at {self.address} closed the connection{reason}")
            )
        self._transport = None
        if not self._lost.done():
            self._lost.set_result(None)

    def authenticated(self) -> None:
        if self.phase is _Phase.AUTHENTICATING:
            self.phase = _Phase.READY

    def send(self, data: bytes, expected: int) -> _Exchange:
        """Write request frames whose `expected` answers the caller will await."""
        if self.phase is _Phase.CLOSED or self._transport is None:
            raise ConnectionClosed(
                f"the connection to the master at {self.address} is closed ({self.failure})"
            )
        exchange = _Exchange(expected, self._loop.create_future())
        self._exchanges.append(exchange)
        self._transport.write(data)
        return exchange

    def fail(self, error: ClientError) -> None:
        """Give up on the connection: every exchange in flight fails with `error`."""
        if self.phase is _Phase.CLOSED:
            return
        self._close_with(error)
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Say `Disconnect`, close, and wait (bounded) until the transport is gone."""
        transport = self._transport
        if transport is not None and self.phase is not _Phase.CLOSED:
            self._close_with(ConnectionClosed("closed by the client"))
            transport.write(encode(DISCONNECT))
            transport.close()
        elif transport is not None:
            transport.abort()
        if transport is None:
            return
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await asyncio.shield(self._lost)
        except TimeoutError:
            transport.abort()
            await asyncio.shield(self._lost)

    def _close_with(self, error: ClientError) -> None:
        """Enter CLOSED for the reason `error`; every exchange in flight fails with it."""
        self.phase = _Phase.CLOSED
        self.failure = error
        exchanges = self._exchanges
        while exchanges:
            future = exchanges.popleft().future
            if not future.done():
                future.set_exception(type(error)(*error.args))


def _preview(payload: bytes, limit: int = 120) -> str:
    text = payload[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(payload) > limit else ""))


def _transport_security(
    host: str, tls: str, ca_cert: str | None, ca_cert_path: str | None
) -> ClientTls | None:
    """The TLS settings for a master at `host`: none for loopback and private addresses (the
    upstream rule) unless `tls` is "always"; else a context checking the master's certificate
    against `ca_cert` (PEM text), `ca_cert_path` or the system roots. ConfigError when the CA
    cannot be used."""
    if tls not in ("auto", "always", "never"):
        raise ConfigError(f'tls must be "auto", "always" or "never", got {tls!r}')
    if not wants_tls(host, tls):
        return None
    return client_tls(ca_cert, ca_cert_path, source="client")


def _resolve_join(
    join: JoinInfo | str | os.PathLike[str] | None,
    host: str | None,
    port: int | None,
    token: str | None,
) -> JoinInfo:
    if join is None and host is not None and port is not None and token is not None:
        return JoinInfo(token, host, port)
    info = join if isinstance(join, JoinInfo) else load_join(join)
    if host is None and port is None and token is None:
        return info
    return JoinInfo(
        token if token is not None else info.token,
        host if host is not None else info.ip,
        port if port is not None else info.port,
    )


class _Connecting:
    """What `Client.connect` returns: await it, or use it as `async with`."""

    def __init__(self, opening: Callable[[], Coroutine[Any, Any, Client]]) -> None:
        self._opening = opening
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._opening().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._opening()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()


class Client:
    """One authenticated connection to a master, reused for every request.

    Open it with `await Client.connect(...)` or `async with Client.connect(...) as client`.
    Safe to share between coroutines of one event loop.
    """

    def __init__(self, connection: _MasterConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._prefix = uuid.uuid4().hex[:16]
        self._counter = itertools.count()

    @classmethod
    def connect(
        cls,
        join: JoinInfo | str | os.PathLike[str] | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        tls: str = "auto",
        ca_cert: str | None = None,
        ca_cert_path: str | None = None,
    ) -> _Connecting:
        """Connect to the master and authenticate.

        `join` is a `JoinInfo` or the path of a `join.json`; without it, `load_join()` finds one
        (`$CPCLUSTER_JOIN`, `./join.json`, `$CPCLUSTER_TOKEN`) unless `host`, `port` and `token`
        are all given. `host`, `port` and `token` override the join file's fields. `timeout`
        bounds the connection and authentication, and how long any later answer may keep the
        master silent. `tls` ("auto": only for a master that is not on a loopback or private
        address, "always", "never") and the CA to check its certificate against (`ca_cert` PEM
        text, else `ca_cert_path`, else the system roots) as in the node's config. Raises
        `ConfigError`, `MasterUnreachable` (`MasterCertificateError` for a certificate that
        failed verification), `AuthenticationError`, `ConnectionClosed`, `MasterProtocolError`
        or `MasterTimeout`.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        info = _resolve_join(join, host, port, token)
        security = _transport_security(info.ip, tls, ca_cert, ca_cert_path)
        return _Connecting(lambda: cls._open(info, timeout, max_frame_bytes, security, tls))

    @classmethod
    async def _open(
        cls,
        info: JoinInfo,
        timeout: float,
        max_frame_bytes: int,
        security: ClientTls | None,
        tls: str,
    ) -> Client:
        address = info.address
        loop = asyncio.get_running_loop()
        connection = _MasterConnection(address, max_frame_bytes)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: connection, info.ip, info.port,
                    ssl=security.context if security else None,
                    server_hostname=info.ip if security else None,
                )  # fmt: skip
        except ssl.SSLCertVerificationError as error:
            assert security is not None
            failure = await verify_failure(error, "master", info.ip, info.port, security.trust)
            raise MasterCertificateError(str(failure)) from None
        except TimeoutError:
            raise MasterUnreachable(
                f"cannot connect to the master at {address}: no answer within {timeout:g} s"
            ) from None
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
            in_handshake = security is not None and isinstance(
                error, ssl.SSLError | ConnectionResetError | ConnectionAbortedError
            )
            hint = (
                "the TLS handshake failed: does the master serve TLS on this port?"
                ' (tls "never" talks plain TCP)'
                if in_handshake
                else "is cpnode-master running there? check join.json"
            )
            raise MasterUnreachable(
                f"cannot connect to the master at {address}: {reason} ({hint})"
            ) from None
        transport = connection._transport
        if transport is None or transport.is_closing():
            raise MasterUnreachable(
                f"cannot connect to the master at {address}: it closed the connection at once"
            )
        peer = transport.get_extra_info("peername")
        if security is None and (refusal := plain_peer_refusal(info.ip, tls, peer)):
            transport.abort()  # not even a Disconnect to whoever answered there
            raise MasterUnreachable(f"cannot connect to the master at {address}: {refusal}")
        client = cls(connection, timeout)
        try:
            await client._authenticate(info.token)
        except BaseException:
            await connection.close()
            raise
        return client

    async def _authenticate(self, token: str) -> None:
        connection = self._connection
        exchange = connection.send(frame(token.encode("utf-8")), 1)
        try:
            async with asyncio.timeout(self._timeout):
                (answer,) = await exchange.future
        except TimeoutError:
            raise MasterTimeout(
                f"the master at {connection.address} did not answer the token "
                f"within {self._timeout:g} s"
            ) from None
        if answer.strip() == _AUTH_OK:
            connection.authenticated()
            return
        if answer.strip() == _AUTH_REJECTED:
            raise AuthenticationError(
                f"the master at {connection.address} rejected the token (it answered "
                "'Invalid token'); use the token of that master's join.json, or CPCLUSTER_TOKEN"
            )
        raise MasterProtocolError(
            f"the master at {connection.address} answered the token with {_preview(answer)}, "
            "expected 'OK' or 'Invalid token'"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """The master's `ip:port`."""
        return self._connection.address

    @property
    def closed(self) -> bool:
        return self._connection.phase is _Phase.CLOSED

    async def close(self) -> None:
        """Close the connection (idempotent). Requests still waiting fail with ConnectionClosed."""
        await self._connection.close()

    # --- requests --------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"

    async def _request(self, data: bytes, expected: int, what: str) -> list[bytes]:
        """Write request frames and wait for their `expected` answers, while the master talks."""
        connection = self._connection
        future = connection.send(data, expected).future
        heard = connection.received
        while True:
            await asyncio.wait((future,), timeout=self._timeout)
            if future.done():
                return future.result()
            if connection.received == heard:
                error = MasterTimeout(
                    f"the master at {connection.address} sent nothing for {self._timeout:g} s "
                    f"while {what}; it is overloaded or stuck"
                )
                connection.fail(error)
                raise error
            heard = connection.received

    def _violation(self, payload: bytes, expected: str) -> MasterProtocolError:
        """The master answered out of line: the answers no longer match the requests."""
        error = MasterProtocolError(
            f"the master at {self.address} answered {_preview(payload)} where {expected} "
            "was due; closing the connection"
        )
        self._connection.fail(error)
        return error

    def _decode(self, payload: bytes, expected: str) -> object:
        try:
            return decode(payload)
        except RemoteProtocolError as error:
            raise self._violation(payload, f"{expected} ({error})") from None

    async def submit(self, task: Task) -> str:
        """Queue `task` on the master; return its id once the master accepted it."""
        (task_id,) = await self.submit_many((task,))
        return task_id

    async def submit_many(self, tasks: Iterable[Task]) -> list[str]:
        """Queue many tasks with one write; return their ids in order once all are accepted.

        Raises `node.protocol.LocalProtocolError` (before anything is sent) for an object that
        is not a task.
        """
        ids: list[str] = []
        frames: list[bytes] = []
        for task in tasks:
            task_id = self._new_id()
            frames.append(encode(SubmitTask(task_id, task)))
            ids.append(task_id)
        if not ids:
            return ids
        what = f"waiting for TaskAccepted of {len(ids)} submitted task(s)"
        try:
            answers = await self._request(b"".join(frames), len(ids), what)
            for task_id, payload in zip(ids, answers, strict=True):
                # Our ids need no JSON escaping, so the master's answer has exactly this form.
                if payload != b'{"TaskAccepted":"' + task_id.encode() + b'"}':
                    expected = f"TaskAccepted({task_id!r})"
                    if self._decode(payload, expected) != TaskAccepted(task_id):
                        raise self._violation(payload, expected)
        except ClientError as error:
            # Some of them may be on the master: their ids are the only way to ask for them.
            error.pending = ids
            raise
        return ids

    async def _poll(self, ids: list[str], done: dict[str, Result]) -> int:
        """Ask once for each id's result; record the finished ones; return how many finished."""
        data = b"".join([encode(GetTaskResult(task_id)) for task_id in ids])
        answers = await self._request(data, len(ids), f"polling {len(ids)} result(s)")
        finished = 0
        for task_id, payload in zip(ids, answers, strict=True):
            if payload == _PENDING_PAYLOAD:
                continue
            expected = f"TaskResult({task_id!r}) or Pending"
            message = self._decode(payload, expected)
            if isinstance(message, TaskResult) and message.id == task_id:
                done[task_id] = message.result
                finished += 1
            elif message != _PENDING:
                raise self._violation(payload, expected)
        return finished

    async def results(
        self,
        ids: Iterable[str],
        timeout: float = DEFAULT_RESULT_TIMEOUT,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Result]:
        """Wait for the results of many tasks; return them by id, in the order of `ids`.

        Each round writes `GetTaskResult` for the ids still pending (in chunks) and reads the
        answers; the pause between rounds starts at 1 ms and doubles, up to `poll_interval`,
        while nothing finishes. `progress(done, total)` is called after every round. Raises
        `ResultTimeout` when `timeout` seconds pass first; that error, or any other
        `ClientError` that ends the wait (the connection lost, say), carries the results that
        did arrive (`done`) and the ids still without one (`pending`).
        """
        deadline = asyncio.get_running_loop().time() + timeout
        return await self._collect(
            list(dict.fromkeys(ids)), deadline, timeout, poll_interval, progress
        )

    async def _collect(
        self,
        wanted: list[str],
        deadline: float,
        timeout: float,
        poll_interval: float,
        progress: Callable[[int, int], None] | None = None,
    ) -> dict[str, Result]:
        done: dict[str, Result] = {}
        pending = wanted
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                interval = min(_FIRST_POLL_INTERVAL, poll_interval)
                for round_number in itertools.count():
                    full_sweep = round_number % _FULL_SWEEP_EVERY == 0
                    finished = 0
                    for start in range(0, len(pending), _POLL_CHUNK):
                        found = await self._poll(pending[start : start + _POLL_CHUNK], done)
                        finished += found
                        if not found and not full_sweep:
                            break
                    pending = [task_id for task_id in pending if task_id not in done]
                    if progress is not None:
                        progress(len(done), len(wanted))
                    if not pending:
                        break
                    interval = min(
                        _FIRST_POLL_INTERVAL if finished else interval * 2, poll_interval
                    )
                    await asyncio.sleep(interval)
        except ClientError as error:
            # `MasterTimeout` is a TimeoutError too: handled here, not as the deadline below.
            error.done = done
            error.pending = [task_id for task_id in wanted if task_id not in done]
            raise
        except TimeoutError:
            if not scope.expired():
                raise
            # Not `pending`: the deadline may have passed in a round that found some results.
            missing = [task_id for task_id in wanted if task_id not in done]
            message = _overdue(missing, len(wanted), timeout)
            raise ResultTimeout(message, missing, done, timeout) from None
        return {task_id: done[task_id] for task_id in wanted}

    async def result(
        self,
        task_id: str,
        timeout: float = DEFAULT_RESULT_TIMEOUT,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Result:
        """Wait for one task's result, polling as `results` does; `ResultTimeout` names the id."""
        found = await self.results((task_id,), timeout, poll_interval=poll_interval)
        return found[task_id]

    async def run(
        self,
        task: Task,
        timeout: float = DEFAULT_RESULT_TIMEOUT,
        *,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Result:
        """Submit `task` and wait for its result; `timeout` covers both.

        The submission itself is bounded like every request (the master must not fall silent
        for the connection's `timeout`); `ResultTimeout` names the task's id.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        task_id = await self.submit(task)
        found = await self._collect([task_id], deadline, timeout, poll_interval)
        return found[task_id]


def _overdue(pending: list[str], total: int, timeout: float) -> str:
    if total == 1:
        return (
            f"no result for task {pending[0]} within {timeout:g} s; it stays on the master, "
            "poll it again later"
        )
    shown = ", ".join(pending[:3]) + (", ..." if len(pending) > 3 else "")
    return (
        f"no result for {len(pending)} of {total} tasks within {timeout:g} s ({shown}); "
        "they stay on the master, poll them again later"
    )
