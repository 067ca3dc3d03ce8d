"""Big results come back from a real worker process through a payload segment (or, when
shm_dir has no room, through the socket pair), whole and in order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import uvloop

from node import link as link_module
from node.config import Config, JoinInfo
from node.direct import DirectConnection
from node.dispatch import Dispatcher
from node.link import MasterLink, _Connection
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame
from node.supervisor import Node
from shm.errors import StoreFullError
from shm.segments import (
    IncomingSegment,
    PayloadSegment,
    discard_spilled,
    spill_reference,
    write_segment,
)
from tests.test_shm_segments import SHM, mounted_tmpfs, ours
from workers.channel import RESULT_SEGMENT_BYTES, Frames
from workers.pool import Worker, WorkerLimits, WorkerPool
from workers.storage import STREAM_BYTES, BytesResult, bytes_result_json
from workers.tasks import WorkerSettings

BIG = bytes(range(256)) * 2048  # 512 KiB of data: a ~1.8 MB result frame
SMALL = b"small"


def test_write_segment_holds_the_pieces_and_a_detached_view_outlives_the_object() -> None:
    prefix = f"cpnode-t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pieces = [b"head:", memoryview(BIG), bytearray(b":tail")]
    name = write_segment(SHM, prefix, iter(pieces), len(BIG) + 10)
    assert ours(prefix) == [name]
    segment = PayloadSegment.open(SHM, name, unlink=True)
    assert ours(prefix) == []
    view = segment.detach()
    assert segment.closed
    del segment
    assert view[:5] == b"head:" and view[-5:] == b":tail" and view[5:-5] == BIG
    view.release()


def test_write_segment_on_a_full_tmpfs_leaves_nothing(tmp_path: Path) -> None:
    prefix = f"cpnode-t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        with pytest.raises(StoreFullError, match="short by"):  # psutil's look, first
            write_segment(tiny, prefix, [BIG, BIG, BIG], 3 * len(BIG))
        with pytest.raises(StoreFullError, match="keep 600000 bytes free"):
            write_segment(tiny, prefix, [BIG], len(BIG), reserve_bytes=600_000)

        def racing() -> Iterator[bytes]:
            """Another writer fills the tmpfs between psutil's look and the writes."""
            yield BIG[:4096]
            (tiny / "filler").write_bytes(b"\xff" * int(psutil.disk_usage(tiny).free))
            yield BIG[4096:]

        with pytest.raises(StoreFullError, match="filesystem is full"):
            write_segment(tiny, prefix, racing(), len(BIG))
        (tiny / "filler").unlink()
        with pytest.raises(ValueError, match="pieces longer than the 10 bytes announced"):
            write_segment(tiny, prefix, [BIG], 10)
        with pytest.raises(ValueError, match="10 bytes written, 11 announced"):
            write_segment(tiny, prefix, [BIG[:10]], 11)
        assert ours(prefix, str(tiny)) == []


class PoolRun:
    """One real worker process behind a Dispatcher; frames delivered to the master side are
    kept as they came (bytes, or a mapped view)."""

    def __init__(self, settings: WorkerSettings, limits: WorkerLimits | None = None) -> None:
        self.delivered: list[tuple[type, int, list[m.Message]]] = []
        self.dispatcher = Dispatcher(16, self._deliver)
        self.pool = WorkerPool(
            1,
            settings,
            on_results=self.dispatcher.results,
            on_worker_ready=self._ready,
            on_worker_lost=self.dispatcher.worker_lost,
            start_method="spawn",
            limits=limits,
        )
        self.dispatcher.pool = self.pool

    def _ready(self, worker: Worker) -> None:
        self.dispatcher.worker_ready(worker)

    def _deliver(self, blob: Frames, ids: list[str]) -> None:
        payloads = FrameDecoder().feed(blob)
        messages = [codec.decode(p) for p in payloads]
        assert [message.id for message in messages] == ids  # type: ignore[attr-defined]
        self.delivered.append((type(blob), len(ids), messages))

    def results(self) -> list[m.Message]:
        return [message for _, _, messages in self.delivered for message in messages]

    async def run(self, tasks: list[tuple[str, m.Task]]) -> None:
        for ident, task in tasks:
            self.dispatcher.accept(ident, codec.encode_payload(m.AssignTask(ident, task)))
        deadline = asyncio.get_running_loop().time() + 30
        while len(self.results()) < len(tasks):
            assert asyncio.get_running_loop().time() < deadline, self.delivered
            await asyncio.sleep(0.02)


def run_reads(settings: WorkerSettings, storage: Path) -> PoolRun:
    """Small, big, small, big DiskReads in one batch, through one worker."""
    (storage / "big.bin").write_bytes(BIG)
    (storage / "small.bin").write_bytes(SMALL)
    tasks: list[tuple[str, m.Task]] = [
        (f"t{i}", m.DiskRead("big.bin" if i % 2 else "small.bin")) for i in range(4)
    ]

    async def scenario() -> PoolRun:
        run = PoolRun(settings)
        await run.pool.start()
        try:
            await run.run(tasks)
        finally:
            await run.pool.stop()
        return run

    run = asyncio.run(scenario())
    expected = [
        m.TaskResult(ident, m.Bytes(BIG if i % 2 else SMALL)) for i, (ident, _) in enumerate(tasks)
    ]
    assert run.results() == expected  # every result whole, in order
    return run


def test_a_big_result_comes_back_through_a_segment_in_order(tmp_path: Path) -> None:
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    settings = WorkerSettings(node_id=node_id, storage_dir=str(tmp_path), shm_dir=SHM)
    run = run_reads(settings, tmp_path)
    assert run.pool.result_segments == 2
    mapped = [(kind, count) for kind, count, _ in run.delivered if kind is memoryview]
    assert mapped == [(memoryview, 1), (memoryview, 1)]
    big_frame = len(codec.encode(m.TaskResult("t1", m.Bytes(BIG))))
    assert big_frame >= RESULT_SEGMENT_BYTES
    assert ours(f"cpnode-{node_id}") == []  # taken over and unlinked on arrival


def test_without_room_in_shm_dir_a_big_result_takes_the_socket(tmp_path: Path) -> None:
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with mounted_tmpfs(tmp_path / "tiny", "4m") as tiny:
        settings = WorkerSettings(node_id=node_id, storage_dir=str(tmp_path), shm_dir=str(tiny))
        run = run_reads(settings, tmp_path)
        assert run.pool.result_segments == 0
        assert all(kind is bytes for kind, _, _ in run.delivered)
        assert os.listdir(tiny) == []


def unconnected_link() -> MasterLink:
    """A master link that never connects: its outbox, for tests of what it holds."""
    return MasterLink(
        Config(),
        JoinInfo("token", "127.0.0.1", 9),
        m.Role.Worker,
        on_assign=lambda ids, payloads: None,
        has_capacity=lambda: True,
    )


def test_the_outbox_finds_and_lists_a_result_held_as_a_mapping() -> None:
    """What the master link does with an unconfirmed mapped result: find it for a repeated
    id, name it in the final log of undelivered results."""
    link = unconnected_link()
    first = codec.encode(m.TaskResult("a", m.Number(1.0)))
    second = codec.encode(m.TaskResult("b", m.Error("no")))
    big = codec.encode(m.TaskResult("big", m.Bytes(BIG)))
    prefix = f"cpnode-t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    name = write_segment(SHM, prefix, [big], len(big))
    view = PayloadSegment.open(SHM, name, unlink=True).detach()
    link.send_results(first + second, ["a", "b"])
    link.send_results(view, ["big"])
    assert link.unconfirmed == 3
    assert link.undelivered_ids() == ["a", "b", "big"]
    assert link.find_result("big") is view
    assert link.find_result("b") == second
    assert link.find_result("c") is None


@pytest.fixture
def outbox_splits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the outbox entries the master link splits into frames to find a result."""
    splits: list[int] = []

    class Counted(FrameDecoder):
        def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
            payloads = super().feed(data)
            splits.append(len(payloads))
            return payloads

    monkeypatch.setattr(link_module, "FrameDecoder", Counted)
    return splits


def results_of(ids: list[str]) -> bytes:
    return b"".join(codec.encode(m.TaskResult(i, m.Number(2.0))) for i in ids)


def test_repeated_ids_read_the_outbox_once_not_once_each(outbox_splits: list[int]) -> None:
    """A master that assigns thousands of tasks again while their results are unconfirmed (a
    restarted master replaying its journal): each repeated id once scanned the whole outbox,
    and 20,000 of them held the event loop for over a minute. Then the index was built by
    reading every frame of the outbox: 0.8 s for 300,000 results. Now it is built from the
    ids the dispatcher hands over, and an entry is split only when one of its results is
    wanted, once."""
    link = unconnected_link()
    dispatcher = Dispatcher(4, link.send_results)
    dispatcher.outbox = link
    ids = [f"t{i}" for i in range(2000)]
    payloads = {i: codec.encode_payload(m.AssignTask(i, m.Compute("1+1"))) for i in ids}
    for start in range(0, len(ids), 64):  # results as the workers return them, in batches
        batch = ids[start : start + 64]
        link.send_results(results_of(batch), batch)
        dispatcher._answered.update((i, payloads[i]) for i in batch)
    entries = len(link._outbox)
    dispatcher.accept_from_master(ids[:100], [payloads[i] for i in ids[:100]])
    assert outbox_splits == [64, 64]  # the two entries of the first 100 ids, once each
    dispatcher.accept_from_master(ids[100:], [payloads[i] for i in ids[100:]])
    assert dispatcher.results_resent == len(ids)
    assert len(outbox_splits) == entries  # each entry once; the resends are one frame each
    resent = b"".join(bytes(entry[1]) for entry in list(link._outbox)[entries:])  # type: ignore[call-overload]
    assert resent == results_of(ids)


@pytest.mark.parametrize("ident", ["short", "x" * 5000, "é" * 100, 'q"' + "y" * 100])
def test_a_mapped_result_is_found_by_an_id_of_any_length(ident: str) -> None:
    # Only the first 4 KiB of a mapped frame were read for its id: a longer id was not
    # found, and its repeated task ran again.
    link = unconnected_link()
    result = codec.encode(m.TaskResult(ident, m.Bytes(bytes(300_000))))
    view = memoryview(result)
    link.send_results(view, [ident])
    assert link.find_result(ident) is view
    assert link.undelivered_ids() == [ident]


def test_a_confirmed_mapped_result_is_unmapped_off_the_event_loop() -> None:
    # Unmapping a big result segment frees its pages (0.1 s for 512 MiB): the last reference
    # went on the loop's thread when the master confirmed it.
    unmapped_in: list[str] = []

    async def scenario() -> None:
        link = unconnected_link()
        frame_bytes = codec.encode(m.TaskResult("big", m.Bytes(bytes(100_000))))
        mapping = mmap.mmap(-1, len(frame_bytes))
        mapping[:] = frame_bytes
        weakref.finalize(mapping, lambda: unmapped_in.append(threading.current_thread().name))
        link.send_results(memoryview(mapping), ["big"])
        del mapping
        assert link.mapped_bytes == len(frame_bytes)
        link._outbox[0][0] = 1  # written on a connection, then acknowledged
        link._acked()
        assert link.mapped_bytes == 0 and link.unconfirmed == 0
        async with asyncio.timeout(10):
            while not unmapped_in:
                await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert unmapped_in and threading.main_thread().name not in unmapped_in


def spill_prefix() -> str:
    return f"cpnode-t{os.getpid()}-{uuid.uuid4().hex[:8]}"


def test_a_spilled_task_whose_id_follows_its_array_is_routed_after_an_off_loop_search(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its head (4 KiB) does not show the id, which is read around the byte array in the
    # segment: on the loop that took 43 ms for 256 MiB and 245 ms for 960 MiB.
    searched_in: list[str] = []
    around = codec.id_around_byte_array

    def recorded(text: bytes, variant: str) -> str | None:
        searched_in.append(threading.current_thread().name)
        return around(text, variant)

    monkeypatch.setattr(codec, "id_around_byte_array", recorded)
    assigned: list[tuple[str, bytes]] = []
    array = orjson.dumps(list(bytes(5000)))  # 10 KB of "0,": the id is past the head
    body = b'{"AssignTask":{"task":{"StoreData":{"key":"k","data":' + array + b'}},"id":"late"}}'
    incoming = IncomingSegment(SHM, spill_prefix(), len(body))
    incoming.write(body)
    reference = incoming.finish()

    async def scenario() -> None:
        link = unconnected_link()
        link._on_assign = lambda ids, payloads: assigned.extend(zip(ids, payloads, strict=True))
        link.on_payload(reference)
        async with asyncio.timeout(10):
            while not assigned:
                await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
        assert assigned == [("late", reference)]
        assert searched_in and threading.main_thread().name not in searched_in
    finally:
        discard_spilled(SHM, reference)


def test_a_large_body_cut_off_mid_way_is_removed_off_the_event_loop() -> None:
    # The connection to the master was lost while a large body was being spilled: removing
    # the segment frees what was written (tens of ms for a GiB of tmpfs), on the loop before.
    removed_in: list[str] = []
    segments: list[IncomingSegment] = []

    class Recorded(IncomingSegment):
        def discard(self) -> None:
            removed_in.append(threading.current_thread().name)
            super().discard()

    def spill(length: int) -> IncomingSegment:
        segments.append(Recorded(SHM, spill_prefix(), length))
        return segments[-1]

    async def scenario() -> None:
        link = unconnected_link()
        link.spill = spill
        connection = _Connection(link)
        assert connection.decoder.feed(frame(bytes(2 << 20))[: 1 << 20]) == []
        assert connection.decoder.spilling
        connection.connection_lost(None)
        async with asyncio.timeout(10):
            while not removed_in:
                await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
    finally:
        exists = [os.path.exists(segment.path) for segment in segments]
        for segment in segments:  # left by a failure: /dev/shm is not the test's to fill
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment.path)
    assert removed_in and threading.main_thread().name not in removed_in
    assert exists == [False]


def test_a_large_body_that_finds_shm_dir_full_is_removed_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer filled shm_dir while a large body from the master was being spilled: the
    # write that failed removed the segment on the event loop, and that frees what was
    # written (55 ms for 256 MiB of tmpfs).
    unlinked: list[tuple[str, bool]] = []  # (path, whether on the event loop's thread)
    unlink = os.unlink

    def recorded(path: str, *args: Any, **kwargs: Any) -> None:
        unlinked.append((os.fspath(path), threading.current_thread() is threading.main_thread()))
        unlink(path, *args, **kwargs)

    body = bytes(2 << 20)

    async def scenario(shm: Path) -> bytes:
        node = Node(Config(shm_dir=str(shm), workers=1), JoinInfo("t", "127.0.0.1", 1))
        node.node_dir = node._claim_node_dir()
        try:
            decoder = FrameDecoder(spill=node._spill)
            assert decoder.feed(frame(body)[: 1 << 20]) == []
            assert decoder.spilling
            (shm / "filler").write_bytes(bytes(psutil.disk_usage(shm).free))
            monkeypatch.setattr(os, "unlink", recorded)
            (reference,) = decoder.feed(frame(body)[1 << 20 :])
            name = spill_reference(reference)
            assert name is not None
            async with asyncio.timeout(10):
                while (shm / name[0]).exists():
                    await asyncio.sleep(0.01)
            return reference
        finally:
            node.node_dir.release()

    with mounted_tmpfs(tmp_path / "shm", "72m") as shm:
        reference = asyncio.run(scenario(shm))
        spill = spill_reference(reference)
        assert spill is not None
        name, error, _ = spill
        assert error.startswith(f"the payload does not fit in {shm}: ")
        assert [on_loop for path, on_loop in unlinked if path == str(shm / name)] == [False]


def test_the_outbox_index_follows_new_results_and_confirmations(outbox_splits: list[int]) -> None:
    link = unconnected_link()
    link.send_results(codec.encode(m.TaskResult("a", m.Number(1.0))), ["a"])
    assert link.find_result("a") == codec.encode(m.TaskResult("a", m.Number(1.0)))  # indexed
    link.send_results(codec.encode(m.TaskResult("b", m.Number(2.0))), ["b"])  # after the index
    link.send_results(codec.encode(m.TaskResult("a", m.Number(3.0))), ["a"])  # a later answer
    assert link.find_result("b") == codec.encode(m.TaskResult("b", m.Number(2.0)))
    assert link.find_result("a") == codec.encode(m.TaskResult("a", m.Number(3.0)))
    assert outbox_splits == []  # entries of one frame are that frame
    # The master confirms the first two entries (written on a connection, then acked): their
    # results leave the index, the later "a" stays, and nothing is read again (100,000
    # unconfirmed results took 114 ms to index, once per confirmation).
    for entry in list(link._outbox)[:2]:
        entry[0] = 1
    link._acked()
    assert link.unconfirmed == 1
    assert link.find_result("b") is None
    assert link.find_result("a") == codec.encode(m.TaskResult("a", m.Number(3.0)))
    assert outbox_splits == []


@pytest.mark.parametrize(
    "data",
    [
        bytes(STREAM_BYTES),  # every value one digit
        bytes([9, 10, 99, 100, 255]) * (STREAM_BYTES // 5 + 1),  # every width change
        os.urandom(3 * (1 << 20) + 7),  # chunks of 1 MiB and a ragged tail
        bytes(range(256)) * 4096 + b"\x07",  # a chunk boundary right before the last byte
    ],
    ids=["zeros", "widths", "random", "boundary"],
)
def test_a_bytes_result_streams_exactly_what_the_codec_writes(data: bytes) -> None:
    answer = bytes_result_json(data)
    assert isinstance(answer, BytesResult)
    head, tail = b'{"TaskResult":{"id":"x","result":', b"}}"
    enclosed = answer.enclosed(head, tail)
    text = b"".join(enclosed.pieces())
    assert len(enclosed) == len(text)  # announced before a piece is encoded
    assert text == codec.encode_payload(m.TaskResult("x", m.Bytes(data)))
    assert bytes(answer) == b'{"Bytes":' + orjson.dumps(list(data)) + b"}"
    assert bytes_result_json(data[: STREAM_BYTES - 1]) == bytes(
        BytesResult(data[: STREAM_BYTES - 1])
    )


def test_a_worker_killed_while_writing_a_result_leaves_no_segment() -> None:
    """The worker wrote a segment and never sent its name (killed at task_timeout_ms): the pool
    removes what that process created, and only that."""
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    prefix = f"cpnode-{node_id}"
    settings = WorkerSettings(node_id=node_id, executors={"Compute": "tests.slowtasks:compute"})
    mine = write_segment(SHM, prefix, [b"in flight to a worker"], 21)  # the supervisor's kind

    async def scenario() -> PoolRun:
        run = PoolRun(settings, WorkerLimits(task_timeout_ms=500))
        await run.pool.start()
        try:
            await run.run([("orphan", m.Compute(f"orphan {prefix}")), ("after", m.Compute("1+1"))])
        finally:
            await run.pool.stop()
        return run

    try:
        run = asyncio.run(scenario())
        orphan, after = run.results()
        assert isinstance(orphan, m.TaskResult) and isinstance(orphan.result, m.Error)
        assert "task_timeout_ms = 500" in orphan.result.message
        assert after == m.TaskResult("after", m.Number(2.0))
        assert ours(prefix) == [mine]
    finally:
        os.unlink(os.path.join(SHM, mine))


def test_answered_payloads_go_when_the_master_confirms_their_results() -> None:
    # The dispatcher kept the payloads of a burst's last generations (up to 4,096 of up to
    # 1 MiB each) until later results came, however long the node then idled.
    link = unconnected_link()
    dispatcher = Dispatcher(4, link.send_results)
    dispatcher.outbox = link
    link.on_confirmed = dispatcher.forget_confirmed
    ids = [f"t{i}" for i in range(3)]
    for ident in ids:
        payload = codec.encode_payload(m.AssignTask(ident, m.StoreData("k", bytes(1000))))
        dispatcher._answered[ident] = payload
        link.send_results(codec.encode(m.TaskResult(ident, m.Stored())), [ident])
        dispatcher.forget_confirmed()
    assert dispatcher._answered or dispatcher._answered_before  # unconfirmed: kept
    for entry in link._outbox:
        entry[0] = 1  # written on a connection before the first heartbeat
    link._acked()
    assert link.unconfirmed == 0
    assert dispatcher._answered == {} and dispatcher._answered_before == {}


@pytest.mark.parametrize("kind", ["master link", "direct link"])
def test_a_burst_is_read_a_slice_per_turn_of_the_loop(kind: str) -> None:
    # The loop read up to 8 MiB from one socket in a turn: a burst of 100,000 tasks from the
    # master held it (and the heartbeat timer) for 0.2 s. (A callback that schedules itself
    # again counts the turns.)
    count = 40_000
    payloads = [codec.encode_payload(m.AssignTask(f"t{i}", m.Compute("1+1"))) for i in range(count)]
    burst = frame(b"OK") + b"".join(frame(p) for p in payloads)  # 2.7 MB
    per_turn: collections.Counter[int] = collections.Counter()
    turns = 0

    async def scenario() -> None:
        nonlocal turns
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def count_turns() -> None:
            nonlocal turns
            turns += 1
            if not done.done():
                loop.call_soon(count_turns)

        def arrived(tasks: int) -> None:
            per_turn[turns] += tasks
            if sum(per_turn.values()) == count and not done.done():
                done.set_result(None)

        protocol: asyncio.Protocol
        if kind == "master link":
            link = unconnected_link()
            link._on_assign = lambda ids, payloads: arrived(len(ids))
            protocol = _Connection(link)
        else:
            protocol = DirectConnection(
                token="t", dialer=True, max_frame_bytes=1 << 20,
                on_task=lambda link, ident, payload: arrived(1),
            )  # fmt: skip
        with socket.create_server(("127.0.0.1", 0)) as server:
            accepted: list[socket.socket] = []
            server.settimeout(10)
            writer = threading.Thread(
                target=lambda: (accepted.append(server.accept()[0]), accepted[0].sendall(burst)),
                daemon=True,
            )
            writer.start()
            count_turns()
            transport, _ = await loop.create_connection(lambda: protocol, *server.getsockname())
            try:
                writer.join(10)  # the loop sleeps meanwhile: the burst waits in the buffers
                assert not writer.is_alive(), "the burst did not fit in the socket buffers"
                async with asyncio.timeout(10):
                    await done
            finally:
                transport.close()
                for sock in accepted:
                    sock.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as the node runs
        runner.run(scenario())
    assert sum(per_turn.values()) == count
    frame_size = len(burst) // count
    assert max(per_turn.values()) * frame_size <= 2 * 256 * 1024, per_turn  # one read past
