"""pytest-benchmark entry points for a whole node: bursts and lone round trips of tiny `Compute`
tasks through cpnode and the reference nodes of `loadgen.py` (null, relay, naive), each behind
its own fake master on loopback.

    tox -e bench -- bench/bench_node.py
    python -m pytest bench/bench_node.py -o python_files=bench_*.py --benchmark-enable \\
        --timeout=0 [--benchmark-group-by=group]

Groups: "burst of N tasks" (N = $CPNODE_BENCH_TASKS, default 100,000, in one write; the naive
node, in a group of its own, gets 5,000: compare `tasks_per_s`) and "round trip" (one task at
a time). Every round uses new ids and new
expressions, so no node answers from a cache, and every answer of a computing node is checked.
`python bench/loadgen.py` prints the same comparison as one table, with CPU per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from loadgen import (
    ANSWER_ZERO,
    NODES,
    Running,
    assign_frames,
    numbered,
    start_node,
    wrong_answers,
)

BURST_TASKS = int(os.environ.get("CPNODE_BENCH_TASKS", "100000"))
NAIVE_TASKS = min(BURST_TASKS, 5_000)  # about a second at its rate
WORKERS = 2
TIMEOUT_S = 600.0
_first = itertools.count()  # a block of BURST_TASKS task numbers per round


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", params=list(NODES))
def node(request: pytest.FixtureRequest, loop: asyncio.AbstractEventLoop) -> Iterator[Running]:
    kind = request.param
    tasks = NAIVE_TASKS if kind == "naive" else BURST_TASKS
    stack = contextlib.AsyncExitStack()
    try:
        yield loop.run_until_complete(start_node(kind, tasks, WORKERS, TIMEOUT_S, stack))
    finally:
        loop.run_until_complete(stack.aclose())


def _run(
    benchmark: Any, loop: asyncio.AbstractEventLoop, node: Running, size: int, rounds: int
) -> None:
    """Push `size` new tasks per round (numbers no other round or test used), every answer
    awaited."""

    def setup() -> tuple[tuple[list[tuple[str, str]], bytes], dict[str, Any]]:
        tasks = numbered(next(_first) * BURST_TASKS, size)
        return (tasks, assign_frames(tasks)), {}

    def push(tasks: list[tuple[str, str]], blob: bytes) -> None:
        loop.run_until_complete(node.master.push(tasks, TIMEOUT_S, blob))

    benchmark.pedantic(push, setup=setup, rounds=rounds, iterations=1)


def _check(node: Running) -> None:
    # The null and relay nodes answer 0 on purpose: `push` saw each of their answers arrive.
    if node.kind not in ANSWER_ZERO:
        assert wrong_answers(node.master.results) == 0


def test_burst(benchmark: Any, loop: asyncio.AbstractEventLoop, node: Running) -> None:
    benchmark.group = f"burst of {node.tasks} tasks"
    _run(benchmark, loop, node, node.tasks, rounds=3)
    _check(node)
    if benchmark.stats is not None:
        benchmark.extra_info["tasks"] = node.tasks
        benchmark.extra_info["tasks_per_s"] = round(node.tasks / benchmark.stats.stats.median)


def test_round_trip(benchmark: Any, loop: asyncio.AbstractEventLoop, node: Running) -> None:
    benchmark.group = "round trip"
    _run(benchmark, loop, node, 1, rounds=200)
    _check(node)
