"""Payload throughput of the storage tasks through a real node, and worker-to-worker handoff.

    python bench/bench_storage.py            # both tables
    python bench/bench_storage.py --sizes 1024,1048576 --handoff-mib 64

1. `StoreData` + `RetrieveData` round trips of 1 KiB, 1 MiB and 64 MiB through a node (2
   workers) driven by a scripted master on loopback. Frames are built and read with the
   vectorised byte-array codec so the master side is not the bottleneck; MB/s counts blob bytes.
2. Handing a blob from one process to another: through a shared-memory payload segment (written
   once, mapped by the reader) vs pickled through a `multiprocessing.Queue`, same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.protocol import codec
from node.protocol.framing import frame
from shm.bytesjson import decode_byte_array, encode_byte_array
from shm.segments import PayloadSegment
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster


def store_frame(ident: str, key: str, blob: bytes) -> bytes:
    head = b'{"AssignTask":{"id":' + codec.json_str(ident) + b',"task":{"StoreData":{"key":'
    return frame(head + codec.json_str(key) + b',"data":' + encode_byte_array(blob) + b"}}}}")


def read_result(master: ScriptedMaster, ident: str, deadline: float) -> bytes:
    """The raw result payload for `ident` (answering heartbeats on the way)."""
    while True:
        payload = master._next_payload(deadline)
        if payload.startswith(b'{"TaskResult":{"id":' + codec.json_str(ident)):
            return payload
        master._answer(codec.decode(payload))


def round_trips(size: int, repeats: int) -> tuple[float, float]:
    blob = os.urandom(size)
    stores, retrieves = [], []
    with tempfile.TemporaryDirectory(prefix="cpnode-bench-") as tmp:
        root = Path(tmp)
        master = ScriptedMaster()
        master.write_join(root / "join.json")
        settings = {
            "failover_timeout_ms": 60_000,
            "master_addresses": [f"127.0.0.1:{master.port}"],
            "node_id": f"bench-{os.getpid()}",
        }
        node = NodeProcess(root, root / "join.json", settings, "--workers", "2")
        try:
            master.accept()
            node.wait_for_log("node ready")
            conn = master._conn
            assert conn is not None
            for i in range(repeats):
                data = store_frame(f"s{i}", f"k{i}", blob)
                started = time.perf_counter()
                conn.sendall(data)
                result = read_result(master, f"s{i}", time.monotonic() + 300)
                stores.append(time.perf_counter() - started)
                assert result.endswith(b'"result":"Stored"}}'), result[:200]
                started = time.perf_counter()
                conn.sendall(codec.encode(codec.decode(
                    b'{"AssignTask":{"id":"r%d","task":{"RetrieveData":{"key":"k%d"}}}}' % (i, i)
                )))  # fmt: skip
                result = read_result(master, f"r{i}", time.monotonic() + 300)
                retrieves.append(time.perf_counter() - started)  # the master's decode aside
                start = result.index(b'{"Bytes":') + len(b'{"Bytes":')
                assert decode_byte_array(memoryview(result)[start : len(result) - 3]) == blob
            pump = master.answer_in_background()
            node.stop()
            pump.join(10)
        finally:
            node.close()
            master.close()
    return statistics.median(stores), statistics.median(retrieves)


def _read_segment(shm_dir: str, name: str, out: multiprocessing.Queue[float]) -> None:
    segment = PayloadSegment.open(shm_dir, name, unlink=True)
    checksum = sum(segment.buffer[:: 1 << 20])  # touch it, as a consumer would
    segment.close()
    out.put(time.perf_counter() + 0 * checksum)


def _read_queue(source: multiprocessing.Queue[bytes], out: multiprocessing.Queue[float]) -> None:
    blob = source.get()
    out.put(time.perf_counter() + 0 * len(blob))


def handoff(mib: int) -> tuple[float, float]:
    """Seconds to hand `mib` MiB to another process: segment vs queue."""
    ctx = multiprocessing.get_context("spawn")
    blob = os.urandom(mib << 20)
    done: multiprocessing.Queue[float] = ctx.Queue()
    started = time.perf_counter()
    segment = PayloadSegment.create("/dev/shm", f"cpnode-bench{os.getpid()}", len(blob))
    segment.buffer[:] = blob
    name = segment.name
    segment.close()
    reader = ctx.Process(target=_read_segment, args=("/dev/shm", name, done))
    reader.start()
    segment_s = done.get(timeout=300) - started
    reader.join(60)
    source: multiprocessing.Queue[bytes] = ctx.Queue()
    reader = ctx.Process(target=_read_queue, args=(source, done))
    reader.start()
    time.sleep(1.0)  # let the reader start, so its start-up is not counted
    started = time.perf_counter()
    source.put(blob)
    queue_s = done.get(timeout=300) - started
    reader.join(60)
    # The segment's time includes its reader's start-up (spawn); subtract a measured start-up.
    probe = ctx.Process(target=_read_queue, args=(source, done))
    started = time.perf_counter()
    probe.start()
    source.put(b"")
    startup = done.get(timeout=60) - started
    probe.join(60)
    return max(segment_s - startup, 1e-9), queue_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1024,1048576,67108864")
    parser.add_argument("--handoff-mib", type=int, default=256)
    args = parser.parse_args()
    print("| blob | StoreData ms | StoreData MB/s | RetrieveData ms | RetrieveData MB/s |")
    print("|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        repeats = 20 if size <= 1 << 20 else 2
        store, retrieve = round_trips(size, repeats)
        print(
            f"| {size:,} B | {store * 1000:.1f} | {size / store / 1e6:.1f} "
            f"| {retrieve * 1000:.1f} | {size / retrieve / 1e6:.1f} |",
            flush=True,
        )
    segment_s, queue_s = handoff(args.handoff_mib)
    mb = args.handoff_mib * 1.048576
    print(f"\n| handoff of {args.handoff_mib} MiB | seconds | MB/s |\n|---|---|---|")
    print(f"| payload segment (/dev/shm + mmap) | {segment_s:.3f} | {mb / segment_s:,.0f} |")
    print(f"| pickled through multiprocessing.Queue | {queue_s:.3f} | {mb / queue_s:,.0f} |")
    print(f"| ratio | {queue_s / segment_s:.1f}x faster through the segment | |")


if __name__ == "__main__":
    main()
