"""What the idle poll buys behind a master that pushes only when the node speaks.

The upstream master sends a node tasks only while handling a frame from that node. An idle node
therefore polls with a `Heartbeat` every `poll_interval_ms`; this measures the submit-to-result
latency of one task at a time through `cpnode-master --scheduling upstream` (which reproduces
that pushing) for several intervals, in one run.

    python bench/bench_poll.py [--intervals MS ...] [--samples N]    # prints a table
    python -m pytest bench/bench_poll.py -o python_files='bench_*.py' --benchmark-enable

Ctrl-C or SIGTERM stops the node it started (and the master) before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _nodebase import stop_on_sigterm

from node.client import Client
from node.config import Config
from node.master import MasterThread
from node.protocol import messages as m
from tests.nodeproc import NodeProcess

INTERVALS_MS = (10, 50, 200)


async def latencies(join: Path, samples: int) -> list[float]:
    out = []
    async with Client.connect(join, timeout=30) as client:
        for i in range(samples):
            started = time.perf_counter()
            result = await client.run(m.Compute(f"{i}+1"), timeout=30, poll_interval=0.002)
            out.append(time.perf_counter() - started)
            assert result == m.Number(float(i + 1))
    return out


def measure(poll_ms: int, samples: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="cpnode-poll-") as tmp:
        root = Path(tmp)
        join = root / "join.json"
        with MasterThread(Config(), join_path=str(join), scheduling="upstream") as master:
            node = NodeProcess(
                root, join,
                {"master_addresses": [master.address], "poll_interval_ms": poll_ms},
                "--workers", "1",
            )  # fmt: skip
            try:
                node.wait_for_log("node ready")
                return asyncio.run(latencies(join, samples))
            finally:
                try:
                    node.stop()
                finally:
                    node.close()  # SIGKILL as a last resort; closes its log


def test_poll_interval_latency(benchmark: Any) -> None:
    benchmark.pedantic(measure, args=(50, 20), rounds=1, iterations=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Submit-to-result latency of one task at a time through a master with "
        "upstream scheduling, for several poll_interval_ms values of a real node.",
    )
    parser.add_argument(
        "--intervals", type=int, nargs="+", default=list(INTERVALS_MS), metavar="MS",
        help=f"poll_interval_ms values to measure (default {' '.join(map(str, INTERVALS_MS))})",
    )  # fmt: skip
    parser.add_argument("--samples", type=int, default=100, help="tasks per interval (default 100)")
    args = parser.parse_args()
    if args.samples < 1:
        parser.error("--samples must be at least 1")
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print("| poll_interval_ms | median ms | p90 ms |\n|---|---|---|")
    try:
        for poll in args.intervals:
            values = sorted(measure(poll, args.samples))
            median = statistics.median(values) * 1000
            p90 = values[int(len(values) * 0.9)] * 1000
            print(f"| {poll} | {median:.1f} | {p90:.1f} |", flush=True)
    except KeyboardInterrupt:
        print("interrupted: node and master stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
