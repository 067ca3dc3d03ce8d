"""The health endpoint: liveness, readiness, Prometheus metrics and a status summary over HTTP.

    GET /healthz  200 while the event loop answers on time (lag below LAG_LIMIT_S), else 503
    GET /readyz   200 when the node is READY: workers up, master connected and registered,
                  not draining; else 503 (the body says which part is missing)
    GET /metrics  Prometheus text format, built at scrape time from the node's own counters
    GET /status   JSON for `cpnode-status`: role, master, workers, queue, recent problems

A tiny HTTP/1.1 server on asyncio (one request per connection, `Connection: close`) serves it
from the supervisor's loop: no thread of its own, no web framework. It serves MAX_CONNECTIONS at
once, each for REQUEST_TIMEOUT_S at most; one more is closed as soon as it is accepted (counted,
and logged at most every REFUSED_LOG_EVERY_S), so a flood of connections cannot take the node's
file descriptors. Nothing is counted for it on the hot path: `NodeCollector` reads the
dispatcher's, pool's and link's counters when a scrape comes (the task counts by type come from
the workers' own snapshots, `workers.stats`, plus the dispatcher's count of the tasks it answered
itself), and the text is formatted in a thread. What needs the
file system (store sizes under `storage_dir` and `shm_dir`) or /proc (worker memory) is read in a
thread too, at most every STORAGE_SCAN_EVERY_S, and a scrape never waits on it for more than a
second; a read that fails is logged and the scrape serves the figures read before.
`RecentProblems` keeps the last warnings and errors logged, for `/status`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import logging
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Final

import orjson
import psutil
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
)

from node.config import format_address
from node.errors import ListenError
from node.histogram import Histogram
from node.link import LinkState
from node.throttle import Throttle, more_since
from shm.diskstore import DIRECTORY_BYTES, TEMPORARY
from workers.logformat import level_name
from workers.pool import WorkerStatus
from workers.stats import BUCKETS, COMPLETED, FAILED, FIRST_BUCKET, SECONDS

if TYPE_CHECKING:
    from node.supervisor import Node

log = logging.getLogger("cpnode.health")

DEFAULT_PORT: Final = 9655
LAG_TICK_S: Final = 0.25
LAG_LIMIT_S: Final = 2.0
LAG_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0)
STORAGE_SCAN_EVERY_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 5.0
# Plenty for probes and scrapers; a descriptor each, so far below any process's limit (1024).
MAX_CONNECTIONS: Final = 64
REFUSED_LOG_EVERY_S: Final = 60.0
RECENT_PROBLEMS: Final = 20
_MAX_REQUEST_HEAD: Final = 16384
_METRICS_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def version() -> str:
    try:
        return importlib.metadata.version("cpcluster-node")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class RecentProblems(logging.Handler):
    """The last `size` warnings and errors logged in this process, for `/status`."""

    def __init__(self, size: int = RECENT_PROBLEMS) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, object]] = collections.deque(maxlen=size)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        self.records.append(
            {
                "ts": record.created,
                "level": level_name(record.levelno),
                "logger": record.name,
                "message": message,
            }
        )


@dataclass
class _Resources:
    """What is read off the loop: sizes on disk and worker memory."""

    disk_store_bytes: int | None = None
    shm_bytes: int = 0
    shm_free_bytes: int | None = None
    worker_rss: dict[int, int] = field(default_factory=dict)


def _tree_bytes(*directories: str, directory_bytes: int = 0, skip: str | None = None) -> int:
    """Bytes of the regular files below `directories`, and `directory_bytes` for each directory
    below them, following no symlink and leaving out the entries whose names start with `skip`.

    A loop over a stack of directories still to list, not a recursion: a DiskWrite may nest
    directories two thousand deep. Each directory is listed and closed before the next is
    opened, so the walk holds one descriptor however deep it goes."""
    total = 0
    pending = list(directories)
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    if skip is None or not entry.name.startswith(skip):
                        total += _file_bytes(entry, pending, directory_bytes)
        except OSError:  # removed meanwhile, unreadable, or its path longer than PATH_MAX
            pass
    return total


def _file_bytes(entry: os.DirEntry[str], directories: list[str], directory_bytes: int = 0) -> int:
    """The size of `entry` if it is a regular file; a directory is added to `directories` and
    counts `directory_bytes`."""
    try:
        if entry.is_dir(follow_symlinks=False):
            directories.append(entry.path)
            return directory_bytes
        if entry.is_file(follow_symlinks=False):
            return entry.stat(follow_symlinks=False).st_size
    except OSError:  # removed meanwhile, or unreadable
        pass
    return 0


def _read_resources(
    storage_dir: str, shm_dir: str, shm_prefix: str, workers: Sequence[tuple[int, int]]
) -> _Resources:
    """Runs in a thread: store sizes and worker memory."""
    found = _Resources()
    try:
        if stat.S_ISDIR(os.stat(storage_dir).st_mode):
            # As the disk store's quota counts: directories too, writes in progress not.
            found.disk_store_bytes = _tree_bytes(
                storage_dir, directory_bytes=DIRECTORY_BYTES, skip=TEMPORARY
            )
    except FileNotFoundError:
        found.disk_store_bytes = 0  # nothing written yet (a node that is not a Disk node)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        with os.scandir(shm_dir) as listing:
            # The node's directory and its payload segments (see shm.nodedir): exact names, so
            # node "a" never counts node "ab"'s files.
            mine = [
                entry
                for entry in listing
                if entry.name == shm_prefix or entry.name.startswith(shm_prefix + "-seg-")
            ]
        below: list[str] = []
        found.shm_bytes = sum(_file_bytes(entry, below) for entry in mine) + _tree_bytes(*below)
        found.shm_free_bytes = psutil.disk_usage(shm_dir).free
    for index, pid in workers:
        with contextlib.suppress(psutil.Error):
            found.worker_rss[index] = psutil.Process(pid).memory_info().rss
    return found


def _histogram(
    family: HistogramMetricFamily,
    labels: list[str],
    bounds: Sequence[float],
    counts: Sequence[float],
    total: float,
) -> None:
    cumulative = 0.0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=False):
        cumulative += count
        buckets.append((repr(float(bound)), cumulative))
    cumulative += counts[len(bounds)]
    buckets.append(("+Inf", cumulative))
    family.add_metric(labels, buckets, total)


def _histogram_of(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    _histogram(family, [], histogram.bounds, histogram.counts, histogram.sum)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class NodeCollector:
    """A prometheus_client collector over one Node's counters, read at scrape time."""

    def __init__(self, server: HealthServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        node = server.node
        dispatcher, pool, link = node.dispatcher, node.pool, node.link
        role = node.config.role.value

        info = InfoMetricFamily("cpnode_node", "Which node this is.")
        info.add_metric(
            [],
            {
                "node_id": node.settings.node_id,
                "role": role,
                "master": link.peer,
                "version": server.version,
            },
        )
        yield info
        state = StateSetMetricFamily("cpnode_status", "The node's lifecycle phase.")
        state.add_metric([], {status.value: node.status is status for status in type(node.status)})
        yield state
        yield _gauge("cpnode_ready", "1 when /readyz answers 200.", float(server.ready()[0]))
        yield _gauge("cpnode_uptime_seconds", "Seconds since the node started.", server.uptime())
        yield _gauge(
            "cpnode_start_time_seconds", "When the node started, in Unix time.", server.started_wall
        )
        yield _counter(
            "cpnode_health_connections_refused",
            f"Connections to this endpoint closed unanswered: {MAX_CONNECTIONS} were open.",
            server.connections_refused,
        )
        yield _gauge(
            "cpnode_event_loop_lag_current_seconds",
            "How late the last event-loop timer fired.",
            server.loop_lag,
        )
        yield _histogram_of(
            "cpnode_event_loop_lag_seconds",
            f"How late a {LAG_TICK_S} s event-loop timer fires.",
            server.lag_histogram,
        )

        # Tasks.
        received = CounterMetricFamily(
            "cpnode_tasks_received", "Tasks accepted from the master, by type.", labels=["type"]
        )
        for kind, count in sorted(dispatcher.received_by_type.items()):
            received.add_metric([kind], count)
        yield received
        completed = CounterMetricFamily(
            "cpnode_tasks_completed",
            "Tasks answered (with a value or an Error), by type.",
            labels=["type"],
        )
        failed = CounterMetricFamily(
            "cpnode_tasks_failed", "Tasks answered with an Error, by type.", labels=["type"]
        )
        seconds = HistogramMetricFamily(
            "cpnode_task_execution_seconds",
            "Time a worker spent running a task, by type.",
            labels=["type"],
        )
        # What workers answered (as they last reported), and what the supervisor answered
        # itself: a dead worker's tasks, the I/O tasks, a drain's Errors for direct links.
        ran = pool.task_stats()
        answered_here, failed_here = dispatcher.answered_here, dispatcher.failed_here
        for kind in sorted({*ran, *answered_here, *failed_here}):
            row = ran.get(kind)
            completed.add_metric([kind], (row[COMPLETED] if row else 0) + answered_here[kind])
            failed.add_metric([kind], (row[FAILED] if row else 0) + failed_here[kind])
            if row is not None:
                _histogram(seconds, [kind], BUCKETS, row[FIRST_BUCKET:], row[SECONDS])
        yield completed
        yield failed
        yield seconds
        yield _counter(
            "cpnode_tasks_answered",
            "Tasks answered (every type; sum of cpnode_tasks_completed_total once workers "
            "have reported).",
            dispatcher.completed,
        )
        yield _counter(
            "cpnode_tasks_joined_duplicates",
            "AssignTask frames whose id was already running here (joined, not run twice).",
            dispatcher.joined_duplicates,
        )
        yield _counter(
            "cpnode_tasks_taken_back",
            "Tasks taken back unstarted from a worker busy with a long task, for an idle one.",
            dispatcher.taken_back,
        )
        yield _gauge(
            "cpnode_tasks_queued", "Tasks waiting for a worker (not yet sent).", dispatcher.pending
        )
        yield _gauge(
            "cpnode_tasks_held",
            "Tasks accepted and not yet answered (queued, in workers, or I/O).",
            dispatcher.held,
        )
        yield _gauge(
            "cpnode_io_tasks_running", "I/O tasks running in the event loop.", dispatcher.io_running
        )
        yield _gauge(
            "cpnode_results_unconfirmed",
            "Results written that the master has not confirmed yet (kept for a resend).",
            link.unconfirmed,
        )

        # Workers.
        in_flight = GaugeMetricFamily(
            "cpnode_worker_tasks_in_flight",
            "Tasks a worker holds (running or queued to it).",
            labels=["worker"],
        )
        up = GaugeMetricFamily(
            "cpnode_worker_up", "1 when a worker process is ready for tasks.", labels=["worker"]
        )
        done = CounterMetricFamily(
            "cpnode_worker_tasks_done", "Tasks a worker slot answered.", labels=["worker"]
        )
        rss = GaugeMetricFamily(
            "cpnode_worker_resident_bytes",
            "Resident memory of a worker process.",
            labels=["worker"],
        )
        resources = server.resources
        for worker in pool.workers:
            label = [str(worker.index)]
            in_flight.add_metric(label, len(worker.assigned))
            up.add_metric(label, float(worker.status is WorkerStatus.READY))
            done.add_metric(label, worker.tasks_done)
            if worker.index in resources.worker_rss:
                rss.add_metric(label, resources.worker_rss[worker.index])
        yield in_flight
        yield up
        yield done
        yield rss
        restarts = CounterMetricFamily(
            "cpnode_worker_restarts",
            "Workers replaced, by cause: an exit code, a signal, a task past task_timeout_ms, "
            "or recycled (max_tasks_per_child, memory_limit_mb).",
            labels=["cause"],
        )
        for cause, count in sorted(pool.restarts_by_cause.items()):
            restarts.add_metric([cause], count)
        yield restarts
        # The same count without a cause, there from the start: `increase()` sees no new
        # labelled series appear, so an alert on the first restart needs this one.
        replaced = CounterMetricFamily(
            "cpnode_worker_replacements",
            "Workers replaced after they died or were killed, not recycled (0 from the start).",
        )
        replaced.add_metric([], pool.deaths)
        yield replaced
        segments = CounterMetricFamily(
            "cpnode_segment_frames",
            "Large frames handed between the supervisor and workers through shared memory.",
            labels=["direction"],
        )
        segments.add_metric(["to_worker"], node.frames_spilled)
        segments.add_metric(["from_worker"], pool.result_segments)
        yield segments

        # Master link.
        yield _gauge(
            "cpnode_master_connected",
            "1 while registered with a master.",
            float(link.state is LinkState.REGISTERED),
        )
        yield _gauge(
            "cpnode_results_mapped_bytes",
            "Bytes of big unconfirmed results held in shm_dir mappings (their files are gone).",
            link.mapped_bytes,
        )
        yield _counter(
            "cpnode_master_connects", "Connections registered with a master.", link.connects
        )
        yield _counter(
            "cpnode_master_reconnects",
            "Connections after the first one.",
            max(0, link.connects - 1),
        )
        yield _counter(
            "cpnode_master_failovers",
            "Connections made to another master than the one before.",
            link.failovers,
        )
        yield _counter(
            "cpnode_master_evictions_detected",
            "Times the master evicted this node without closing the connection (reconnected).",
            link.zombies_detected,
        )
        yield _histogram_of(
            "cpnode_heartbeat_rtt_seconds",
            "From a Heartbeat written to its HeartbeatAck read.",
            link.heartbeat_rtt,
        )
        yield _histogram_of(
            "cpnode_heartbeat_lateness_seconds",
            "How much later than planned periodic heartbeats left (actual - planned interval).",
            link.heartbeat_lateness,
        )
        yield _counter(
            "cpnode_link_frames_received", "Frames read from masters.", link.frames_received
        )
        yield _counter(
            "cpnode_link_frames_sent",
            "Frames written to masters after registration (results, heartbeats, messages; "
            "those queued when a connection was lost count, and a result sent again after a "
            "reconnect counts again).",
            link.frames_written,
        )
        yield _counter(
            "cpnode_link_frames_skipped",
            "Malformed or unknown frames from masters, skipped.",
            link.frames_skipped,
        )
        yield _counter(
            "cpnode_link_bytes_received", "Bytes read from masters.", link.bytes_received
        )
        yield _counter(
            "cpnode_link_bytes_sent",
            "Bytes written to masters after registration (counted as frames_sent is).",
            link.bytes_sent,
        )

        # Stores.
        quota = node.config.disk_space_mb * 1024 * 1024
        yield _gauge("cpnode_disk_store_quota_bytes", "disk_space_mb, in bytes.", quota)
        if resources.disk_store_bytes is not None:
            yield _gauge(
                "cpnode_disk_store_bytes",
                f"Bytes of the files below storage_dir and {DIRECTORY_BYTES} for each directory"
                " (as the quota counts them).",
                resources.disk_store_bytes,
            )
        yield _gauge(
            "cpnode_shm_bytes",
            "Bytes of this node's files in shm_dir (memory store and payload segments).",
            resources.shm_bytes,
        )
        if resources.shm_free_bytes is not None:
            yield _gauge(
                "cpnode_shm_free_bytes", "Free space in shm_dir.", resources.shm_free_bytes
            )


class _Families:
    """Metric families already read, in the shape `generate_latest` formats."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class HealthServer:
    """Serves /healthz, /readyz, /metrics and /status for one Node."""

    def __init__(self, node: Node, host: str, port: int) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.version = version()
        self.started_wall = time.time()
        self.loop_lag = 0.0
        self.lag_histogram = Histogram(LAG_BUCKETS)
        self.problems = RecentProblems()
        self.resources = _Resources()
        self.collector = NodeCollector(self)
        self._process = ProcessCollector(registry=None)
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._last_tick = 0.0
        self._scan: asyncio.Future[_Resources] | None = None
        self._next_scan = 0.0  # time.monotonic() from which a scrape starts a new read
        self._scan_failure: str | None = None  # how the last read failed, until one succeeds
        self._handlers: set[asyncio.Task[None]] = set()  # one per connection being served
        self.connections_refused = 0
        self._refused_lines = Throttle(REFUSED_LOG_EVERY_S)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    async def start(self) -> None:
        """Listen; raises ListenError when the address cannot be listened on."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.address} for the health endpoint: "
                f"{exc.strerror or exc} (choose another with --health-port or --health-listen)"
            ) from None
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._last_tick = asyncio.get_running_loop().time()
        self._watcher = asyncio.ensure_future(self._watch_loop())
        logging.getLogger().addHandler(self.problems)
        log.info("health endpoint on http://%s/ (healthz, readyz, metrics, status)", self.address)

    async def close(self) -> None:
        logging.getLogger().removeHandler(self.problems)
        if self._watcher is not None:
            self._watcher.cancel()
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None

    # ------------------------------------------------------------------------------- checks

    async def _watch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + LAG_TICK_S
            await asyncio.sleep(LAG_TICK_S)
            now = loop.time()
            self.loop_lag = max(0.0, now - planned)
            self.lag_histogram.observe(self.loop_lag)
            self._last_tick = now

    def healthy(self) -> tuple[bool, dict[str, object]]:
        since_tick = asyncio.get_running_loop().time() - self._last_tick
        watching = self._watcher is not None and not self._watcher.done()
        healthy = watching and self.loop_lag < LAG_LIMIT_S and since_tick < LAG_LIMIT_S + LAG_TICK_S
        return healthy, {
            "healthy": healthy,
            "status": self.node.status.value,
            "loop_lag_seconds": round(self.loop_lag, 6),
            "lag_limit_seconds": LAG_LIMIT_S,
        }

    def ready(self) -> tuple[bool, dict[str, object]]:
        node = self.node
        workers_ready = len(node.pool.ready_workers)
        ready = node.ready and workers_ready > 0
        return ready, {
            "ready": ready,
            "status": node.status.value,
            "link": node.link.state.value,
            "master": node.link.peer,
            "workers_ready": workers_ready,
            "workers": len(node.pool.workers),
        }

    def uptime(self) -> float:
        return time.monotonic() - self.node.started_at

    def status(self) -> dict[str, object]:
        node = self.node
        dispatcher, link = node.dispatcher, node.link
        healthy, _ = self.healthy()
        ready, _ = self.ready()
        return {
            "node_id": node.settings.node_id,
            "role": node.config.role.value,
            "version": self.version,
            "pid": os.getpid(),
            "status": node.status.value,
            "healthy": healthy,
            "ready": ready,
            "uptime_seconds": round(self.uptime(), 3),
            "master": link.peer,
            "link": link.state.value,
            "connects": link.connects,
            "failovers": link.failovers,
            "heartbeat_rtt_max_seconds": round(link.heartbeat_rtt.max, 6),
            "loop_lag_seconds": round(self.loop_lag, 6),
            "tasks": {
                "received": dispatcher.received,
                "answered": dispatcher.completed,
                "queued": dispatcher.pending,
                "held": dispatcher.held,
                "io_running": dispatcher.io_running,
                "unconfirmed": link.unconfirmed,
                "taken_back": dispatcher.taken_back,
            },
            "workers": [
                {
                    "index": w.index,
                    "pid": w.pid,
                    "status": w.status.value,
                    "held": len(w.assigned),
                    "tasks_done": w.tasks_done,
                    "restarts": w.restarts,
                }
                for w in node.pool.workers
            ],
            "worker_restarts_by_cause": dict(node.pool.restarts_by_cause),
            "recent_problems": list(self.problems.records),
        }

    async def metrics(self) -> bytes:
        await self._refresh_resources()
        # Reading the counters must happen on the loop; turning them into text need not (it
        # is the larger half of a scrape: a few ms with hundreds of workers).
        families = _Families([*self.collector.collect(), *self._process.collect()])
        return await asyncio.to_thread(generate_latest, families)

    async def _refresh_resources(self) -> None:
        """Start a new read when the last is stale; wait for it a second at most.

        A read that fails counts as a read: the next one waits its STORAGE_SCAN_EVERY_S like
        any other, so a failure that repeats costs one read per interval, not one per scrape."""
        now = time.monotonic()
        if self._scan is None and now >= self._next_scan:
            self._next_scan = now + STORAGE_SCAN_EVERY_S
            node = self.node
            workers = [(w.index, w.pid) for w in node.pool.workers if w.pid is not None]
            prefix = f"cpnode-{node.settings.node_id}"
            self._scan = asyncio.ensure_future(
                asyncio.to_thread(
                    _read_resources, node.config.storage_dir, node.config.shm_dir, prefix, workers
                )
            )
            self._scan.add_done_callback(self._scanned)
        if self._scan is not None:
            # asyncio.wait neither raises the read's error (`_scanned` logs it) nor cancels it.
            await asyncio.wait([self._scan], timeout=1.0)

    def _scanned(self, scan: asyncio.Future[_Resources]) -> None:
        self._scan = None
        if scan.cancelled():
            return
        error = scan.exception()
        if error is None:
            self.resources = scan.result()
            if self._scan_failure is not None:
                log.info("health endpoint: store sizes and worker memory read again")
                self._scan_failure = None
            return
        failure = f"{type(error).__name__}: {error}"
        if failure != self._scan_failure:  # once, not at every read while it keeps failing
            log.error(
                "health endpoint: reading store sizes and worker memory failed (%s); /metrics "
                "serves the figures read before, and tries again every %g s",
                failure,
                STORAGE_SCAN_EVERY_S,
                exc_info=error,
            )
            self._scan_failure = failure

    # ------------------------------------------------------------------------------- HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handlers) >= MAX_CONNECTIONS:
            self._refuse(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await asyncio.wait_for(self._answer(reader, writer), REQUEST_TIMEOUT_S)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("health endpoint: request failed")
        finally:
            self._handlers.discard(task)
            writer.close()

    def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection over MAX_CONNECTIONS now: nothing read, no timer, no answer
        (writing one could wait on the peer), one log line per REFUSED_LOG_EVERY_S at most."""
        writer.transport.abort()
        self.connections_refused += 1
        if count := self._refused_lines.hit():
            log.warning(
                "health endpoint: %d connections open, the most it serves at once: new ones are"
                " closed unanswered (%d so far, in cpnode_health_connections_refused_total; this"
                " line comes at most every %g s)%s",
                MAX_CONNECTIONS,
                self.connections_refused,
                REFUSED_LOG_EVERY_S,
                more_since(count),
            )

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            writer.write(_response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"", "text/plain"))
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            writer.write(_response(HTTPStatus.BAD_REQUEST, b"bad request\n", "text/plain"))
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            writer.write(_response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n", "text/plain"))
            return
        code, body, content_type = await self._route(target)
        writer.write(_response(code, b"" if method == b"HEAD" else body, content_type, len(body)))
        await writer.drain()

    async def _route(self, path: bytes) -> tuple[HTTPStatus, bytes, str]:
        if path in (b"/healthz", b"/livez"):
            ok, detail = self.healthy()
        elif path == b"/readyz":
            ok, detail = self.ready()
        elif path == b"/metrics":
            return HTTPStatus.OK, await self.metrics(), _METRICS_TYPE
        elif path == b"/status":
            ok, detail = True, self.status()
        else:
            return (
                HTTPStatus.NOT_FOUND,
                b"try /healthz, /readyz, /metrics or /status\n",
                "text/plain",
            )
        code = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
        return code, orjson.dumps(detail) + b"\n", "application/json"


def _response(code: HTTPStatus, body: bytes, content_type: str, length: int | None = None) -> bytes:
    head = (
        f"HTTP/1.1 {code.value} {code.phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body
