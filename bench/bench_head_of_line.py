"""Head-of-line blocking: how long quick tasks wait when a long one arrives with them.

    python bench/bench_head_of_line.py            # prints a table (ms from the read)

One read brings a task of `--long-s` seconds and `--quick` quick ones (1 ms each) to a node's
dispatcher with two real worker processes (the pool and dispatcher the supervisor runs, without
the master link), `prefetch` 1024. The waiting tasks are shared out evenly, so the long task's
worker gets about half of the quick ones queued behind it; once its task has run 50 ms and the
other worker idles, they are taken back (work stealing) and run there. Without the take-back
(`--compare` runs that too; the long task's worker still gets no new tasks) they wait for the
long task.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node import dispatch
from node.protocol import codec
from node.protocol import messages as m
from workers.pool import WorkerPool
from workers.tasks import WorkerSettings

TIMEOUT_S = 60.0


async def run(long_s: float, quick: int, take_back: bool) -> tuple[float, float, list[int]]:
    arrived: dict[str, float] = {}
    start = 0.0

    def delivered(blob: object, ids: list[str]) -> None:
        now = time.monotonic()
        for ident in ids:
            arrived[ident] = (now - start) * 1000

    dispatcher = dispatch.Dispatcher(1024, delivered)
    pool = WorkerPool(
        2,
        # tests/slowtasks.py: a `Compute` of "sleep S" sleeps S seconds.
        WorkerSettings(executors={"Compute": "tests.slowtasks:compute"}),
        on_results=dispatcher.results,
        on_worker_ready=dispatcher.worker_ready,
        on_worker_lost=dispatcher.worker_lost,
        start_method="spawn",
    )
    dispatcher.pool = pool
    if not take_back:
        dispatcher._arm_take_back = lambda delay: None  # type: ignore[method-assign]
    try:
        await pool.start()
        ids = ["long", *(f"q{i}" for i in range(quick))]
        tasks = [m.Compute(f"sleep {long_s}")] + [m.Compute("sleep 0.001")] * quick
        payloads = [
            codec.encode_payload(m.AssignTask(i, t)) for i, t in zip(ids, tasks, strict=True)
        ]
        start = time.monotonic()
        dispatcher.accept_from_master(ids, payloads)
        async with asyncio.timeout(TIMEOUT_S):
            await dispatcher.idle.wait()
        last_quick = max(ms for ident, ms in arrived.items() if ident != "long")
        return last_quick, arrived["long"], [w.tasks_done for w in pool.workers]
    finally:
        await pool.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--long-s", type=float, default=2.0, help="the long task (default 2 s)")
    parser.add_argument(
        "--quick", type=lambda text: max(1, int(text)), default=99, help="quick tasks (default 99)"
    )
    parser.add_argument("--compare", action="store_true", help="also run with taking back off")
    args = parser.parse_args()
    print("| take-back | last quick result ms | long result ms | tasks per worker |")
    print("|---|---|---|---|")
    for take_back in (True, False) if args.compare else (True,):
        quick, long, per_worker = asyncio.run(run(args.long_s, args.quick, take_back))
        print(f"| {'on' if take_back else 'off'} | {quick:.0f} | {long:.0f} | {per_worker} |")


if __name__ == "__main__":
    main()
