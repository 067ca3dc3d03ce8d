"""Loopback servers for the network-task tests: HTTP, TCP echo and UDP echo, each in a thread.

Every server listens on 127.0.0.1 only, counts what it served, and stops (closing every socket)
when its `with` block ends.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _LoopThread:
    """An event loop in a daemon thread; `setup` runs on it at start, `teardown` at stop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, setup: Callable[[], Awaitable[Any]]) -> Any:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(setup(), self.loop).result(10)

    def stop(self, teardown: Callable[[], Awaitable[Any]]) -> None:
        try:
            asyncio.run_coroutine_threadsafe(teardown(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


class HttpServer:
    """aiohttp.web on 127.0.0.1: `routes` maps a path to a handler; `url(path)` names it."""

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.port = 0
        self.active = 0
        self.peak = 0
        self.served = 0
        self.arrivals: list[int] = []  # requests running as each one came, itself included
        self._lock = threading.Lock()
        self._thread = _LoopThread()
        self._runner: web.AppRunner | None = None

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def __enter__(self) -> HttpServer:
        self._thread.start(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop(self._stop)

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.arrivals.append(self.active)
        try:
            return await handler(request)
        finally:
            with self._lock:
                self.active -= 1
                self.served += 1

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._count])
        for path, handler in self.routes.items():
            app.router.add_get(path, handler)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class _Echo(asyncio.Protocol):
    def __init__(self, server: TcpEcho) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.server.peers.append(transport.get_extra_info("peername")[1])
        self.server.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(self.server.reply(data))  # type: ignore[attr-defined]


class TcpEcho:
    """Answers every chunk with `reply(chunk)` (the chunk itself by default); `peers` lists the
    source port of every connection."""

    def __init__(self, reply: Callable[[bytes], bytes] = lambda data: data) -> None:
        self.reply = reply
        self.peers: list[int] = []
        self.transports: set[asyncio.BaseTransport] = set()
        self.port = 0
        self._thread = _LoopThread()
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> TcpEcho:
        self._thread.start(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop(self._stop)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Echo(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.close()
            await asyncio.sleep(0)
            await self._server.wait_closed()


class _UdpEchoProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: UdpEcho) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server.peers.append(addr[1])
        if self.server.answer:
            self.transport.sendto(data + b"@" + str(addr[1]).encode(), addr)  # type: ignore[attr-defined]


class UdpEcho:
    """Answers every datagram with itself + b"@" + the sender's port (or never: answer=False)."""

    def __init__(self, *, answer: bool = True) -> None:
        self.answer = answer
        self.peers: list[int] = []
        self.port = 0
        self._thread = _LoopThread()
        self._transport: asyncio.BaseTransport | None = None

    def __enter__(self) -> UdpEcho:
        self._thread.start(self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop(self._stop)

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpEchoProtocol(self), local_addr=("127.0.0.1", 0)
        )
        self.port = self._transport.get_extra_info("sockname")[1]

    async def _stop(self) -> None:
        if self._transport is not None:
            self._transport.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free for both TCP and UDP on 0.0.0.0 right now."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("0.0.0.0", 0))
            port = int(probe.getsockname()[1])
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, other) as check:
            try:
                check.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found")
