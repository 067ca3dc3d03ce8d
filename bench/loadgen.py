"""A load generator that plays the master on loopback, and the nodes it is run against.

    FakeMaster (asyncio, this process) ◀──TCP 127.0.0.1──▶ node under test (a subprocess)
      token → "OK"; RegisterRole; GetConnectedNodes → ConnectedNodes; Heartbeat → HeartbeatAck
      burst(n):      n AssignTask frames in one write, wait for n results, check each
      round_trip(k): one task at a time, k times

Every node runs (each with its own fake master) for the whole run. The bursts go one node at a
time, `--bursts` rounds of one burst per node (new ids and expressions each), and each node's
figures are those of its median burst; the round trips take turns, one per node. So a load that
other jobs put on this shared machine slows every node alike (measured one node after the
other, the null node's median round trip varied from 0.115 to 0.5 ms between runs, which made
the ratio noise). The naive node's bursts are of at most 20,000 tasks (`--naive-tasks`).

Nodes: `cpnode` (ours, `cpnode-supervisor`), `null` (bench/nullnode.py: answers at the protocol
level without computing, the ceiling for any node), `relay` (bench/relaynode.py: the null node
split into an event loop that only relays and `--workers` child processes that answer: the
ceiling for a node shaped like ours, whose loop never computes) and `naive`
(bench/naivenode.py: asyncio and one `ProcessPoolExecutor.submit` per task, the baseline).

    python bench/loadgen.py --tasks 100000 --workers 2          # prints the table

Every result of a computing node is checked against the task's value (`wrong` column; `-` for
the null and relay nodes, which answer 0 on purpose); the exit status is 1 when any was wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
import psutil
from _nodebase import stop_on_sigterm

from node.config import JoinInfo, write_join
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
NODES = ("cpnode", "null", "relay", "naive")
ANSWER_ZERO: Final = frozenset({"null", "relay"})  # nodes that answer 0 without computing


def expression(i: int) -> tuple[str, float]:
    """A tiny Compute task and its expected value; every task's expression is different, so
    no node can answer from a cache."""
    b = i % 7 + 1
    return f"{i}+{b}*2", float(i + b * 2)


def numbered(first: int, count: int) -> list[tuple[str, str]]:
    """Tasks number `first` to `first + count - 1`: (id ``t<number>``, expression). A node's
    tasks never share a number (warm-up, bursts and round trips take separate ranges), so every
    expression is new to it, and `wrong_answers` knows each value from the id."""
    return [(f"t{n}", expression(n)[0]) for n in range(first, first + count)]


WARM_UP_FIRST: Final = 10**9  # task numbers of the warm-up; bursts count from 0
ROUND_TRIP_FIRST: Final = 2 * 10**9  # and of the round trips


def assign_frames(tasks: list[tuple[str, str]]) -> bytes:
    """The AssignTask frames of `tasks`, (id, expression) pairs, as one write."""
    return b"".join(codec.encode(m.AssignTask(ident, m.Compute(expr))) for ident, expr in tasks)


def wrong_answers(results: dict[str, bytes]) -> int:
    """How many of `results` (id -> TaskResult payload, ids from `numbered`) do not hold
    their task's value."""
    wrong = 0
    for ident, payload in results.items():
        result = codec.decode(payload)
        expected = m.Number(expression(int(ident[1:]))[1])
        if not isinstance(result, m.TaskResult) or result.result != expected:
            wrong += 1
    return wrong


class FakeMaster:
    """Serves one node connection; pushes tasks on demand and collects results."""

    def __init__(self) -> None:
        self.results: dict[str, bytes] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self.registered = asyncio.Event()
        self.heartbeats = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._all_done: asyncio.Future[None] | None = None
        self._outstanding = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 24)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._read(reader, writer)
        finally:
            # A node that dies fails the push it was answering at once, not after --timeout.
            if self._all_done is not None and not self._all_done.done():
                self._all_done.set_exception(ConnectionError("the node closed the connection"))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        authenticated = False
        try:
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    return
                for payload in decoder.feed(data):
                    if not authenticated:
                        ok = payload.strip() == TOKEN.encode()
                        writer.write(frame(b"OK" if ok else b"Invalid token"))
                        if not ok:
                            writer.close()
                            return
                        authenticated = True
                        self._writer = writer
                        continue
                    self._handle(payload, writer)
        except (ConnectionError, asyncio.CancelledError):
            return

    def _handle(self, payload: bytes, writer: asyncio.StreamWriter) -> None:
        if payload.startswith(b'{"TaskResult":'):
            ident = codec.peek(payload).id
            assert ident is not None
            self.results[ident] = payload
            self._outstanding -= 1
            if self._outstanding == 0 and self._all_done is not None and not self._all_done.done():
                self._all_done.set_result(None)
            return
        message = codec.decode(payload)
        if isinstance(message, m.Heartbeat):
            self.heartbeats += 1
            writer.write(codec.encode(m.HEARTBEAT_ACK))
            self.registered.set()
        elif isinstance(message, m.GetConnectedNodes):
            peer = writer.get_extra_info("peername")
            writer.write(codec.encode(m.ConnectedNodes((f"{peer[0]}:{peer[1]}",))))

    async def push(
        self, tasks: list[tuple[str, str]], timeout: float, blob: bytes | None = None
    ) -> float:
        """Write every AssignTask at once (`blob`: their frames, made beforehand by
        `assign_frames`); return seconds until the last result arrived."""
        assert self._writer is not None
        loop = asyncio.get_running_loop()
        self._all_done = loop.create_future()
        self._outstanding += len(tasks)
        if blob is None:
            blob = assign_frames(tasks)
        started = time.perf_counter()
        self._writer.write(blob)
        try:
            await asyncio.wait_for(self._all_done, timeout)
        except TimeoutError:
            missing = sum(1 for ident, _ in tasks if ident not in self.results)
            raise TimeoutError(
                f"{missing} of {len(tasks)} results missing after {timeout} s"
            ) from None
        return time.perf_counter() - started


@dataclass
class Measurement:
    node: str
    tasks: int
    burst_s: float
    cpu_s: float
    rtt_ms: float
    wrong: int | None  # results that were not the task's value; None: not checked (null, relay)
    main_cpu_s: float  # the node's main process (our supervisor) alone
    generator_cpu_s: float  # this process (the fake master) during the burst

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.burst_s

    @property
    def cpu_us_per_task(self) -> float:
        return self.cpu_s / self.tasks * 1e6


def node_command(kind: str, config_path: str, workers: int) -> list[str]:
    if kind == "cpnode":
        return [
            sys.executable,
            "-m",
            "node.cli",
            config_path,
            "--workers",
            str(workers),
            "--log-level",
            "warn",
        ]
    script = {"null": "nullnode.py", "relay": "relaynode.py", "naive": "naivenode.py"}[kind]
    return [sys.executable, str(HERE / script), "--workers", str(workers)]


def tree_cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """CPU seconds of the node's main process and of all its descendants."""
    main = children = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        if proc.pid == process.pid:
            main += times.user + times.system
        else:
            children += times.user + times.system
    return main, children


@dataclass
class Running:
    """A node under test, joined to its own fake master."""

    kind: str
    master: FakeMaster
    process: psutil.Process
    tasks: int
    rtts: list[float]


async def start_node(
    kind: str, tasks: int, workers: int, timeout: float, stack: contextlib.AsyncExitStack
) -> Running:
    """Start a node of `kind` against a new fake master, wait until it joined and warm it up
    (worker start, caches of the parser); `stack` stops it (and its master) at the end."""
    master = FakeMaster()
    await master.start()
    stack.push_async_callback(master.close)
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cpnode-bench-"))
    join = Path(tmp, "join.json")
    write_join(join, JoinInfo(TOKEN, "127.0.0.1", master.port))  # mode 0600, as a master does
    config = Path(tmp, "config.json")
    config.write_text(
        json.dumps({"master_addresses": [f"127.0.0.1:{master.port}"], "failover_timeout_ms": 5000})
    )
    env = dict(os.environ, CPCLUSTER_JOIN=str(join))
    proc = subprocess.Popen(node_command(kind, str(config), workers), env=env)

    async def stop() -> None:
        # Wait off the loop: the node's drain needs its fake master to answer heartbeats.
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.push_async_callback(stop)
    await asyncio.wait_for(master.registered.wait(), 60)
    await master.push(numbered(WARM_UP_FIRST, min(2000, tasks)), timeout)
    return Running(kind, master, psutil.Process(proc.pid), tasks, [])


async def burst(node: Running, round_: int, timeout: float) -> tuple[float, float, float, float]:
    """Push the node's burst number `round_` (new tasks every round); (seconds, node CPU, its
    main process's CPU, generator CPU). The frames are made before the clocks start."""
    tasks = numbered(round_ * node.tasks, node.tasks)
    blob = assign_frames(tasks)
    main_before, children_before = tree_cpu_seconds(node.process)
    generator_before = time.process_time()
    seconds = await node.master.push(tasks, timeout, blob)
    generator_cpu = time.process_time() - generator_before
    main_after, children_after = tree_cpu_seconds(node.process)
    main_cpu = main_after - main_before
    return seconds, main_cpu + children_after - children_before, main_cpu, generator_cpu


async def measure_all(
    kinds: dict[str, int],
    workers: int,
    bursts: int,
    rtt_samples: int,
    timeout: float,
    rtt_block: int = 1,
) -> list[Measurement]:
    """Every node runs from start to end. The bursts go one node at a time (they would compete
    for the CPUs), round after round, node after node; each node's figures are those of its
    median burst. The round trips take turns the same way, `rtt_block` at a time. So the load
    other jobs put on this machine meanwhile weighs on every node alike."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await start_node(k, n, workers, timeout, stack) for k, n in kinds.items()]
        await asyncio.sleep(0.2)
        rounds: dict[str, list[tuple[float, float, float, float]]] = {n.kind: [] for n in nodes}
        for round_ in range(bursts):
            for node in nodes:
                rounds[node.kind].append(await burst(node, round_, timeout))
            print(f"burst round {round_ + 1} of {bursts} done", file=sys.stderr, flush=True)
        for first in range(0, rtt_samples, rtt_block):
            for node in nodes:
                for i in range(first, min(first + rtt_block, rtt_samples)):
                    task = numbered(ROUND_TRIP_FIRST + i, 1)
                    node.rtts.append(await node.master.push(task, timeout))
        results = []
        for node in nodes:
            ranked = sorted(rounds[node.kind])
            seconds, cpu, main_cpu, generator_cpu = ranked[(len(ranked) - 1) // 2]
            rtt_ms = statistics.median(node.rtts) * 1000
            wrong = None if node.kind in ANSWER_ZERO else wrong_answers(node.master.results)
            results.append(
                Measurement(
                    node.kind, node.tasks, seconds, cpu, rtt_ms, wrong, main_cpu, generator_cpu
                )
            )
        return results


def table(results: list[Measurement]) -> str:
    by = {r.node: r for r in results}
    lines = [
        "| node | tasks | burst tasks/s | CPU µs/task (main process) | generator CPU µs/task | round trip ms | wrong | burst vs null | burst vs naive | rtt vs null |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        vs_null = f"{r.tasks_per_s / by['null'].tasks_per_s:.2f}x" if "null" in by else "-"
        vs_naive = f"{r.tasks_per_s / by['naive'].tasks_per_s:.1f}x" if "naive" in by else "-"
        rtt_null = f"{r.rtt_ms / by['null'].rtt_ms:.2f}x" if "null" in by else "-"
        lines.append(
            f"| {r.node} | {r.tasks} | {r.tasks_per_s:,.0f} | {r.cpu_us_per_task:.1f} ({r.main_cpu_s / r.tasks * 1e6:.1f}) | {r.generator_cpu_s / r.tasks * 1e6:.1f} | {r.rtt_ms:.3f} | {'-' if r.wrong is None else r.wrong} "
            f"| {vs_null} | {vs_naive} | {rtt_null} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--bursts", type=int, default=3, help="bursts per node, the median kept (default 3)"
    )
    parser.add_argument("--rtt-samples", type=int, default=200)
    parser.add_argument(
        "--rtt-block",
        type=int,
        default=1,
        help="round trips in a row per node before the next node's turn (default 1: each node "
        "then idles while the others take theirs, and wakes from idle for every task)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--nodes", default=",".join(NODES), help="comma-separated: cpnode,null,relay,naive"
    )
    parser.add_argument(
        "--naive-tasks",
        type=int,
        default=None,
        help="tasks per burst for the naive node (default: --tasks, at most 20,000: at about "
        "4,000 tasks/s a larger burst only takes longer to give the same rate)",
    )
    args = parser.parse_args()
    unknown = set(args.nodes.split(",")) - set(NODES)
    if unknown:
        parser.error(f"--nodes: unknown {', '.join(sorted(unknown))} (known: {', '.join(NODES)})")
    kinds = {
        kind: args.tasks
        if kind != "naive"
        else min(args.tasks, 20_000)
        if args.naive_tasks is None
        else args.naive_tasks
        for kind in args.nodes.split(",")
    }
    if min(args.bursts, args.rtt_samples, args.rtt_block, *kinds.values()) < 1:
        parser.error(
            "--tasks, --naive-tasks, --bursts, --rtt-samples and --rtt-block must be at least 1"
        )
    # SIGTERM unwinds like Ctrl-C, so that every node started is stopped.
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    results = asyncio.run(
        measure_all(
            kinds, args.workers, args.bursts, args.rtt_samples, args.timeout, args.rtt_block
        )
    )
    for result in results:
        print(orjson.dumps(result.__dict__).decode(), file=sys.stderr, flush=True)
    print(table(results))
    wrong = {r.node: r.wrong for r in results if r.wrong}
    if wrong:
        print(f"wrong results: {wrong}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
