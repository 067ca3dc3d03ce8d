"""The naive baseline node: asyncio plus one `ProcessPoolExecutor.submit` per task."""

from __future__ import annotations

import asyncio
import signal
from concurrent.futures import ProcessPoolExecutor

from _nodebase import connect, heartbeat, parse_args

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder
from workers.expr import ExpressionError, evaluate_compute


def compute(expression: str) -> m.Result:
    try:
        return m.Number(evaluate_compute(expression))
    except ExpressionError as exc:
        return m.Error(str(exc))


async def main(workers: int) -> None:
    # SIGTERM ends the read loop, so the pool below is shut down and its processes exit
    # (killed outright, they would linger holding the load generator's stdout).
    current = asyncio.current_task()
    assert current is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, current.cancel)
    reader, writer = await connect()
    beat = asyncio.ensure_future(heartbeat(writer))
    decoder = FrameDecoder()
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Future[None]] = set()
    pool = ProcessPoolExecutor(workers)
    try:

        async def run(ident: str, expression: str) -> None:
            result = await loop.run_in_executor(pool, compute, expression)
            writer.write(codec.encode(m.TaskResult(ident, result)))

        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            for payload in decoder.feed(data):
                message = codec.decode(payload)
                if isinstance(message, m.AssignTask) and isinstance(message.task, m.Compute):
                    task = asyncio.ensure_future(run(message.id, message.task.expression))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
    except asyncio.CancelledError:
        pass
    finally:
        beat.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    asyncio.run(main(parse_args().workers))
