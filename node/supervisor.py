"""The node's lifecycle: build → start workers → connect → ready → run → drain → stopped.

    Node(config, join) ── run() ──▶ WorkerPool.start()  (every worker answered READY)
                                 ──▶ MasterLink.run()   (connected, authenticated, registered)
                                 ──▶ status READY (logged; `ready` is what health checks read)
    SIGTERM/SIGINT ──▶ drain(): stop heartbeating and polling, start nothing new, finish what
                       runs, deliver it, hand the rest back, stop the workers, exit 0.

`NodeStatus` is the one place the lifecycle phase lives. The event loop only parses, routes and
writes (DESIGN contract 3); every task runs in a worker process.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import time
from collections.abc import Awaitable

from node.config import Config, JoinInfo
from node.dispatch import Dispatcher
from node.link import LinkState, MasterLink, NoMasterError
from node.protocol import messages as m
from workers.pool import WorkerPool
from workers.tasks import WorkerSettings

log = logging.getLogger("cpnode.node")


class NodeStatus(enum.Enum):
    BUILDING = "building"
    STARTING = "starting"
    CONNECTING = "connecting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Node:
    """One cpnode: a master link, a dispatcher and a pool of worker processes."""

    def __init__(self, config: Config, join: JoinInfo, *, start_method: str = "forkserver") -> None:
        self.config = config
        self.join = join
        self.status = NodeStatus.BUILDING
        self.started_at = time.monotonic()
        self.dispatcher = Dispatcher(config.prefetch, self._deliver)
        self.settings = WorkerSettings(
            role=config.role,
            node_id=config.node_id or f"{join.port}-{config.role.value.lower()}",
            storage_dir=config.storage_dir,
            shm_dir=config.shm_dir,
            disk_space_mb=config.disk_space_mb,
            max_frame_bytes=config.max_frame_bytes,
            log_level=config.log_level,
        )
        self.pool = WorkerPool(
            config.worker_count,
            self.settings,
            on_results=self.dispatcher.results,
            on_worker_ready=self.dispatcher.worker_ready,
            on_worker_lost=self.dispatcher.worker_lost,
            start_method=start_method,
        )
        self.dispatcher.pool = self.pool
        self.link = MasterLink(
            config,
            join,
            config.role,
            on_assign=self.dispatcher.accept,
            has_capacity=self.dispatcher.has_capacity,
            on_registered=self._registered,
        )
        self._stop = asyncio.Event()
        self._signals = 0

    @property
    def ready(self) -> bool:
        return self.status is NodeStatus.READY and self.link.state is LinkState.REGISTERED

    def _deliver(self, blob: bytes, count: int) -> None:
        self.link.send_results(blob, count)

    def _registered(self) -> None:
        if self.status is NodeStatus.CONNECTING:
            self.status = NodeStatus.READY
            log.info(
                "node ready: role %s, %d workers, master %s",
                self.config.role,
                len(self.pool.workers),
                self.link.peer,
            )

    def request_stop(self) -> None:
        """First call: drain. Second call: stop at once."""
        self._signals += 1
        if self._signals == 1:
            log.info("stop requested: draining (again to stop at once)")
        else:
            log.warning(
                "second stop request: stopping now with %d results unconfirmed",
                self.link.unconfirmed,
            )
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

    async def run(self) -> int:
        """Run until stopped; returns the process exit status."""
        self.status = NodeStatus.STARTING
        await self.pool.start()
        self.status = NodeStatus.CONNECTING
        link_task = asyncio.ensure_future(self.link.run())
        stop_task = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {link_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if link_task in done:
                exc = link_task.exception()
                if isinstance(exc, NoMasterError):
                    log.error("%s", exc)
                    return 3
                if exc is not None:
                    raise exc
            await self.drain()
            return 0
        finally:
            stop_task.cancel()
            self.link.close()
            link_task.cancel()
            await asyncio.gather(link_task, return_exceptions=True)
            await self.pool.stop()
            self.status = NodeStatus.STOPPED
            log.info("node stopped")

    async def drain(self) -> None:
        """Finish what runs, deliver it, hand the rest back (DESIGN contract 8)."""
        self.status = NodeStatus.DRAINING
        deadline = time.monotonic() + self.config.drain_timeout_ms / 1000
        link = self.link
        link.stop_heartbeats()
        handed_back = len(self.dispatcher.stop_accepting())
        self._stop.clear()
        log.info(
            "draining: %d tasks running, %d not started handed back",
            self.dispatcher.held,
            handed_back,
        )
        if not await self._wait(self.dispatcher.idle.wait(), deadline):
            log.warning("drain timeout: %d tasks still running", self.dispatcher.held)
        # One heartbeat to have the master confirm the last results.
        link.send_heartbeat()
        while link.unconfirmed and link.state is LinkState.REGISTERED:
            if not await self._wait(asyncio.sleep(0.01), deadline):
                break
        handed_back += len(self.dispatcher.stop_accepting())
        if link.unconfirmed:
            log.warning(
                "%d results could not be confirmed before the drain ended", link.unconfirmed
            )
        if handed_back and link.state is LinkState.REGISTERED:
            # The upstream master forgets a closed connection's tasks but re-queues an evicted
            # node's: stay connected and silent until it evicts us (2-3 x failover_timeout_ms).
            evicted_by = link.last_write_at + 3 * self.config.failover_timeout_ms / 1000
            log.info("waiting for the master to evict this node and re-queue its tasks")
            await self._wait(asyncio.sleep(max(0.0, evicted_by - time.monotonic())), deadline)
        elif link.state is LinkState.REGISTERED:
            link.send(m.DISCONNECT)

    async def _wait(self, awaitable: Awaitable[object], deadline: float) -> bool:
        """Await until `deadline` or a second stop request; False when cut short."""
        waiter = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, stopper},
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
            waiter.cancel()
        return waiter in done
