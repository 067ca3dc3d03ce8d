"""What the benchmark scripts share: the null, relay and naive nodes' join.json, handshake,
heartbeats and zero answers, and a SIGTERM that unwinds like Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import os

import orjson

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A benchmark node: joins the master named by $CPCLUSTER_JOIN (else "
        "./join.json) and answers its tasks until the master closes the connection."
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes (default 2; the null node computes nothing and has none)",
    )
    return parser.parse_args()


async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    with open(os.environ.get("CPCLUSTER_JOIN", "join.json"), "rb") as f:
        join = orjson.loads(f.read())
    reader, writer = await asyncio.open_connection(join["ip"], join["port"], limit=1 << 24)
    writer.write(frame(join["token"].encode()))
    decoder = FrameDecoder()
    while True:
        data = await reader.read(64)
        if not data:
            raise ConnectionError("the master closed the connection before answering the token")
        answers = decoder.feed(data)
        if answers:
            assert answers[0] == b"OK", answers[0]
            break
    writer.write(codec.encode(m.RegisterRole(m.Role.Worker)) + codec.encode(m.HEARTBEAT))
    return reader, writer


async def heartbeat(writer: asyncio.StreamWriter) -> None:
    while True:
        await asyncio.sleep(2.5)
        writer.write(codec.encode(m.HEARTBEAT))


_ZERO_RESULT = b',"result":{"Number":0.0}}}'


def zero_results(payloads: list[bytes]) -> bytes:
    """A `TaskResult` frame of 0 for every `AssignTask` among `payloads`, as one write: what
    the null and relay nodes answer, computing nothing."""
    return b"".join(
        frame(b'{"TaskResult":{"id":' + codec.json_str(codec.peek(payload).id or "") + _ZERO_RESULT)
        for payload in payloads
        if payload.startswith(b'{"AssignTask":')
    )


def stop_on_sigterm(signum: int, frame: object) -> None:
    """A `signal.signal` handler for SIGTERM: unwind like Ctrl-C, so that every `finally`
    (and `asyncio.run`'s cancellation of its tasks) stops what it started."""
    raise KeyboardInterrupt
