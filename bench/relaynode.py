"""The relay node: the null node split across processes, the best a node shaped like ours can do.

Its event loop only relays: it finds the frames of each read from the master and hands the
`AssignTask` frames, unparsed beyond the variant, to its child processes (split evenly, one
write per child per read). A child answers each one as the null node does (a `TaskResult` of
0, nothing computed) and writes its results back in one message per batch, which the loop
copies to the master as it comes. No bookkeeping, no result checks, no heartbeat accounting:

    master ──TCP──▶ loop (frames, split) ──socketpair──▶ child k (peek id, answer 0)
    master ◀──TCP── loop (copy whole batches) ◀──socketpair── child k

Whatever a node with a supervisor and worker processes does (the supervisor's event loop
never computes), it pays at least these two process hops per task and this
relaying: the relay node's burst and round trip bound such a node from above, on the same
machine in the same run (`python bench/loadgen.py --nodes cpnode,null,relay`).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import struct

import uvloop
from _nodebase import connect, heartbeat, parse_args, zero_results

from node.protocol.framing import FrameDecoder, frame

_BATCH = struct.Struct(">I")  # child → loop: the byte length of a batch of result frames
_BUFFER = 1 << 20


def child(sock: socket.socket, inherited: list[socket.socket]) -> None:
    """Answer every AssignTask frame that arrives with a zero result, one write per read;
    exit when the loop's end closes (the loop's ends it inherited are closed first, or it
    would never see that)."""
    for other in inherited:
        other.close()
    decoder = FrameDecoder()
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    while count := sock.recv_into(buffer):
        if out := zero_results(decoder.feed(view[:count].tobytes())):
            sock.sendall(_BATCH.pack(len(out)) + out)


class _Results(asyncio.Protocol):
    """Copies each whole batch a child sends to the master, in the order it arrives."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending = bytearray()

    def data_received(self, data: bytes) -> None:
        pending = self._pending
        pending += data
        start = 0
        while len(pending) - start >= 4:
            (size,) = _BATCH.unpack_from(pending, start)
            if len(pending) - start - 4 < size:
                break
            self._writer.write(pending[start + 4 : start + 4 + size])
            start += 4 + size
        del pending[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        # A child gone (dead, or stopped at the end): close the master's connection, so that
        # a load generator waiting for that child's answers learns it at once.
        self._writer.close()


async def main(children: list[socket.socket]) -> None:
    reader, writer = await connect()
    loop = asyncio.get_running_loop()
    transports = []
    for sock in children:
        transport, _ = await loop.connect_accepted_socket(lambda: _Results(writer), sock)
        transports.append(transport)
    beat = asyncio.ensure_future(heartbeat(writer))
    decoder = FrameDecoder()
    share = len(transports)
    while True:
        data = await reader.read(1 << 20)
        if not data:
            break
        tasks = [p for p in decoder.feed(data) if p.startswith(b'{"AssignTask":')]
        if not tasks:
            continue
        step = -(-len(tasks) // share)
        for index, transport in enumerate(transports):
            part = tasks[index * step : (index + 1) * step]
            if part:
                transport.write(b"".join(frame(payload) for payload in part))
    beat.cancel()
    for transport in transports:
        transport.close()


if __name__ == "__main__":
    args = parse_args()
    # Forked before any event loop or thread exists, which is what makes fork safe here.
    context = multiprocessing.get_context("fork")
    sockets: list[socket.socket] = []
    processes = []
    for _ in range(max(1, args.workers)):
        ours, theirs = socket.socketpair()
        process = context.Process(target=child, args=(theirs, [*sockets, ours]), daemon=True)
        process.start()
        theirs.close()
        sockets.append(ours)
        processes.append(process)
    try:
        uvloop.run(main(sockets))
    finally:
        for started in processes:
            started.terminate()
            started.join(5)
