"""Throughput of the local master: 100,000 tasks submitted, run by fake nodes, results polled.

    this process (one uvloop loop)                          subprocess: cpnode-master
      client ── SubmitTask x N (pipelined) ───────────────▶  journal on, fifo or upstream
      fake nodes ◀── AssignTask ── / ── TaskResult ──────▶
      client ── GetTaskResult x N (pipelined) ────────────▶  peak RSS read from /proc (VmHWM)

The fake nodes answer at protocol level (no evaluation): each AssignTask frame gets a
TaskResult{Number} at once, a whole chunk of frames answered in one write. The master runs in a
subprocess so its peak RSS is its own, and so the fake peers do not share its event loop.

    python bench/bench_master.py [--tasks N] [--nodes K] [--scheduling fifo|upstream]
    pytest bench/bench_master.py --benchmark-enable -p no:timeout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil

from node.master.server import new_event_loop
from node.protocol import FrameDecoder, frame, peek
from node.protocol import messages as m
from node.protocol.codec import encode

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


@dataclass
class Figures:
    tasks: int
    nodes: int
    scheduling: str
    submit_s: float  # until every TaskAccepted came back
    complete_s: float  # until the nodes had sent every result
    total_s: float  # until the client had read every result through GetTaskResult
    master_peak_rss_mib: float
    master_cpu_s: float  # user + system time the master spent during the run
    results: int  # distinct ids whose result the client read back, with the nodes' answer
    wrong: int  # results read back that were not the nodes' answer

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.total_s

    def summary(self) -> str:
        return (
            f"{self.tasks} tasks, {self.nodes} fake nodes, scheduling {self.scheduling}: "
            f"{self.tasks_per_s:,.0f} tasks/s end to end ({self.total_s:.2f} s; all accepted "
            f"after {self.submit_s:.2f} s, all completed after {self.complete_s:.2f} s); "
            f"master CPU {self.master_cpu_s:.2f} s ({self.tasks / self.master_cpu_s:,.0f} tasks "
            f"per master CPU second); master peak RSS {self.master_peak_rss_mib:.1f} MiB; "
            f"{self.results} results read back, {self.wrong} wrong"
        )


def _peak_rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return psutil.Process(pid).memory_info().rss / (1 << 20)


class _Master:
    """cpnode-master in a subprocess on a free port; join.json tells the port."""

    def __init__(self, scheduling: str, window: int) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="cpnode-bench-")
        join = Path(self.dir.name) / "join.json"
        env = dict(os.environ, CPCLUSTER_JOIN=str(join))
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.master.cli",
                "--listen",
                "127.0.0.1:0",
                "--token",
                TOKEN,
                "--scheduling",
                scheduling,
                "--window",
                str(window),
                "--state-file",
                str(Path(self.dir.name) / "state.jsonl"),
                "--log-level",
                "warn",
            ],
            cwd=self.dir.name,
            env=env,
        )
        deadline = time.monotonic() + 15
        while not join.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("cpnode-master did not start")
            time.sleep(0.02)
        self.port = int(json.loads(join.read_text())["port"])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.dir.cleanup()


class _Peer(asyncio.Protocol):
    """A connection that authenticates, then hands every payload to `on_payload`."""

    def __init__(self) -> None:
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.authenticated = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(frame(TOKEN.encode()))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        payloads = self.decoder.feed(data)
        if not self.authenticated.done() and payloads:
            self.authenticated.set_result(payloads.pop(0) == b"OK")
        if payloads:
            self.on_payloads(payloads)

    def on_payloads(self, payloads: list[bytes]) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _FakeNode(_Peer):
    def __init__(self, done: list[int], target: int, finished: asyncio.Future[float]) -> None:
        super().__init__()
        self.done = done
        self.target = target
        self.finished = finished

    def on_payloads(self, payloads: list[bytes]) -> None:
        out = []
        for payload in payloads:
            head = peek(payload)
            if head.variant == "AssignTask" and head.id is not None:
                ident = orjson.dumps(head.id)
                out.append(frame(b'{"TaskResult":{"id":' + ident + b',"result":{"Number":2.0}}}'))
        if out:
            assert self.transport is not None
            self.transport.write(b"".join(out))
            self.done[0] += len(out)
            if self.done[0] >= self.target and not self.finished.done():
                self.finished.set_result(time.perf_counter())


class _Client(_Peer):
    def __init__(self) -> None:
        super().__init__()
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0
        self.replies: list[bytes] = []

    def expect(self, count: int) -> asyncio.Future[None]:
        self.replies = []
        self.expected = count
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def on_payloads(self, payloads: list[bytes]) -> None:
        self.replies += payloads
        if len(self.replies) >= self.expected and self.waiter and not self.waiter.done():
            self.waiter.set_result(None)


async def _run(
    port: int, tasks: int, nodes: int, scheduling: str
) -> tuple[float, float, float, int, int]:
    loop = asyncio.get_running_loop()
    done = [0]
    finished: asyncio.Future[float] = loop.create_future()
    peers: list[_Peer] = []
    try:
        for _ in range(nodes):
            _, node = await loop.create_connection(
                lambda: _FakeNode(done, tasks, finished), "127.0.0.1", port
            )
            peers.append(node)
            assert await asyncio.wait_for(node.authenticated, 10)
            assert node.transport is not None
            node.transport.write(encode(m.RegisterRole(m.Role.Worker)) + encode(m.HEARTBEAT))
        _, client = await loop.create_connection(_Client, "127.0.0.1", port)
        peers.append(client)
        assert await asyncio.wait_for(client.authenticated, 10)
        await asyncio.sleep(0.1)  # the nodes' first Heartbeat has been read

        ids = [f"task-{i}" for i in range(tasks)]
        submits = [encode(m.SubmitTask(ident, m.Compute(f"{i}+1"))) for i, ident in enumerate(ids)]
        accepted = client.expect(tasks)
        start = time.perf_counter()
        assert client.transport is not None
        for i in range(0, tasks, 1000):
            client.transport.write(b"".join(submits[i : i + 1000]))
            await asyncio.sleep(0)
        heartbeats = asyncio.ensure_future(_heartbeat(peers[:nodes], finished))
        await asyncio.wait_for(accepted, 120)
        submitted = time.perf_counter()
        completed = await asyncio.wait_for(finished, 300)
        await heartbeats

        received: dict[str, object] = {}
        remaining = ids
        while remaining:
            polled = client.expect(len(remaining))
            client.transport.write(b"".join(encode(m.GetTaskResult(i)) for i in remaining))
            await asyncio.wait_for(polled, 120)
            for reply in client.replies:
                if reply.startswith(b'{"TaskResult"'):
                    answer = orjson.loads(reply)["TaskResult"]
                    received[answer["id"]] = answer["result"]
            remaining = [ident for ident in remaining if ident not in received]
            if remaining:
                await asyncio.sleep(0.01)
        end = time.perf_counter()
        # What came back, checked against what the fake nodes answered (Number 2.0 each).
        right = sum(1 for ident in ids if received.get(ident) == {"Number": 2.0})
        wrong = len(received) - right
        return submitted - start, completed - start, end - start, right, wrong
    finally:
        for peer in peers:
            if peer.transport is not None:
                peer.transport.close()
        for peer in peers:
            await asyncio.wait_for(peer.closed, 10)


async def _heartbeat(nodes: list[_Peer], finished: asyncio.Future[float]) -> None:
    # Upstream scheduling pushes only after a node's frame: the heartbeat is that frame.
    while not finished.done():
        for node in nodes:
            assert node.transport is not None
            node.transport.write(encode(m.HEARTBEAT))
        await asyncio.wait([finished], timeout=0.05)


def measure(tasks: int = 100_000, nodes: int = 2, scheduling: str = "fifo") -> Figures:
    master = _Master(scheduling, window=1024)
    try:
        process = psutil.Process(master.process.pid)
        before = process.cpu_times()
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            submit_s, complete_s, total_s, results, wrong = runner.run(
                _run(master.port, tasks, nodes, scheduling)
            )
        after = process.cpu_times()
        cpu = after.user + after.system - before.user - before.system
        peak = _peak_rss_mib(master.process.pid)
    finally:
        master.stop()
    return Figures(
        tasks, nodes, scheduling, submit_s, complete_s, total_s, peak, cpu, results, wrong
    )


def test_master_100k_tasks(benchmark):  # type: ignore[no-untyped-def]
    figures: list[Figures] = []
    benchmark.pedantic(lambda: figures.append(measure()), rounds=1, iterations=1)
    result = figures[-1]
    benchmark.extra_info.update(
        tasks_per_s=round(result.tasks_per_s),
        master_peak_rss_mib=round(result.master_peak_rss_mib, 1),
        master_cpu_s=round(result.master_cpu_s, 2),
    )
    print(result.summary())
    # Every task's result was read back from the master, each the fake nodes' answer.
    assert (result.results, result.wrong) == (100_000, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--scheduling", choices=("fifo", "upstream"), default="fifo")
    args = parser.parse_args()
    figures = measure(args.tasks, args.nodes, args.scheduling)
    print(figures.summary())
    if (figures.results, figures.wrong) != (figures.tasks, 0):
        sys.exit(1)


if __name__ == "__main__":
    main()
