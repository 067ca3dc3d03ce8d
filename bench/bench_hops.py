"""What one process hop costs: a task's round trip through a real worker process against a bare
echo child, both over a Unix socket pair, one message at a time.

    python bench/bench_hops.py              # prints median and p10 round trips in µs

A node's round trip crosses two more hops than the null node's (supervisor → worker → supervisor),
each a wake-up of a sleeping process: the echo line is that floor on this machine, the worker line
adds the worker loop and the task itself (a plain `Compute`).

The second table puts that floor next to the null node's, in one run, with no Python work on the
way: this process sends 60 bytes over TCP loopback to a middle process and waits for them back.
`null`: the middle answers (the null node's shape). `two hops`: it relays them over a Unix socket
pair to a child that echoes them (our shape: supervisor and worker). `two hops, spinning`: the
same, but the middle and the child poll their sockets instead of sleeping, two cores' worth of
CPU burned while idle (what spinning can buy at best). `two hops, one CPU`: the middle and the
child pinned to one CPU and this process to another, so the relay is a switch between two
processes on one CPU rather than a wake-up of an idle one (what pinning the supervisor next to a
worker could buy; the row is left out with fewer than two CPUs to pin to). The `added` column is what the shape costs
over `null` in µs: compare it with what a round-trip target allows over the null node's
(`bench/loadgen.py`'s null node takes about 0.15 ms here, so 1.2x of it allows 30 µs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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
    # 64 KiB reads: `recv(1 MiB)` allocates (and gives back) 1 MiB per read, which doubled this
    # floor here; the worker reads into a buffer made once.
    while data := sock.recv(1 << 16):
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


SHAPES = ("null", "two hops", "two hops, spinning", "two hops, one CPU")
MESSAGE = b"x" * 60


def _spin_recv(sock: socket.socket, deadline: float) -> bytes:
    """`sock.recv` on a non-blocking socket, polling (and yielding the CPU to any other runnable
    process: a child woken on this CPU) until data comes or `deadline` passes."""
    while True:
        try:
            return sock.recv(1 << 16)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer while spinning") from None
            os.sched_yield()


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def shape_child(sock: socket.socket, spinning: bool, cpu: int | None = None) -> None:
    _pin(cpu)
    if not spinning:
        echo(sock)
        return
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            continue
        if not data:
            return
        sock.sendall(data)


def shape_middle(
    listener: socket.socket, shape: str, child: socket.socket, cpu: int | None = None
) -> None:
    _pin(cpu)
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    spinning = shape == "two hops, spinning"
    if spinning:
        child.setblocking(False)
    while data := connection.recv(1 << 16):
        if shape != "null":
            child.sendall(data)
            if spinning:
                data = _spin_recv(child, time.monotonic() + TIMEOUT_S)
            else:
                data = child.recv(1 << 16)
        connection.sendall(data)


def shape_round_trips(shape: str, samples: int) -> list[float]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = socket.socketpair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    relay_cpu = client_cpu = None
    if shape.endswith("one CPU"):
        client_cpu, relay_cpu = sorted(os.sched_getaffinity(0))[:2]
    child = context.Process(
        target=shape_child, args=(theirs, shape.endswith("spinning"), relay_cpu)
    )
    middle = context.Process(target=shape_middle, args=(listener, shape, ours, relay_cpu))
    processes = (child, middle)
    for process in processes:
        process.start()
    theirs.close()
    ours.close()
    allowed = os.sched_getaffinity(0)
    _pin(client_cpu)
    try:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT_S) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for _ in range(samples):
                started = time.perf_counter_ns()
                client.sendall(MESSAGE)
                received = 0
                while received < len(MESSAGE):
                    received += len(_recv(client))
                times.append((time.perf_counter_ns() - started) / 1000)
                time.sleep(0.0003)  # as between a node's real tasks
        return times[samples // 10 :]
    finally:
        os.sched_setaffinity(0, allowed)
        listener.close()
        for process in processes:  # the middle ends with the client's socket, the child with it
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
    print("\n| shape (bare sockets) | median µs | p10 µs | added µs |\n|---|---|---|---|")
    null = 0.0
    for shape in SHAPES:
        if shape.endswith("one CPU") and len(os.sched_getaffinity(0)) < 2:
            continue
        times = sorted(shape_round_trips(shape, args.samples))
        median = statistics.median(times)
        null = null or median
        print(f"| {shape} | {median:.1f} | {times[len(times) // 10]:.1f} | {median - null:+.1f} |")


if __name__ == "__main__":
    main()
