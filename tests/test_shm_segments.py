"""shm.segments: blobs handed between real processes through files in /dev/shm."""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import psutil
import pytest

from shm import space
from shm.errors import StoreFullError
from shm.segments import PayloadSegment, sweep_segments

SHM = "/dev/shm"
SPAWN = multiprocessing.get_context("spawn")
DEADLINE = 30


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``directory`` (for a genuinely full filesystem); skip the
    test when this process may not mount."""
    directory.mkdir(exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip() or mount.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=DEADLINE)


@contextlib.contextmanager
def child_process(target: object, *args: object) -> Iterator[multiprocessing.process.BaseProcess]:
    """Start ``target(*args)`` in a spawned process; make sure it is gone afterwards."""
    process = SPAWN.Process(target=target, args=args)
    process.start()
    try:
        yield process
    finally:
        if process.is_alive():
            process.kill()
        process.join(DEADLINE)
        assert not process.is_alive()


def ours(prefix: str, directory: str = SHM) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(prefix))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A segment prefix no other test or process uses; the test must leave nothing under it."""
    name = f"cpnode-t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    left = ours(name)
    for entry in left:
        os.unlink(os.path.join(SHM, entry))
    assert not left, f"left behind in {SHM}: {left}"


def consume(shm_dir: str, name: str, answer: Connection) -> None:
    with PayloadSegment.open(shm_dir, name, unlink=True) as segment:
        answer.send((hashlib.sha256(segment.buffer).hexdigest(), os.path.exists(segment.path)))


def attach_and_exit(shm_dir: str, name: str) -> None:
    with PayloadSegment.open(shm_dir, name) as segment:
        assert segment.size > 0


def create_and_hang(shm_dir: str, prefix: str, answer: Connection) -> None:
    segment = PayloadSegment.create(shm_dir, prefix, 4096)
    segment.buffer[:5] = b"crash"
    answer.send(segment.name)
    signal.pause()


def test_blob_goes_to_another_process_and_the_consumer_unlinks(prefix: str) -> None:
    data = os.urandom(3 << 20)
    with PayloadSegment.create(SHM, prefix, len(data)) as segment:
        segment.buffer[:] = data
        name = segment.name
    assert ours(prefix) == [name]
    receive, send = SPAWN.Pipe(duplex=False)
    with child_process(consume, SHM, name, send) as process:
        assert receive.poll(DEADLINE)
        digest, still_there = receive.recv()
        process.join(DEADLINE)
        assert process.exitcode == 0
    assert digest == hashlib.sha256(data).hexdigest()
    assert not still_there
    assert ours(prefix) == []


def test_segment_outlives_a_consumer_that_attaches_and_exits(prefix: str) -> None:
    """The failure of multiprocessing.shared_memory on 3.11: the consumer's resource tracker
    unlinks the segment when the consumer exits. Ours stays until its owner unlinks it."""
    with PayloadSegment.create(SHM, prefix, 1000) as segment:
        segment.buffer[:4] = b"keep"
        with child_process(attach_and_exit, SHM, segment.name) as process:
            process.join(DEADLINE)
            assert process.exitcode == 0
        assert ours(prefix) == [segment.name]
        assert bytes(segment.buffer[:4]) == b"keep"
        assert segment.unlink()
        assert not segment.unlink()


def test_both_mappings_share_the_same_memory(prefix: str) -> None:
    with PayloadSegment.create(SHM, prefix, 8192) as writer:
        with PayloadSegment.open(SHM, writer.name, unlink=True) as reader:
            assert reader.buffer.readonly
            writer.buffer[100:103] = b"abc"
            assert bytes(reader.buffer[100:103]) == b"abc"
            array = np.frombuffer(reader.buffer, dtype=np.uint8)
            assert int(array[101]) == ord("b")
            del array
        assert ours(prefix) == []


def test_writable_open_and_zero_size(prefix: str) -> None:
    with PayloadSegment.create(SHM, prefix, 0) as empty:
        assert len(empty.buffer) == 0
        with PayloadSegment.open(SHM, empty.name, writable=True, unlink=True) as same:
            assert len(same.buffer) == 0
    with PayloadSegment.create(SHM, prefix, 10) as segment:
        with PayloadSegment.open(SHM, segment.name, writable=True, unlink=True) as other:
            other.buffer[:2] = b"ok"
        assert bytes(segment.buffer[:2]) == b"ok"
    assert ours(prefix) == []


def test_close_with_a_live_view_says_what_to_do(prefix: str) -> None:
    segment = PayloadSegment.create(SHM, prefix, 64)
    segment.unlink()
    array = np.frombuffer(segment.buffer, dtype=np.uint8)
    with pytest.raises(BufferError, match="still in use"):
        segment.close()
    del array
    segment.close()
    assert segment.closed
    with pytest.raises(ValueError, match="closed"):
        _ = segment.buffer


def test_more_than_the_free_space_is_refused_before_anything_is_written(prefix: str) -> None:
    free = psutil.disk_usage(SHM).free
    with pytest.raises(StoreFullError) as caught:
        PayloadSegment.create(SHM, prefix, free + 1)
    assert isinstance(caught.value, OSError)
    assert f"{SHM} has" in str(caught.value)
    assert "short by" in str(caught.value)
    with pytest.raises(StoreFullError, match="keep 4096 bytes free"):
        PayloadSegment.create(SHM, prefix, free - 10, reserve_bytes=4096)
    assert ours(prefix) == []


def test_full_tmpfs_raises_instead_of_sigbus(tmp_path: Path, prefix: str) -> None:
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        first = PayloadSegment.create(tiny, prefix, 600 * 1024)
        first.buffer[:] = b"\xab" * first.size  # every page was reserved: no SIGBUS
        with pytest.raises(StoreFullError, match="short by"):
            PayloadSegment.create(tiny, prefix, 600 * 1024)
        # posix_fallocate itself refuses when the space is gone (no psutil look first):
        probe = os.path.join(tiny, f"{prefix}-probe")
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with pytest.raises(StoreFullError, match="filesystem is full"):
                space.reserve(fd, 600 * 1024, probe, for_mapping=True)
        finally:
            os.close(fd)
            os.unlink(probe)
        assert ours(prefix, str(tiny)) == [first.name]
        first.close()
        first.unlink()
        assert ours(prefix, str(tiny)) == []


def test_sweep_removes_a_crashed_producers_segments_and_no_one_elses(prefix: str) -> None:
    receive, send = SPAWN.Pipe(duplex=False)
    with child_process(create_and_hang, SHM, prefix, send) as process:
        assert receive.poll(DEADLINE)
        crashed = receive.recv()
        process.kill()
        process.join(DEADLINE)
        assert process.exitcode == -signal.SIGKILL
    assert ours(prefix) == [crashed]
    sibling = f"{prefix}-seg-x"  # a node whose id starts like ours, then "-seg-"
    neighbour = f"{prefix}2"
    others = [PayloadSegment.create(SHM, name, 16) for name in (sibling, neighbour)]
    try:
        assert sweep_segments(SHM, prefix) == [crashed]
        assert ours(prefix) == sorted(other.name for other in others)
    finally:
        for other in others:
            other.close()
            other.unlink()


@pytest.mark.parametrize(
    "name",
    [
        "../etc/passwd",
        "x",
        "cpnode-a-seg-123",
        "cpnode-a-seg-" + "0" * 31 + "/",
        "a/b-seg-" + "0" * 32,
    ],
)
def test_open_refuses_what_is_not_a_segment_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a payload segment name"):
        PayloadSegment.open(SHM, name)


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "a b"])
def test_create_refuses_a_bad_prefix(bad: str) -> None:
    with pytest.raises(ValueError, match="segment prefix"):
        PayloadSegment.create(SHM, bad, 1)


def test_shm_imports_nothing_from_node_or_workers() -> None:
    check = (
        "import sys, shm.bytesjson, shm.diskstore, shm.memstore, shm.nodedir, shm.segments; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('node', 'workers')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=True,
    )
    assert result.stdout.strip() == "[]"
