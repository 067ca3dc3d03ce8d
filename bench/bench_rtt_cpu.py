"""Where a lone task's round trip goes: its median and the CPU each node spends on it, by process.

    python bench/bench_rtt_cpu.py                      # cpnode, null and relay, 3 rounds
    python bench/bench_rtt_cpu.py --samples 5000 --rounds 5

Each node runs behind its own fake master (bench/loadgen.py's); a round sends `--samples` tasks
one at a time to each node in turn, and reads the node's CPU time (its main process, and its
children: our workers, the relay's echo processes) before and after. A time read off /proc counts
in 10 ms ticks, so a round of 2,000 round trips resolves 5 µs a round trip. The rounds alternate
between the nodes, so load from other jobs on a shared machine falls on all of them alike: compare
the nodes within a round.

What it shows: a round trip through a worker process costs twice the null node's system calls in
the supervisor (a read and a write each way, and a wake-up per hop), which is the relay node's
shape too; the difference between `cpnode` and `relay` is what our own Python costs on the way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics

from _nodebase import stop_on_sigterm
from loadgen import ROUND_TRIP_FIRST, numbered, start_node, tree_cpu_seconds

KINDS = ("cpnode", "null", "relay")


async def measure(kinds: list[str], workers: int, samples: int, rounds: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await start_node(kind, 2000, workers, 60.0, stack) for kind in kinds]
        number = ROUND_TRIP_FIRST
        print("| round | node | median round trip µs | main CPU µs/round trip | children |")
        print("|---|---|---|---|---|")
        for round_ in range(1, rounds + 1):
            for node in nodes:
                main_before, children_before = tree_cpu_seconds(node.process)
                times = []
                for _ in range(samples):
                    times.append(await node.master.push(numbered(number, 1), 10.0))
                    number += 1
                main_after, children_after = tree_cpu_seconds(node.process)
                main = (main_after - main_before) / samples * 1e6
                children = (children_after - children_before) / samples * 1e6
                median = statistics.median(times) * 1e6
                print(f"| {round_} | {node.kind} | {median:.0f} | {main:.0f} | {children:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=2000, help="round trips per node a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--nodes", default=",".join(KINDS), help="comma-separated: " + ",".join(KINDS)
    )
    args = parser.parse_args()
    kinds = args.nodes.split(",")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"--nodes: unknown {', '.join(sorted(unknown))}")
    if min(args.samples, args.rounds, args.workers) < 1:
        parser.error("--samples, --rounds and --workers must be at least 1")
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # unwinds like Ctrl-C: every node stops
    asyncio.run(measure(kinds, args.workers, args.samples, args.rounds))


if __name__ == "__main__":
    main()
