"""What one process hop costs: a task's round trip through a real worker process against a bare
echo child, both over a Unix socket pair, one message at a time.

    python bench/bench_hops.py              # prints median and p10 round trips in µs

A node's round trip crosses two more hops than the null node's (supervisor → worker → supervisor),
each a wake-up of a sleeping process: the echo line is that floor on this machine, the worker line
adds the worker loop and the task itself (a plain `Compute`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame
from workers.channel import HEADER, RESULTS
from workers.tasks import WorkerSettings
from workers.worker import NO_RUN_LIMIT, PROGRESS_FIELDS, RUN_LIMIT, worker_main

TIMEOUT_S = 10.0


def echo(sock: socket.socket) -> None:
    while data := sock.recv(1 << 20):
        sock.sendall(data)


def _recv(sock: socket.socket) -> bytes:
    """What the peer sent; EOFError when it is gone (a dead peer would spin the loops forever)."""
    data = sock.recv(1 << 16)
    if not data:
        raise EOFError("the peer closed the socket (did it die?)")
    return data


def _results_message(sock: socket.socket) -> None:
    """Read messages until a RESULTS one (a worker also sends READY and STATS)."""
    buffer = b""
    while True:
        while len(buffer) < HEADER.size:
            buffer += _recv(sock)
        kind, _, length = HEADER.unpack_from(buffer)
        while len(buffer) < HEADER.size + length:
            buffer += _recv(sock)
        if kind == RESULTS:
            return
        buffer = buffer[HEADER.size + length :]


def round_trips(kind: str, samples: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = socket.socketpair()
    ours.settimeout(TIMEOUT_S)
    if kind == "echo":
        process = context.Process(target=echo, args=(theirs,))
    else:
        progress = context.RawArray("q", PROGRESS_FIELDS)
        progress[RUN_LIMIT] = NO_RUN_LIMIT
        process = context.Process(target=worker_main, args=(theirs, WorkerSettings(), 0, progress))
    process.start()
    theirs.close()
    try:
        if kind == "worker":
            _recv(ours)  # READY
        times = []
        for i in range(samples):
            message = frame(codec.encode_payload(m.AssignTask(f"t{i}", m.Compute(f"{i}+1*2"))))
            started = time.perf_counter_ns()
            ours.sendall(message)
            if kind == "echo":
                received = 0
                while received < len(message):
                    received += len(_recv(ours))
            else:
                _results_message(ours)
            times.append((time.perf_counter_ns() - started) / 1000)
            time.sleep(0.0002)  # let the other side go back to sleep, as between real tasks
        return times[samples // 10 :]  # without the warm-up
    finally:
        ours.close()
        process.join(TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join(TIMEOUT_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument(
        "--samples", type=int, default=2000, help="round trips per peer (default 2000)"
    )
    args = parser.parse_args()
    print("| peer | median µs | p10 µs |\n|---|---|---|")
    for kind in ("echo", "worker"):
        times = sorted(round_trips(kind, args.samples))
        print(f"| {kind} | {statistics.median(times):.1f} | {times[len(times) // 10]:.1f} |")


if __name__ == "__main__":
    main()
