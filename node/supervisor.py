"""The node's lifecycle: build → start workers → connect → ready → run → drain → stopped.

    Node(config, join) ── run() ──▶ HealthServer.start() (when `health_listen` is set)
                                 ──▶ WorkerPool.start()  (every worker answered READY)
                                 ──▶ MasterLink.run()   (connected, authenticated, registered)
                                 ──▶ status READY (logged; `ready` is what health checks read)
    SIGTERM/SIGINT ──▶ drain(): stop heartbeating and polling, start nothing new, finish what
                       runs, deliver it, hand the rest back, stop the workers, exit 0.
                       A second signal stops at once (what was not delivered is logged).

Handing work back: the upstream master re-queues the tasks of a node it evicts (2-3 x
`failover_timeout_ms` after its last frame) but forgets those of a node that closes or sends
`Disconnect`, and pushes more tasks after every frame it reads. So a draining node that was
sent anything it did not run stays connected and silent until it has been evicted; it sends
`Disconnect` only when the master holds no task for it.

`NodeStatus` is the one place the lifecycle phase lives. The event loop only parses, routes and
writes (DESIGN contract 3); every task runs in a worker process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Final

from node.config import Config, JoinInfo, parse_address
from node.direct import DirectLinks
from node.dispatch import Dispatcher
from node.health import HealthServer
from node.iotasks import IoTaskRunner
from node.link import LinkState, MasterLink, NoMasterError
from node.protocol import messages as m
from shm import native
from shm.errors import NodeDirectoryInUse
from shm.nodedir import NodeDirectory, claim_node_dir
from shm.segments import IncomingSegment, discard_spilled, spilled
from shm.space import free_bytes
from workers.channel import SEGMENT_RESERVE_BYTES, Frames
from workers.pool import WorkerLimits, WorkerPool
from workers.tasks import WorkerSettings

log = logging.getLogger("cpnode.node")

EVICTION_WAIT: Final = 3.2
"""A drain that handed tasks back waits this many `failover_timeout_ms` after its last frame
for the master to evict it (upstream evicts after 2-3): a master that loses the connection
first forgets those tasks."""


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
            node_id=config.node_id or f"{config.role.value.lower()}-{join.port}",
            storage_dir=config.storage_dir,
            shm_dir=config.shm_dir,
            disk_space_mb=config.disk_space_mb,
            max_frame_bytes=config.max_frame_bytes,
            log_level=config.log_level,
            log_format=config.log_format,
        )
        self.pool = WorkerPool(
            config.worker_count,
            self.settings,
            on_results=self.dispatcher.results,
            on_worker_ready=self.dispatcher.worker_ready,
            on_worker_lost=self.dispatcher.worker_lost,
            on_skipped=self.dispatcher.skipped,
            on_result_lost=self.dispatcher.result_lost,
            start_method=start_method,
            limits=WorkerLimits(
                task_timeout_ms=config.task_timeout_ms,
                max_tasks_per_child=config.max_tasks_per_child,
                memory_limit_mb=config.worker_memory_limit_mb,
            ),
        )
        self.dispatcher.pool = self.pool
        self.dispatcher.discard = self._discard
        # HttpRequest, Tcp and Udp wait rather than compute: they run in this event loop.
        self.io = IoTaskRunner(config, self.dispatcher.io_finished)
        self.dispatcher.io_runner = self.io.submit
        self.link = MasterLink(
            config,
            join,
            config.role,
            on_assign=self.dispatcher.accept_from_master,
            has_capacity=self.dispatcher.has_capacity,
            on_registered=self._registered,
        )
        self.dispatcher.outbox = self.link
        self.link.on_confirmed = self.dispatcher.forget_confirmed
        self.link.discard = self._discard
        # direct_port, connect_to peers, ConnectionInfo links (node/direct.py).
        self.direct = DirectLinks(config, join, self.dispatcher, self.io.policy)
        self.link.on_connection_info = self._connection_info
        self._stop = asyncio.Event()
        self._signals = 0
        self.frames_spilled = 0  # large frames from the master written to a segment
        self.health: HealthServer | None = None
        if config.health_listen is not None:
            self.health = HealthServer(self, *parse_address(config.health_listen))

    @property
    def ready(self) -> bool:
        return self.status is NodeStatus.READY and self.link.state is LinkState.REGISTERED

    def _deliver(self, blob: Frames, ids: list[str]) -> None:
        self.link.send_results(blob, ids)

    def _connection_info(self, info: m.ConnectionInfo) -> None:
        self.direct.connection_info(info, registered=self.link.state is LinkState.REGISTERED)

    def _registered(self) -> None:
        self.direct.registered(self.link.send)
        if self.status is NodeStatus.CONNECTING:
            self.status = NodeStatus.READY
            log.info(
                "node ready: role %s, %d workers, master %s",
                self.config.role,
                len(self.pool.workers),
                self.link.peer,
            )
            # Once per run: which compiled hot paths this install has (a missing one is a
            # slower node, not a broken one, but an operator should know why).
            if native.missing():
                log.warning("%s", native.summary())
            else:
                log.info("%s", native.summary())

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
        health = self.health
        if health is not None:
            await health.start()  # first: probes watch the start-up and the drain too
        try:
            return await self._run()
        finally:
            if health is not None:
                await health.close()

    def _claim_node_dir(self) -> NodeDirectory:
        """Claim this node's directory in shm_dir (clearing a crashed run's leftovers) before
        any worker starts. Without a configured `node_id`, a sibling node on this host that
        holds the derived one makes us take the next free `-N` suffix."""
        base = self.settings.node_id
        candidates = (
            [base] if self.config.node_id else [base, *(f"{base}-{n}" for n in range(2, 65))]
        )
        for node_id in candidates:
            try:
                claimed = claim_node_dir(self.config.shm_dir, node_id)
            except NodeDirectoryInUse:
                if node_id is candidates[-1]:
                    raise
                continue
            if node_id != base:
                log.warning("node_id %s is in use on this host; using %s", base, node_id)
            self.settings = dataclasses.replace(self.settings, node_id=node_id)
            self.pool.settings = self.settings
            return claimed
        raise AssertionError("unreachable")

    def _discard(self, payload: bytes) -> None:
        """Remove the segment of a spilled payload that will not run, in a thread: freeing a
        big tmpfs file takes the kernel tens of milliseconds."""
        if spilled(payload) is not None:
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, discard_spilled, self.config.shm_dir, payload)

    def _spill(self, length: int) -> IncomingSegment | None:
        """A segment for a large frame's body (workers map it in place), or None to keep it in
        memory when shm_dir lacks the room."""
        if free_bytes(self.config.shm_dir) < length + SEGMENT_RESERVE_BYTES:
            return None
        try:
            segment = IncomingSegment(
                self.config.shm_dir,
                self.node_dir.segment_prefix,
                length,
                offload=functools.partial(asyncio.get_running_loop().run_in_executor, None),
            )
        except OSError as error:
            log.warning(
                "cannot spill a %d-byte frame to %s: %s", length, self.config.shm_dir, error
            )
            return None
        self.frames_spilled += 1
        return segment

    async def _run(self) -> int:
        self.status = NodeStatus.STARTING
        eviction_ms = EVICTION_WAIT * self.config.failover_timeout_ms
        if self.config.drain_timeout_ms < eviction_ms:
            log.warning(
                "drain_timeout_ms = %d is shorter than the %.0f ms a drain waits for the master "
                "to evict this node (%.1f x failover_timeout_ms): tasks handed back by a drain "
                "would be lost by an upstream master; set drain_timeout_ms to %.0f or more",
                self.config.drain_timeout_ms,
                eviction_ms,
                EVICTION_WAIT,
                eviction_ms + 2000,
            )
        try:
            self.node_dir = self._claim_node_dir()
        except (NodeDirectoryInUse, OSError) as error:
            log.error("cannot claim this node's directory in %s: %s", self.config.shm_dir, error)
            self.status = NodeStatus.STOPPED
            return 2
        self.link.spill = self._spill
        self.pool.run_dir = self.node_dir.path  # the forkserver's socket goes with it
        try:
            await self.pool.start()
        except (RuntimeError, EOFError, OSError) as error:  # EOFError: the forkserver died
            stopping = self._signals > 0
            if stopping:  # a Ctrl-C to the whole process group can reach a forkserver starting
                log.info("stopped while the workers were starting (%s)", error)
            else:
                log.error("cannot start the workers: %s", error)
            await self.pool.stop(timeout=0)
            self.node_dir.release()
            self.status = NodeStatus.STOPPED
            return 0 if stopping else 1
        link_task: asyncio.Task[None] | None = None
        stop_task: asyncio.Task[bool] | None = None
        try:
            # Inside the try: should either fail, the workers stop and the directory goes.
            await self.io.start()
            await self.direct.start()
            self.status = NodeStatus.CONNECTING
            link_task = asyncio.ensure_future(self.link.run())
            stop_task = asyncio.ensure_future(self._stop.wait())
            tasks: set[asyncio.Future[object]] = {link_task, stop_task}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
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
            if stop_task is not None:
                stop_task.cancel()
            self.link.close()
            if link_task is not None:
                link_task.cancel()
                await asyncio.gather(link_task, return_exceptions=True)
            await self.direct.close()
            await self.io.close()
            await self.pool.stop(timeout=0 if self._forced else 5.0)
            self.node_dir.release()  # the memory store is volatile: gone with the node
            self.status = NodeStatus.STOPPED
            dispatcher = self.dispatcher
            log.info(
                "node stopped: %d tasks received, %d answered, %d repeated ids joined "
                "(%d answered again with their unconfirmed result), %d handed back",
                dispatcher.received,
                dispatcher.completed,
                dispatcher.joined_duplicates,
                dispatcher.results_resent,
                dispatcher.handed_back,
            )

    @property
    def _forced(self) -> bool:
        """A second stop request: stop at once."""
        return self._signals > 1

    async def drain(self) -> None:
        """Finish what runs, deliver it, hand the rest back (DESIGN contract 8), within
        `drain_timeout_ms`; a second stop request cuts every step short."""
        self.status = NodeStatus.DRAINING
        started = time.monotonic()
        deadline = started + self.config.drain_timeout_ms / 1000
        link = self.link
        dispatcher = self.dispatcher
        link.begin_drain()
        dispatcher.stop_accepting()
        self.pool.stop_starting()
        dispatcher.io_not_started(self.io.stop_starting())
        self._stop.clear()
        log.info(
            "draining (at most %.1f s): %d tasks held, %d queued ones handed back; "
            "the ones the workers have not started will be handed back too",
            self.config.drain_timeout_ms / 1000,
            dispatcher.held,
            dispatcher.handed_back,
        )
        if not await self._wait(dispatcher.idle.wait(), deadline) and not self._forced:
            log.warning("drain timeout: %d tasks still running", dispatcher.held)
        # Deliver: a heartbeat after the last result; its answer confirms them all. When the
        # connection is down, the link reconnects to deliver (and heartbeats on connect).
        while link.unconfirmed:
            link.confirm()
            if not await self._wait(asyncio.sleep(0.01), deadline):
                break
        if link.state is LinkState.REGISTERED and not self._forced:
            await self._hand_back(deadline)
        self._log_leftovers()
        log.info(
            "drain ended after %.1f s: %d tasks handed back to the master",
            time.monotonic() - started,
            dispatcher.handed_back,
        )

    async def _hand_back(self, deadline: float) -> None:
        link = self.link
        dispatcher = self.dispatcher
        failover_s = self.config.failover_timeout_ms / 1000
        # The master pushes tasks right after reading a frame: let those arrive first. A
        # master that has not answered every heartbeat has frames of ours still to read (it
        # may be paused), and would push after each: a Disconnect then makes it forget them.
        quiet_s = min(0.2, failover_s / 4)
        settled = await self._wait(
            self._until(
                lambda: (
                    link.state is not LinkState.REGISTERED
                    or (
                        not link.heartbeats_unanswered
                        and time.monotonic() - link.last_bytes_at >= quiet_s
                    )
                )
            ),
            deadline,
        )
        if self._forced or link.state is not LinkState.REGISTERED:
            return
        if not settled:
            log.warning(
                "the drain ended with %d heartbeats unanswered by the master: closing without "
                "Disconnect; a master that re-queues on close gets back what it pushes meanwhile",
                link.heartbeats_unanswered,
            )
            return
        if not dispatcher.held and dispatcher.last_handed_back_at < link.connected_at:
            link.send(m.DISCONNECT)
            log.info("the master holds no task of this node: sent Disconnect")
            return
        # Stay connected and silent until the master has evicted us (2-3 x failover_timeout_ms
        # after the last frame it read from us, which it read before its last byte to us).
        evicted_by = max(link.last_write_at, link.last_bytes_at) + EVICTION_WAIT * failover_s
        log.info(
            "waiting %.1f s for the master to evict this node and re-queue what it handed us "
            "and we did not run",
            max(0.0, evicted_by - time.monotonic()),
        )
        done = await self._wait(
            self._until(
                lambda: link.state is not LinkState.REGISTERED or time.monotonic() >= evicted_by
            ),
            deadline,
        )
        if not done and link.state is LinkState.REGISTERED:
            log.warning(
                "the drain ended before the master evicted this node: closing; a master that "
                "re-queues on close gets its tasks back, the upstream master loses them"
            )

    def _log_leftovers(self) -> None:
        undelivered = self.link.undelivered_ids()
        if undelivered:
            shown = ", ".join(undelivered[:20]) + (", ..." if len(undelivered) > 20 else "")
            log.warning("%d results were not confirmed by the master: %s", len(undelivered), shown)
        if self.dispatcher.held:
            log.warning("%d tasks were still running", self.dispatcher.held)

    @staticmethod
    async def _until(condition: Callable[[], bool], step: float = 0.01) -> None:
        while not condition():
            await asyncio.sleep(step)

    async def _wait(self, awaitable: Awaitable[object], deadline: float) -> bool:
        """Await until `deadline` or a second stop request; False when cut short."""
        waiter = asyncio.ensure_future(awaitable)
        if self._forced:
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            return False
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
