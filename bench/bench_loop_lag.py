"""How long the supervisor's event loop stalls while a big `Tcp` task is decoded: orjson on the
loop, orjson in a thread (it holds the GIL, so the loop still waits) and the vectorised codec in
a thread (`workers.storage.decode_blob_task`, what `node.iotasks` does above 1 MiB), for the
task as masters write it and in another JSON form ("task" before "id", spaces), which
`decode_blob_task` reads around its byte array.

    python bench/bench_loop_lag.py [--mib 4]      # prints decode time and worst timer lateness

A 1 ms timer runs on the loop meanwhile; its worst lateness is how late a heartbeat could be.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.protocol import codec
from node.protocol import messages as m
from workers.storage import decode_blob_task


async def _measure(decode: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    worst = 0.0
    running = True

    async def tick() -> None:
        nonlocal worst
        while running:
            planned = loop.time() + 0.001
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - planned)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await decode()
    elapsed = time.perf_counter() - started
    running = False
    await ticker
    return elapsed, worst


async def _run(payloads: dict[str, bytes], expected: m.Task) -> None:
    loop = asyncio.get_running_loop()
    print("| form | decode | ms | worst loop lag ms |\n|---|---|---|---|")
    for form, payload in payloads.items():

        async def on_loop(payload: bytes = payload) -> object:
            return codec.decode(payload)

        ways: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("orjson on the loop", on_loop),
            ("orjson in a thread", lambda p=payload: loop.run_in_executor(None, codec.decode, p)),
            (
                "vectorised in a thread",
                lambda p=payload: loop.run_in_executor(None, decode_blob_task, p),
            ),
        ]
        blob = decode_blob_task(payload)
        if blob is None or blob[1] != expected:
            raise SystemExit(f"decode_blob_task did not decode the Tcp task ({form})")
        for name, decode in ways:
            elapsed, worst = await _measure(decode)
            print(f"| {form} | {name} | {elapsed * 1000:.0f} | {worst * 1000:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=4, help="MiB of Tcp data (default 4)")
    args = parser.parse_args()
    task = m.Tcp("127.0.0.1:9", os.urandom(args.mib << 20))
    other = b' { "AssignTask" : { "task" : ' + codec.task_to_json(task) + b' , "id" : "x" } }'
    payloads = {
        "as masters write it": codec.encode_payload(m.AssignTask("x", task)),
        "other": other,
    }
    asyncio.run(_run(payloads, task))


if __name__ == "__main__":
    main()
