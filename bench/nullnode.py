"""The null node: answers every AssignTask at the protocol level without computing.

It parses frames and writes a `TaskResult` per task, as cheaply as Python can (uvloop, one
write per read): the ceiling any Python node can reach on this machine.
"""

from __future__ import annotations

import asyncio

import uvloop
from _nodebase import connect, heartbeat, parse_args, zero_results

from node.protocol.framing import FrameDecoder


async def main() -> None:
    reader, writer = await connect()
    beat = asyncio.ensure_future(heartbeat(writer))
    decoder = FrameDecoder()
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        if out := zero_results(decoder.feed(data)):
            writer.write(out)
    beat.cancel()


if __name__ == "__main__":
    parse_args()
    uvloop.run(main())
