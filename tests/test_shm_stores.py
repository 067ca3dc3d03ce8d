"""shm.nodedir, shm.memstore, shm.diskstore: real /dev/shm, real processes, hostile input."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import orjson
import pytest

from shm import diskstore, space
from shm.diskstore import DIRECTORY_BYTES, MAX_PATH_PARTS, MIB, DiskStore, has_temporary_files
from shm.errors import (
    FileError,
    InvalidKey,
    InvalidPath,
    KeyNotFound,
    NodeDirectoryInUse,
    QuotaExceeded,
    StoreError,
    StoreFullError,
)
from shm.memstore import MemoryStore
from shm.nodedir import NodeDirectory, claim_node_dir
from shm.segments import PayloadSegment, write_segment
from tests.test_shm_segments import DEADLINE, SHM, SPAWN, child_process, mounted_tmpfs

VECTORS = Path(__file__).parent / "data" / "storage_vectors.jsonl"


def ours(node_id: str, directory: str = SHM) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith(f"cpnode-{node_id}"))


@pytest.fixture
def node_id() -> Iterator[str]:
    """A node_id no other test or process uses; the test must leave nothing of it in /dev/shm."""
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    left = ours(name)
    for entry in left:
        path = os.path.join(SHM, entry)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
    assert not left, f"left behind in {SHM}: {left}"


@pytest.fixture
def node_dir(node_id: str) -> Iterator[NodeDirectory]:
    claimed = claim_node_dir(SHM, node_id)
    yield claimed
    claimed.release()


@pytest.fixture
def memory(node_dir: NodeDirectory) -> Iterator[MemoryStore]:
    with MemoryStore(SHM, node_dir.node_id) as store:
        yield store


def disk_store(node_dir: NodeDirectory, storage: Path, quota: int | None) -> DiskStore:
    return DiskStore(storage, quota, node_dir.ledger_dir, reserve_bytes=0)


def tree(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def charge(storage: Path) -> int:
    """What the quota counts for ``storage``, found apart from the store: the bytes of its
    files and DIRECTORY_BYTES for each directory below it (no temporaries)."""
    total = 0
    for path in storage.rglob("*"):
        if path.name.startswith(".cpnode-tmp-") or path.is_symlink():
            continue
        total += DIRECTORY_BYTES if path.is_dir() else path.stat().st_size
    return total


# --- processes the tests start ---------------------------------------------------------------


def claim_and_hang(shm_dir: str, node_id: str, ready: Connection) -> None:
    claimed = claim_node_dir(shm_dir, node_id)
    MemoryStore(shm_dir, node_id).store("left", b"behind")
    PayloadSegment.create(shm_dir, claimed.segment_prefix, 100).buffer[:1] = b"x"
    ready.send(os.getpid())
    signal.pause()


def store_and_fetch(shm_dir: str, node_id: str, answer: Connection) -> None:
    with MemoryStore(shm_dir, node_id) as store:
        blob = random.randbytes(2 * MIB + 17)
        store.store("from child", blob)
        fetched = store.retrieve("from parent")
        answer.send((hashlib.sha256(blob).hexdigest(), hashlib.sha256(fetched).hexdigest()))


def uniform_blob(value: int) -> bytes:
    """A blob that shows whether it was read whole: one byte value, a length given by it."""
    return bytes([value]) * (64 * 1024 + 997 * value)


def keep_writing(shm_dir: str, node_id: str, writer: int, writing: Event, stop: Event) -> None:
    with MemoryStore(shm_dir, node_id) as store:
        round_ = 0
        while not stop.is_set():
            store.store("contended", uniform_blob(writer * 10 + round_ % 10))
            round_ += 1
            writing.set()


def fill_under_quota(
    storage: str, ledger: str, writer: int, start: Event, report: Connection
) -> None:
    rng = random.Random(writer)
    stored = refused = 0
    with DiskStore(storage, MIB, ledger, reserve_bytes=0) as store:
        start.wait(DEADLINE)
        for attempt in range(80):
            name = f"p{writer}/f{rng.randrange(30)}" if attempt % 3 else f"top{writer}-{attempt}"
            try:
                store.write(name, bytes(rng.randrange(1, 64 * 1024)))
                stored += 1
            except QuotaExceeded:
                refused += 1
    report.send((stored, refused))


def make_shared_directories(
    storage: str, ledger: str, writer: int, start: Event, report: Connection
) -> None:
    """Write one byte into each of 20 directories (two deep) that every writer makes too."""
    with DiskStore(storage, MIB, ledger, reserve_bytes=0) as store:
        start.wait(DEADLINE)
        for index in range(20):
            store.write(f"shared{index}/sub/w{writer}", b"x")
    report.send(writer)


STEP_QUOTA = 16 * MIB
STEP_ROUNDS = 150


def write_in_step(
    storage: str, ledger: str, writer: int, start: Event, report: Connection, step: Barrier
) -> None:
    """Round after round, in step with the other writers, write into directories below
    ``r<round>/`` that are new and that the others write into too: a small file for half the
    writers, for the other half one over the quota, refused once its directories are made,
    whose clean-up removes them from under the others' writes. Report what was written, what
    was refused, and every other error."""
    rng = random.Random(writer)
    over_quota = bytes(STEP_QUOTA + 1)  # zeros the system maps lazily: no memory is used
    written = refused = 0
    failures = []
    with DiskStore(storage, STEP_QUOTA, ledger, reserve_bytes=0) as store:
        start.wait(DEADLINE)
        for round_ in range(STEP_ROUNDS):
            step.wait(DEADLINE)
            below = "".join(f"/{rng.choice('ab')}" for _ in range(rng.randrange(3)))
            path = f"r{round_}{below}/w{writer}"
            refusing = (writer + round_) % 2 == 1
            try:
                store.write(path, over_quota if refusing else bytes(rng.randrange(1, 100)))
                written += 1
            except QuotaExceeded:
                refused += 1
            except StoreError as error:
                failures.append(f"{path}: {error}")
    report.send((written, refused, failures))


def every_access(disk: DiskStore, path: str) -> list[Callable[[], object]]:
    """Each way a task reaches `path`: DiskWrite, DiskRead, StoreData, RetrieveData."""
    return [
        lambda: disk.write(path, b"x"),
        lambda: disk.read(path),
        lambda: disk.store(path, b"x"),
        lambda: disk.retrieve(path),
    ]


def run_writers(
    target: Callable[..., None],
    storage: Path,
    node_dir: NodeDirectory,
    writers: int = 8,
    *extra: object,
) -> list[Any]:
    """Run `target(storage, ledger, writer, start, report, *extra)` in `writers` processes on
    one store at once (released together), and return what each reported, in writer order,
    once every one has exited with status 0."""
    start = SPAWN.Event()
    pipes = [SPAWN.Pipe(duplex=False) for _ in range(writers)]
    reports = []
    with contextlib.ExitStack() as processes:
        started = [
            processes.enter_context(
                child_process(
                    target, str(storage), node_dir.ledger_dir, writer, start, send, *extra
                )
            )
            for writer, (_, send) in enumerate(pipes)
        ]
        start.set()
        for receive, _ in pipes:
            assert receive.poll(DEADLINE)
            reports.append(receive.recv())
        for process in started:
            process.join(DEADLINE)
            assert process.exitcode == 0
    return reports


def keep_storing_big_blobs(
    kind: str, shm_dir: str, node_id: str, storage: str, ledger: str, writing: Event
) -> None:
    """Store 2..8 MiB blobs under three keys (each write grows or shrinks a key) until killed."""
    blobs = [bytes([size]) * (size * 2 * MIB) for size in range(1, 5)]
    if kind == "memory":
        store: MemoryStore | DiskStore = MemoryStore(shm_dir, node_id)
    else:
        store = DiskStore(storage, 64 * MIB, ledger, reserve_bytes=0)
    round_ = 0
    while True:
        store.store(f"k{round_ % 3}", blobs[round_ % 4])
        round_ += 1
        writing.set()


def killed_as_its_refused_write_removes_a_directory(storage: str, ledger: str) -> None:
    """Write over the quota into three new directories, and die by SIGKILL as soon as the
    refused write's clean-up has removed the first of them, before its count is given back
    (the kill is placed by wrapping ``os.rmdir``: no signal lands in that window on demand)."""
    rmdir = os.rmdir

    def rmdir_then_die(path: str, *, dir_fd: int | None = None) -> None:
        rmdir(path, dir_fd=dir_fd)
        if not path.startswith(diskstore.TEMPORARY):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rmdir = rmdir_then_die  # type: ignore[assignment]
    with DiskStore(storage, MIB, ledger, reserve_bytes=0) as store:
        store.write("a/b/c/f", bytes(MIB + 1))


def killed_as_it_renames(storage: str, ledger: str, path: str) -> None:
    """Write ``path`` and die by SIGKILL at the first rename, after its count went to the
    ledger (the kill is placed by wrapping ``os.rename``)."""

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = die
    with DiskStore(storage, 4 * MIB, ledger, reserve_bytes=0) as store:
        store.write(path, bytes(100))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = SPAWN.Process(target=int)
    process.start()
    process.join(DEADLINE)
    assert process.pid is not None
    return process.pid


# --- the node directory -------------------------------------------------------------------------


def test_claim_makes_the_directory_and_release_removes_everything(node_id: str) -> None:
    claimed = claim_node_dir(SHM, node_id)
    assert claimed.path == f"{SHM}/cpnode-{node_id}"
    assert sorted(os.listdir(claimed.path)) == ["ledger", "lock", "mem"]
    assert Path(claimed.path, "lock").read_text() == f"{os.getpid()}\n"
    PayloadSegment.create(SHM, claimed.segment_prefix, 10).close()
    with MemoryStore(SHM, node_id) as memory:
        memory.store("k", b"v")
    assert len(ours(node_id)) == 2
    claimed.release()
    claimed.release()
    assert claimed.released
    assert ours(node_id) == []


def test_a_live_holder_blocks_the_claim(node_id: str) -> None:
    receive, send = SPAWN.Pipe(duplex=False)
    with child_process(claim_and_hang, SHM, node_id, send) as process:
        assert receive.poll(DEADLINE)
        holder = receive.recv()
        with pytest.raises(
            NodeDirectoryInUse, match=f"node_id '{node_id}' is in use by pid {holder}"
        ):
            claim_node_dir(SHM, node_id)
        with MemoryStore(SHM, node_id) as memory:
            assert memory.retrieve("left") == b"behind"
        process.kill()
    with claim_node_dir(SHM, node_id):
        pass


def test_the_next_claim_cleans_up_after_a_crashed_run(node_id: str) -> None:
    receive, send = SPAWN.Pipe(duplex=False)
    with child_process(claim_and_hang, SHM, node_id, send) as process:
        assert receive.poll(DEADLINE)
        receive.recv()
        process.kill()
        process.join(DEADLINE)
        assert process.exitcode == -signal.SIGKILL
    left = ours(node_id)
    assert len(left) == 2  # the node directory and one segment
    with claim_node_dir(SHM, node_id) as claimed, MemoryStore(SHM, node_id) as memory:
        assert ours(node_id) == [f"cpnode-{node_id}"]
        assert memory.list_entries() == []
        assert Path(claimed.path, "lock").read_text() == f"{os.getpid()}\n"
    assert ours(node_id) == []


def test_a_second_claim_in_the_same_process_is_refused(node_dir: NodeDirectory) -> None:
    with pytest.raises(NodeDirectoryInUse, match=f"pid {os.getpid()}"):
        claim_node_dir(SHM, node_dir.node_id)


def test_two_node_ids_never_touch_each_others_files(node_id: str) -> None:
    other_id = f"{node_id}-seg-x"  # starts like ours; its segments even contain "-seg-"
    first = claim_node_dir(SHM, node_id)
    second = claim_node_dir(SHM, other_id)
    try:
        segment = PayloadSegment.create(SHM, second.segment_prefix, 10)
        with MemoryStore(SHM, other_id) as memory:
            memory.store("mine", b"1")
        first.release()
        first = claim_node_dir(SHM, node_id)
        first.release()
        assert os.path.exists(segment.path)
        with MemoryStore(SHM, other_id) as memory:
            assert memory.retrieve("mine") == b"1"
        segment.close()
    finally:
        first.release()
        second.release()
    assert ours(node_id) == []


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "-x", "_x", "x" * 65, "a b", "é"])
def test_node_id_must_be_a_plain_name(bad: str) -> None:
    with pytest.raises(ValueError, match="node_id must be"):
        claim_node_dir(SHM, bad)


def test_a_symlink_in_place_of_the_directory_is_refused(node_id: str, tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("keep")
    link = Path(SHM, f"cpnode-{node_id}")
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(PermissionError, match="symlink"):
            claim_node_dir(SHM, node_id)
    finally:
        link.unlink()
    assert tree(tmp_path) == ["precious"]


def test_memory_store_needs_a_claimed_directory(node_id: str) -> None:
    with pytest.raises(FileNotFoundError, match="claim_node_dir"):
        MemoryStore(SHM, node_id)


# --- the memory store ---------------------------------------------------------------------------


def test_store_retrieve_replace_and_missing_key(memory: MemoryStore) -> None:
    memory.store("k1", b"\x01\x02\x03")
    memory.store("k1", memoryview(b"new"))
    memory.store("empty", b"")
    assert memory.retrieve("k1") == b"new"
    assert memory.retrieve("empty") == b""
    with pytest.raises(KeyNotFound) as caught:
        memory.retrieve("nope")
    assert str(caught.value) == "Key not found"


def test_worker_vectors() -> None:
    """The Worker-node part of storage_vectors, through a fresh memory store."""
    steps = [orjson.loads(line) for line in VECTORS.read_bytes().splitlines()]
    steps = [step for step in steps if step["role"].startswith("worker")][:5]
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with claim_node_dir(SHM, node_id), MemoryStore(SHM, node_id) as memory:
        results = []
        for step in steps:
            task = step["task"]
            if task == "GetGlobalRam":
                results.append({"Response": memory.global_ram_report()})
            else:
                memory.store(task["StoreData"]["key"], bytes(task["StoreData"]["data"]))
                results.append("Stored")
        assert results[:4] == [step["result"] for step in steps[:4]]
        # Upstream lists keys in hash order ("b: 1 bytes\na: 1 bytes\n"); ours are sorted.
        assert steps[4]["result"] == {"Response": "b: 1 bytes\na: 1 bytes\n"}
        assert results[4] == {"Response": "a: 1 bytes\nb: 1 bytes\n"}
    assert ours(node_id) == []


HOSTILE_KEYS = [
    "../x",
    "/etc/passwd",
    "a/../../x",
    "x\x00y",
    "",
    ".",
    "..",
    "line\nbreak",
    "ключ 🔑",
    "k" * 150,
    "k" * 151,
    "k" * 10_000,
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=lambda key: repr(key[:20]))
def test_any_text_is_just_a_key(memory: MemoryStore, key: str) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    memory.store(key, key.encode() + b"!")
    memory.store("neighbour", b"n")
    assert memory.retrieve(key) == key.encode() + b"!"
    assert memory.list_entries() == sorted([(key, len(key.encode()) + 1), ("neighbour", 1)])
    assert f"{key}: {len(key.encode()) + 1} bytes\n" in memory.global_ram_report()
    assert all(name[0] in "kh" for name in os.listdir(memory.path))
    assert Path("/etc/passwd").read_bytes() == passwd


def test_key_that_is_not_unicode_text(memory: MemoryStore) -> None:
    with pytest.raises(InvalidKey):
        memory.store("\ud800", b"x")


def test_a_key_stored_by_one_process_is_read_by_another(memory: MemoryStore, node_id: str) -> None:
    parent_blob = random.randbytes(MIB + 3)
    memory.store("from parent", parent_blob)
    receive, send = SPAWN.Pipe(duplex=False)
    with child_process(store_and_fetch, SHM, node_id, send) as process:
        assert receive.poll(DEADLINE)
        child_digest, fetched_digest = receive.recv()
        process.join(DEADLINE)
        assert process.exitcode == 0
    assert fetched_digest == hashlib.sha256(parent_blob).hexdigest()
    assert hashlib.sha256(memory.retrieve("from child")).hexdigest() == child_digest


def test_concurrent_writers_never_produce_a_torn_read(memory: MemoryStore, node_id: str) -> None:
    stop = SPAWN.Event()
    writing = [SPAWN.Event() for _ in range(3)]
    memory.store("contended", uniform_blob(0))
    with contextlib.ExitStack() as processes:
        writers = [
            processes.enter_context(child_process(keep_writing, SHM, node_id, number, event, stop))
            for number, event in enumerate(writing, start=1)
        ]
        assert all(event.wait(DEADLINE) for event in writing)
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            blob = memory.retrieve("contended")
            assert blob == uniform_blob(blob[0]), "a read saw parts of two writes"
            seen.add(blob[0])
        stop.set()
        for writer in writers:
            writer.join(DEADLINE)
            assert writer.exitcode == 0
    assert len(seen) > 3
    assert memory.sweep_temporary() == []
    assert [name for name in os.listdir(memory.path) if not name.startswith("k")] == []


def test_temporary_files_of_dead_writers_are_swept(memory: MemoryStore) -> None:
    dead = SPAWN.Process(target=int)
    dead.start()
    dead.join(DEADLINE)
    Path(memory.path, f".tmp-{dead.pid}-abc").write_bytes(b"half")
    Path(memory.path, f".tmp-{os.getpid()}-def").write_bytes(b"mine")
    assert memory.sweep_temporary() == [f".tmp-{dead.pid}-abc"]
    assert memory.list_entries() == []
    os.unlink(Path(memory.path, f".tmp-{os.getpid()}-def"))


def test_the_pool_sweeps_only_the_named_dead_writers_files(memory: MemoryStore) -> None:
    first, second = dead_pid(), dead_pid()
    for name in (f".tmp-{first}-a", f".tmp-{first}-b", f".tmp-{second}-c", f".tmp-{first}0-d"):
        Path(memory.path, name).write_bytes(b"half")
    Path(memory.path, f".tmp-{os.getpid()}-e").write_bytes(b"mine")
    memory.store("kept", b"v")
    assert sorted(memory.sweep_temporary(first)) == [f".tmp-{first}-a", f".tmp-{first}-b"]
    assert memory.sweep_temporary(os.getpid()) == []  # alive: never removed from under it
    assert memory.sweep_temporary(first) == []
    assert sorted(os.listdir(memory.path)) == sorted(
        [f".tmp-{second}-c", f".tmp-{first}0-d", f".tmp-{os.getpid()}-e", "ka2VwdA"]
    )
    assert memory.retrieve("kept") == b"v"
    os.unlink(Path(memory.path, f".tmp-{os.getpid()}-e"))
    assert sorted(memory.sweep_temporary()) == [f".tmp-{first}0-d", f".tmp-{second}-c"]


def test_full_tmpfs_gives_a_clear_error_and_keeps_the_old_value(tmp_path: Path) -> None:
    node_id = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with (
        mounted_tmpfs(tmp_path / "tiny", "1m") as tiny,
        claim_node_dir(tiny, node_id),
        MemoryStore(tiny, node_id) as memory,
    ):
        memory.store("a", b"1" * 400_000)
        with pytest.raises(StoreFullError, match="short by") as caught:
            memory.store("b", b"2" * 800_000)
        assert isinstance(caught.value, OSError)
        assert caught.value.errno == errno.ENOSPC
        with pytest.raises(StoreFullError):
            memory.store("a", b"3" * 800_000)
        assert memory.retrieve("a") == b"1" * 400_000
        assert memory.list_entries() == [("a", 400_000)]
        assert len(os.listdir(memory.path)) == 1
        with (
            MemoryStore(tiny, node_id, reserve_bytes=700_000) as reserving,
            pytest.raises(StoreFullError, match="keep 700000 bytes free"),
        ):
            reserving.store("c", b"4")


# --- the disk store -----------------------------------------------------------------------------


def run_step(task: Any, disk: DiskStore, memory: MemoryStore | None) -> Any:
    """One storage_vectors task as a Disk node runs it, with its wire result."""
    if task == "GetStorage":
        return {"Response": disk.get_storage_report()}
    if task == "GetGlobalRam":
        assert memory is not None
        return {"Response": memory.global_ram_report()}
    ((variant, fields),) = task.items()
    try:
        if variant == "StoreData":
            disk.store(fields["key"], bytes(fields["data"]))
            return "Stored"
        if variant == "RetrieveData":
            return {"Bytes": list(disk.retrieve(fields["key"]))}
        if variant == "DiskWrite":
            disk.write(fields["path"], bytes(fields["data"]))
            return "Written"
        assert variant == "DiskRead"
        return {"Bytes": list(disk.read(fields["path"]))}
    except StoreError as error:
        return {"Error": str(error)}


def test_disk_vectors(node_dir: NodeDirectory, memory: MemoryStore, tmp_path: Path) -> None:
    """The Disk-node part of storage_vectors (1 MiB quota), every result exact but one number."""
    steps = [orjson.loads(line) for line in VECTORS.read_bytes().splitlines()]
    steps = [step for step in steps if step["role"].startswith("disk")]
    assert len(steps) == 15
    with disk_store(node_dir, tmp_path / "storage", 1 * MIB) as disk:
        for step in steps:
            result = run_step(step["task"], disk, memory)
            if step["role"] in ("disk4_", "disk10_"):
                # Upstream counts only StoreData against the quota (1048576 - 3 for k1); ours
                # counts every write, the DiskWrites of a/b.txt (2) and top.bin (1) too, and
                # the directory a/ (4096).
                assert step["result"]["Response"].startswith("free: 1048573 bytes\n")
                expected = {"Response": "free: 1044474 bytes\nk1: 3 bytes\ntop.bin: 1 bytes\n"}
                assert result == expected, step["role"]
            else:
                assert result == step["result"], step["role"]
        assert disk.used_bytes() == 6 + DIRECTORY_BYTES


def test_worker_role_disk_writes_have_no_quota(tmp_path: Path) -> None:
    steps = [orjson.loads(line) for line in VECTORS.read_bytes().splitlines()][-2:]
    assert [step["role"] for step in steps] == ["worker6_", "worker7_"]
    with DiskStore(tmp_path / "storage", None, reserve_bytes=0) as disk:
        disk.write("big", bytes(2 * MIB))
        results = [run_step(step["task"], disk, None) for step in steps]
        assert results == [step["result"] for step in steps]


HOSTILE_PATHS = [
    "../x",
    "/etc/passwd",
    "a/../../x",
    "a/../b",
    "..",
    "x\x00y",
    "",
    ".",
    "/",
    "./",
    "a//..",
    ".cpnode-tmp-1-x",
    "\ud800",  # a lone surrogate: not text, so no file name
    "a/\udcff",  # one that surrogateescape would turn into the byte 0xff
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
def test_paths_that_leave_the_directory_are_invalid(
    node_dir: NodeDirectory, tmp_path: Path, path: str
) -> None:
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        for attempt in every_access(disk, path):
            with pytest.raises(InvalidPath) as caught:
                attempt()
            assert str(caught.value) == "Invalid path"
        assert disk.used_bytes() == 0
    assert tree(tmp_path) == ["storage"]


@pytest.mark.parametrize("path", ["n" * 10_000, "/".join(["d"] * 5_000), "n" * 256])
def test_names_and_paths_too_long_for_the_system(
    node_dir: NodeDirectory, tmp_path: Path, path: str
) -> None:
    with disk_store(node_dir, tmp_path / "storage", MIB) as disk:
        for attempt in (lambda: disk.write(path, b"x"), lambda: disk.read(path)):
            with pytest.raises(FileError) as caught:
                attempt()
            assert str(caught.value) == "File name too long (os error 36)"
    assert tree(tmp_path) == ["storage"]


@pytest.mark.parametrize(
    ("path", "read_error"),
    [
        ("new/", "No such file or directory (os error 2)"),
        ("file/", "Not a directory (os error 20)"),
        ("dir/", "Is a directory (os error 21)"),
        ("dir//", "Is a directory (os error 21)"),
        ("dir/inner/", "Not a directory (os error 20)"),
        ("dir/new/", "No such file or directory (os error 2)"),
        ("file/.", "Not a directory (os error 20)"),
        ("dir/.", "Is a directory (os error 21)"),
    ],
)
def test_a_path_that_names_a_directory_is_never_a_file(
    node_dir: NodeDirectory, tmp_path: Path, path: str, read_error: str
) -> None:
    """As the system (and upstream) answers it: writing there is EISDIR; reading says what is
    there; RetrieveData finds no key. Nothing is created, nothing counted."""
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("file", b"f")
        disk.write("dir/inner", b"i")
        before = tree(storage)
        for attempt in (lambda: disk.write(path, b"x"), lambda: disk.store(path, b"x")):
            with pytest.raises(FileError) as caught:
                attempt()
            assert str(caught.value) == "Is a directory (os error 21)"
        with pytest.raises(FileError) as caught:
            disk.read(path)
        assert str(caught.value) == read_error
        with pytest.raises(KeyNotFound):
            disk.retrieve(path)
        assert tree(storage) == before
        assert disk.used_bytes() == 2 + DIRECTORY_BYTES
        assert disk.read("file") == b"f"


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("nope", "Key not found"),  # ENOENT
        ("missing/nope", "Key not found"),  # ENOENT on the way
        ("file/below", "Key not found"),  # ENOTDIR
        ("dir", "Key not found"),  # EISDIR
        ("n" * 256, "File name too long (os error 36)"),  # not a missing key: the OS says why
        ("../x", "Invalid path"),
    ],
)
def test_retrieve_says_key_not_found_only_when_no_file_is_there(
    node_dir: NodeDirectory, tmp_path: Path, key: str, answer: str
) -> None:
    with disk_store(node_dir, tmp_path / "storage", MIB) as disk:
        disk.write("file", b"f")
        disk.write("dir/inner", b"i")
        with pytest.raises(StoreError) as caught:
            disk.retrieve(key)
        assert str(caught.value) == answer
        assert isinstance(caught.value, KeyNotFound) == (answer == "Key not found")


def test_deep_paths_work_and_are_counted(node_dir: NodeDirectory, tmp_path: Path) -> None:
    deep = "/".join(["d"] * (MAX_PATH_PARTS - 1)) + "/f"  # as deep as a path may go
    counted = 4 + (MAX_PATH_PARTS - 1) * DIRECTORY_BYTES
    with disk_store(node_dir, tmp_path / "storage", MIB) as disk:
        disk.write(deep, b"deep")
        assert disk.read(deep) == b"deep"
        assert disk.used_bytes() == counted
    shutil.rmtree(node_dir.ledger_dir)
    os.mkdir(node_dir.ledger_dir)
    with disk_store(node_dir, tmp_path / "storage", MIB) as rescanned:
        assert rescanned.used_bytes() == counted


def test_symlinks_are_never_followed(node_dir: NodeDirectory, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "inside").mkdir()
    (storage / "link").symlink_to(outside)
    (storage / "leaf").symlink_to(outside / "secret")
    (storage / "inside" / "up").symlink_to("..")
    with disk_store(node_dir, storage, MIB) as disk:
        for path in ("link/new", "link/secret", "leaf", "inside/up/x", "inside/up/leaf"):
            with pytest.raises(InvalidPath):
                disk.write(path, b"overwritten")
            with pytest.raises(InvalidPath):
                disk.read(path)
        with pytest.raises(InvalidPath):
            disk.retrieve("leaf")
        assert "leaf" not in disk.get_storage_report()
    assert tree(outside) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"


def test_a_symlink_swapped_in_during_writes_never_lets_a_byte_out(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = tmp_path / "storage"
    sub, stash = storage / "sub", storage / "stash"
    sub.mkdir(parents=True)
    stop = threading.Event()
    swaps = 0

    def swap() -> None:
        nonlocal swaps
        while not stop.is_set():
            with contextlib.suppress(OSError):
                if stash.is_symlink():
                    stash.unlink()
                elif stash.exists():
                    shutil.rmtree(stash)
                os.rename(sub, stash)
                os.symlink(outside, sub)
                time.sleep(0)
                sub.unlink()
                os.rename(stash, sub)
                swaps += 1

    swapper = threading.Thread(target=swap)
    outcomes: dict[str, int] = {}
    with disk_store(node_dir, storage, 100 * MIB) as disk:
        swapper.start()
        try:
            # A second at least, and on until a write got through between swaps and ten
            # swaps were made (a loaded machine can starve either thread for a while).
            start = time.monotonic()
            attempt = 0
            while time.monotonic() - start < 1.0 or not (outcomes.get("written") and swaps > 10):
                assert time.monotonic() - start < 60, (outcomes, swaps)
                attempt += 1
                try:
                    disk.write(f"sub/f{attempt}", b"data")
                    outcome = "written"
                except StoreError as error:
                    outcome = type(error).__name__
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                assert list(outside.iterdir()) == []
        finally:
            stop.set()
            swapper.join(DEADLINE)
    assert swaps > 10
    assert outcomes.get("written", 0) > 0
    assert set(outcomes) <= {"written", "InvalidPath", "FileError"}


def test_quota_exactly_at_and_one_byte_over(node_dir: NodeDirectory, tmp_path: Path) -> None:
    quota = DIRECTORY_BYTES + 1000  # room for dir/ and 1000 bytes of files
    with disk_store(node_dir, tmp_path / "storage", quota) as disk:
        disk.write("a", bytes(1000))
        with pytest.raises(QuotaExceeded) as caught:
            disk.write("dir/b", b"1")  # dir/ fits exactly; its file does not
        assert str(caught.value) == "quota exceeded"
        assert f"above the quota of {quota} bytes (by 1 bytes)" in caught.value.detail
        assert disk.used_bytes() == 1000  # dir/ was removed and its count given back
        disk.write("a", b"\x07" * 1000)  # replacing counts only the difference
        with pytest.raises(QuotaExceeded):
            disk.write("a", bytes(quota + 1))
        assert disk.read("a") == b"\x07" * 1000
        disk.write("a", bytes(500))
        disk.store("dir/b", bytes(500))
        assert disk.used_bytes() == quota
        assert disk.get_storage_report() == "free: 0 bytes\na: 500 bytes\n"
        assert disk.retrieve("dir/b") == bytes(500)
    assert not list((tmp_path / "storage").rglob(".cpnode-tmp-*"))


def test_a_refused_write_removes_the_directories_it_created(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, 4 * DIRECTORY_BYTES + 1000) as disk:
        disk.write("kept/a", bytes(10))
        with pytest.raises(QuotaExceeded):  # its three directories fit, its 1000 bytes not
            disk.write("kept/new/deeper/still/b", bytes(1000))
        assert tree(storage) == ["kept", "kept/a"]
        assert disk.used_bytes() == DIRECTORY_BYTES + 10  # their count given back
        with pytest.raises(FileError, match="File name too long"):  # by the system, at last
            disk.write("kept/one/two/" + "x" * 300, b"x")
        assert tree(storage) == ["kept", "kept/a"]
        assert disk.used_bytes() == DIRECTORY_BYTES + 10
        disk.write("kept/one/b", b"x")  # and a write that succeeds keeps what it made
        assert tree(storage) == ["kept", "kept/a", "kept/one", "kept/one/b"]
        assert disk.used_bytes() == 2 * DIRECTORY_BYTES + 11 == charge(storage)


def test_each_directory_made_counts_once_against_the_quota(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("a/b/empty", b"")
        assert disk.used_bytes() == 2 * DIRECTORY_BYTES
        disk.write("a/b/more", b"12")  # into directories that are there: the file alone
        disk.write("a/c/f", b"3")
        assert disk.used_bytes() == 3 * DIRECTORY_BYTES + 3 == charge(storage)
        free = MIB - 3 * DIRECTORY_BYTES - 3
        assert disk.get_storage_report() == f"free: {free} bytes\nNo entries found\n"


def test_a_directory_over_the_quota_is_refused_and_nothing_is_left(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    quota = 2 * DIRECTORY_BYTES + 10
    with disk_store(node_dir, storage, quota) as disk:
        with pytest.raises(QuotaExceeded) as caught:
            disk.write("a/b/c/f", b"")  # a/ and a/b/ fit; a/b/c/ does not
        assert str(caught.value) == "quota exceeded"
        assert caught.value.detail == (
            "making the directory 'a/b/c' for 'a/b/c/f' would change the store's use by 4096 "
            f"bytes, from 8192 to 12288, above the quota of {quota} bytes (by 4086 bytes)"
        )
        assert tree(storage) == []  # no directory, no temporary one
        assert disk.used_bytes() == 0
        disk.write("a/f", bytes(10))
        disk.write("b/f", b"")  # exactly at the quota
        with pytest.raises(QuotaExceeded):
            disk.write("c/f", b"")
        assert tree(storage) == ["a", "a/f", "b", "b/f"]
        assert disk.used_bytes() == quota == charge(storage)


def test_many_deep_writes_stop_at_the_quota(node_dir: NodeDirectory, tmp_path: Path) -> None:
    """The reviewer's case, within the depth bound: empty files at the end of 63 new
    directories each, until a 1 MiB quota holds no more; what is there is what is counted."""
    storage = tmp_path / "storage"
    deep = "/".join(["d"] * (MAX_PATH_PARTS - 2))
    with disk_store(node_dir, storage, MIB) as disk:
        outcomes = []
        for index in range(25):
            try:
                disk.write(f"t{index}/{deep}/f", b"")
                outcomes.append("written")
            except QuotaExceeded:
                outcomes.append("refused")
        assert outcomes == ["written"] * 4 + ["refused"] * 21  # 4 x 63 of 256 directories
        assert disk.used_bytes() == 4 * 63 * DIRECTORY_BYTES == charge(storage)
        assert sorted(os.listdir(storage)) == ["t0", "t1", "t2", "t3"]


@pytest.mark.parametrize(
    "path",
    [
        "/".join(["d"] * MAX_PATH_PARTS) + "/f",
        "t0/" + "/".join(["d"] * 2000) + "/f",  # the reviewer's: 2002 parts, 4004 bytes
    ],
    ids=["one-part-too-many", "2002-parts"],
)
def test_paths_deeper_than_the_bound_are_invalid(
    node_dir: NodeDirectory, tmp_path: Path, path: str
) -> None:
    storage = tmp_path / "storage"
    parts = len([part for part in path.split("/") if part])
    with disk_store(node_dir, storage, MIB) as disk:
        for attempt in every_access(disk, path):
            with pytest.raises(InvalidPath) as caught:
                attempt()
            assert str(caught.value) == "Invalid path"
            assert caught.value.why == f"{parts} parts deep, more than the 64 a path may have"
        assert disk.used_bytes() == 0
    assert tree(storage) == []


def test_the_recount_counts_directories_and_no_temporaries(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """A full count (a node's start) and a sweep's recount count each directory at
    DIRECTORY_BYTES and leave temporaries out; a dead writer's temporary directory goes. A
    writer killed after counting a directory and before renaming it into place left the
    ledger high and its temporary directory: the sweep finds it and recounts."""
    storage = tmp_path / "storage"
    dead = dead_pid()
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("x/y/z/f", bytes(100))
        disk.write("x/g", bytes(20))
        disk.write("top", b"t")
    (storage / "made-by-hand" / "inner").mkdir(parents=True)
    (storage / f".cpnode-tmp-{dead}-dir").mkdir()
    (storage / "x" / f".cpnode-tmp-{dead}-deeper").mkdir()
    (storage / f".cpnode-tmp-{os.getpid()}-live").mkdir()  # a live writer's, not counted yet
    expected = 121 + 5 * DIRECTORY_BYTES  # x, x/y, x/y/z, made-by-hand, made-by-hand/inner
    shutil.rmtree(node_dir.ledger_dir)
    os.mkdir(node_dir.ledger_dir)
    with disk_store(node_dir, storage, MIB) as rescanned:
        assert rescanned.used_bytes() == expected
        assert not (storage / f".cpnode-tmp-{dead}-dir").exists()
        assert not (storage / "x" / f".cpnode-tmp-{dead}-deeper").exists()
        assert (storage / f".cpnode-tmp-{os.getpid()}-live").is_dir()
        (storage / f".cpnode-tmp-{os.getpid()}-live").rmdir()
        ledger = rescanned._ledger
        assert ledger is not None
        with ledger.locked() as usage:  # as such a writer left it
            usage.used += DIRECTORY_BYTES
        (storage / f".cpnode-tmp-{dead}-killed").mkdir()
        assert rescanned.used_bytes() == expected + DIRECTORY_BYTES
        assert has_temporary_files(storage, dead)
        assert rescanned.sweep_temporary(dead) == [f".cpnode-tmp-{dead}-killed"]
        assert rescanned.used_bytes() == expected == charge(storage)
    assert not any(name.startswith(".cpnode-tmp-") for name in os.listdir(storage))


def test_writers_making_the_same_directories_at_once_count_each_once(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    run_writers(make_shared_directories, storage, node_dir)
    with disk_store(node_dir, storage, MIB) as disk:
        assert disk.used_bytes() == 20 * 2 * DIRECTORY_BYTES + 8 * 20 == charge(storage)
    assert not any(name.startswith(".cpnode-tmp-") for name in os.listdir(storage))


def remove_as_a_refused_write_does(disk: DiskStore, directory: str) -> None:
    """Remove ``directory`` (empty) and give its count back, as the clean-up of another
    writer's refused write that had made it does."""
    head, _, name = directory.rpartition("/")
    parent = os.open(os.path.join(disk.path, head), os.O_RDONLY | os.O_DIRECTORY)
    try:
        disk._remove_directories([(parent, name)])
    finally:
        os.close(parent)


class RacedStore(DiskStore):
    """A store whose writes meet another writer's refused write ``times`` times: its clean-up
    removes ``victim`` just before (or after) this store calls ``method`` for ``directory``
    (any, when None)."""

    def __init__(
        self, storage: Path, ledger_dir: str, race: tuple[str, str, str | None, str], times: int
    ) -> None:
        super().__init__(storage, MIB, ledger_dir, reserve_bytes=0)
        self.method, self.when, self.directory, self.victim = race
        self.times = times

    def _meet(self, method: str, when: str, directory: str | None) -> None:
        ours = (method, when) == (self.method, self.when) and self.directory in (None, directory)
        if ours and self.times:
            self.times -= 1
            remove_as_a_refused_write_does(self, self.victim)

    def _write(
        self, parent: int, leaf: str, path: str, data: bytes | bytearray | memoryview
    ) -> None:
        self._meet("_write", "before", None)
        super()._write(parent, leaf, path, data)

    def _make_directory(self, parent: int, directory: str, path: str) -> bool:
        self._meet("_make_directory", "before", directory)
        made = super()._make_directory(parent, directory, path)
        self._meet("_make_directory", "after", directory)
        return made


RACES = {
    # the file's directory goes while the file is written: its rename fails
    "file-renamed-into-a-removed-directory": ("_write", "before", None, "d/e"),
    # d/ goes before d/e/ is made in it: the directory's rename fails
    "directory-renamed-into-a-removed-directory": ("_make_directory", "before", "d/e", "d"),
    # d/e/ goes once it was made, before it is opened: the open fails
    "directory-removed-before-it-is-opened": ("_make_directory", "after", "d/e", "d/e"),
}


@pytest.mark.parametrize("race", RACES.values(), ids=RACES.keys())
@pytest.mark.parametrize("times", [1, 3])
def test_a_write_whose_directory_another_writer_removed_makes_it_again(
    node_dir: NodeDirectory, tmp_path: Path, race: tuple[str, str, str | None, str], times: int
) -> None:
    """Writer A makes a directory for its write and is refused, while writer B has found it
    and not yet put its file (or next directory) in it: A's clean-up removes the (empty)
    directory and gives its count back. B's write must make it again (counting it) and
    succeed, however often that happens to it. It failed with "No such file or directory"."""
    storage = tmp_path / "storage"
    with RacedStore(storage, node_dir.ledger_dir, race, times) as disk:
        disk.write("d/e/f", b"valid")
        assert disk.times == 0
        assert disk.read("d/e/f") == b"valid"
        assert disk.used_bytes() == 2 * DIRECTORY_BYTES + 5 == charge(storage)
    assert tree(storage) == ["d", "d/e", "d/e/f"]


def test_a_write_whose_directory_is_removed_at_every_attempt_gives_up(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """The attempts are bounded: the last one's error is the system's, and what each
    attempt made is gone, its count given back."""
    storage = tmp_path / "storage"
    race = RACES["file-renamed-into-a-removed-directory"]
    with RacedStore(storage, node_dir.ledger_dir, race, times=1000) as disk:
        with pytest.raises(FileError) as caught:
            disk.write("d/e/f", b"valid")
        assert str(caught.value) == "No such file or directory (os error 2)"
        assert disk.times == 1000 - diskstore._WRITE_ATTEMPTS
        assert disk.used_bytes() == 0
    assert tree(storage) == []


def test_writers_in_step_never_fail_for_a_directory_another_writer_removed(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """Six writer processes, round after round in step, write into the same new directories,
    half of them refused by the quota once they made theirs. Each refused write removes the
    directories it made (empty), which the others were writing into: their writes failed
    with "No such file or directory" (tens of times in 150 rounds). Now every write is
    written or refused for the quota, and the ledger is what a fresh count finds."""
    storage = tmp_path / "storage"
    writers = 6
    reports = run_writers(write_in_step, storage, node_dir, writers, SPAWN.Barrier(writers))
    assert [failures for _, _, failures in reports] == [[]] * writers
    assert sum(written for written, _, _ in reports) == writers * STEP_ROUNDS // 2
    assert sum(refused for _, refused, _ in reports) == writers * STEP_ROUNDS // 2
    with disk_store(node_dir, storage, STEP_QUOTA) as disk:
        assert disk.used_bytes() == charge(storage)
    assert not list(storage.rglob(".cpnode-tmp-*"))


def test_eight_writer_processes_never_exceed_the_quota_together(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    reports = run_writers(fill_under_quota, storage, node_dir)
    total = charge(storage)
    assert total <= MIB
    assert sum(refused for _, refused in reports) > 0
    with disk_store(node_dir, storage, MIB) as disk:
        assert disk.used_bytes() == total
    assert not list(storage.rglob(".cpnode-tmp-*"))


def test_the_filesystem_is_never_filled(node_dir: NodeDirectory, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        with DiskStore(tiny / "storage", 100 * MIB, node_dir.ledger_dir, reserve_bytes=0) as disk:
            with pytest.raises(StoreFullError, match="short by") as caught:
                disk.write("big", bytes(2 * MIB))
            assert "2097152 bytes are needed" in str(caught.value)
            disk.write("fits", bytes(600 * 1024))
            with pytest.raises(StoreFullError):
                disk.write("fits", bytes(700 * 1024))
            assert disk.read("fits") == bytes(600 * 1024)
        ledger = tmp_path / "another ledger"
        with DiskStore(tiny / "small", 1000, ledger, reserve_bytes=0) as disk:
            with pytest.raises(QuotaExceeded):  # the quota speaks first, nothing is written
                disk.write("big", bytes(2 * MIB))
            assert disk.used_bytes() == 0
        with (
            DiskStore(tiny / "storage", None, reserve_bytes=300 * 1024) as disk,
            pytest.raises(StoreFullError, match="keep 307200 bytes free"),
        ):
            disk.write("more", bytes(200 * 1024))
        assert tree(tiny) == ["small", "storage", "storage/fits"]


@pytest.mark.parametrize("quota", [None, 100 * MIB], ids=["no-quota", "quota"])
def test_directories_never_fill_the_filesystem(
    node_dir: NodeDirectory, tmp_path: Path, quota: int | None
) -> None:
    """A directory needs DIRECTORY_BYTES free above the reserve, as a file of that size does,
    on every role (without a quota too): empty files in new directories once filled a disk
    while every write needed nothing."""
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        storage = tiny / "storage"
        reserve = space.free_bytes(str(tiny)) - 100
        with DiskStore(storage, quota, node_dir.ledger_dir, reserve_bytes=reserve) as disk:
            disk.write("top", b"")  # a file of no bytes still fits
            with pytest.raises(StoreFullError, match="no room for the directory 'd' of 'd/f'"):
                disk.write("d/f", b"")
            assert disk.used_bytes() == 0
        assert tree(storage) == ["top"]


def test_writers_that_looked_at_once_never_eat_the_reserve_together(tmp_path: Path) -> None:
    """Two writers each see room for their bytes and the reserve; the first to allocate takes
    it, and the second is refused once it has allocated, instead of filling the reserve."""
    kib = 1024
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        first = os.open(tiny / "first", os.O_WRONLY | os.O_CREAT, 0o600)
        second = os.open(tiny / "second", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            space.check_free(str(tiny), 600 * kib, 300 * kib, "the first write")
            space.check_free(str(tiny), 200 * kib, 300 * kib, "the second write")
            space.reserve(
                first, 600 * kib, str(tiny / "first"), for_mapping=False, keep_free=300 * kib
            )
            with pytest.raises(StoreFullError, match="below the 307200 bytes kept free") as caught:
                space.reserve(
                    second, 200 * kib, str(tiny / "second"), for_mapping=False, keep_free=300 * kib
                )
            assert caught.value.needed == 200 * kib
        finally:
            os.close(first)
            os.close(second)
        os.unlink(tiny / "second")  # as every caller does with its file on an error
        assert space.free_bytes(str(tiny)) >= 300 * kib


@pytest.mark.parametrize("writer", ["disk store", "memory store", "segment", "written segment"])
def test_every_writer_looks_again_at_the_reserve_once_its_bytes_are_allocated(
    tmp_path: Path, writer: str
) -> None:
    # 50 bytes fit in what is free above the reserve, but they take a whole 4 KiB page of the
    # tmpfs: each writer's second look (the one that catches writers that looked at once)
    # finds the reserve eaten into and refuses, leaving nothing behind.
    with mounted_tmpfs(tmp_path / "tiny", "1m") as tiny:
        claimed = claim_node_dir(str(tiny), "n1")
        try:
            with (
                DiskStore(tiny / "storage", None, reserve_bytes=0) as disk,
                MemoryStore(str(tiny), "n1") as memory,
            ):
                before = tree(tiny)
                reserve = space.free_bytes(str(tiny)) - 100
                disk.reserve_bytes = memory.reserve_bytes = reserve
                prefix = claimed.segment_prefix
                with pytest.raises(StoreFullError, match=r"below the \d+ bytes kept free"):
                    if writer == "disk store":
                        disk.write("f", b"x" * 50)
                    elif writer == "memory store":
                        memory.store("k", b"x" * 50)
                    elif writer == "segment":
                        PayloadSegment.create(str(tiny), prefix, 50, reserve_bytes=reserve)
                    else:
                        write_segment(str(tiny), prefix, [b"x" * 50], 50, reserve_bytes=reserve)
                assert tree(tiny) == before
                assert memory.list_entries() == []
        finally:
            claimed.release()


def test_os_errors_read_like_upstreams(node_dir: NodeDirectory, tmp_path: Path) -> None:
    with disk_store(node_dir, tmp_path / "storage", MIB) as disk:
        disk.write("dir/file", b"x")
        cases = {
            "nope.txt": "No such file or directory (os error 2)",
            "missing/nope.txt": "No such file or directory (os error 2)",
            "dir": "Is a directory (os error 21)",
            "dir/file/below": "Not a directory (os error 20)",
        }
        for path, text in cases.items():
            with pytest.raises(FileError) as caught:
                disk.read(path)
            assert str(caught.value) == text
            with pytest.raises(KeyNotFound):
                disk.retrieve(path)
        with pytest.raises(FileError, match=r"Is a directory \(os error 21\)"):
            disk.write("dir", b"x")
        with pytest.raises(FileError, match=r"Not a directory \(os error 20\)"):
            disk.write("dir/file/below", b"x")


def test_report_lists_only_regular_files_at_the_top(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        assert disk.get_storage_report() == f"free: {MIB} bytes\nNo entries found\n"
        disk.write("sub/deep.bin", b"12")
        (storage / "link").symlink_to(storage / "sub" / "deep.bin")
        (storage / f".cpnode-tmp-{os.getpid()}-x").write_bytes(b"in flight")
        free = MIB - 2 - DIRECTORY_BYTES  # sub/ counts, though the report lists no directory
        assert disk.get_storage_report() == f"free: {free} bytes\nNo entries found\n"
        disk.write("b", b"1")
        disk.write("a", b"")
        assert disk.get_storage_report() == f"free: {free - 1} bytes\na: 0 bytes\nb: 1 bytes\n"


def test_ledger_starts_from_a_scan_shared_by_every_process(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    (storage / "x" / "y").mkdir(parents=True)
    (storage / "x" / "y" / "old").write_bytes(bytes(300))
    (storage / "top").write_bytes(bytes(20))
    dead = SPAWN.Process(target=int)
    dead.start()
    dead.join(DEADLINE)
    (storage / "x" / f".cpnode-tmp-{dead.pid}-abc").write_bytes(bytes(5000))
    with disk_store(node_dir, storage, MIB) as first, disk_store(node_dir, storage, MIB) as second:
        counted = 320 + 2 * DIRECTORY_BYTES  # x/ and x/y/ too
        assert first.used_bytes() == second.used_bytes() == counted
        assert not (storage / "x" / f".cpnode-tmp-{dead.pid}-abc").exists()
        first.write("top", bytes(120))
        assert second.used_bytes() == counted + 100
        assert second.free_bytes() == MIB - counted - 100


def test_temporary_files_live_in_the_top_directory_only(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """So one look at ``storage_dir`` finds what a dead writer left, however deep it wrote."""
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, 100 * MIB) as disk:
        temporary = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                # A temporary directory renamed into place while the walk lists it is gone.
                with contextlib.suppress(FileNotFoundError):
                    found = [str(p.relative_to(storage)) for p in storage.rglob(".cpnode-*")]
                    temporary.extend(found)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            for round_ in range(300):
                disk.write(f"a/b/c/deep{round_ % 3}", bytes(2 * MIB))
                if temporary and round_ >= 3:
                    break
        finally:
            stop.set()
            watcher.join(DEADLINE)
        assert temporary, "the watcher never saw a write in flight"
        assert all("/" not in name for name in temporary)
        assert disk.used_bytes() == 6 * MIB + 3 * DIRECTORY_BYTES
    assert tree(storage) == ["a", "a/b", "a/b/c", "a/b/c/deep0", "a/b/c/deep1", "a/b/c/deep2"]


def test_sweeping_a_dead_writer_recounts_the_ledger(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    dead, other = dead_pid(), dead_pid()
    assert not has_temporary_files(storage, dead)  # no directory yet: no error
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("kept", bytes(100))
        disk.write("gone", bytes(5000))
        os.unlink(storage / "gone")  # behind the ledger's back: it now counts 5000 too many
        assert disk.used_bytes() == 5100
        assert disk.sweep_temporary(dead) == []
        assert disk.used_bytes() == 5100  # nothing found: no recount, the ledger is trusted
        for name in (f".cpnode-tmp-{dead}-a", f".cpnode-tmp-{other}-b"):
            (storage / name).write_bytes(bytes(700))
        (storage / f".cpnode-tmp-{os.getpid()}-c").write_bytes(bytes(700))
        assert has_temporary_files(storage, dead)
        assert not has_temporary_files(storage, dead_pid())
        assert disk.sweep_temporary(os.getpid()) == []  # alive
        assert disk.sweep_temporary(dead) == [f".cpnode-tmp-{dead}-a"]
        assert disk.used_bytes() == 100  # recounted from the files, temporary ones excluded
        assert sorted(os.listdir(storage)) == [f".cpnode-tmp-{os.getpid()}-c", "kept"]
        os.unlink(storage / f".cpnode-tmp-{os.getpid()}-c")
    with DiskStore(storage, None, reserve_bytes=0) as unlimited:
        (storage / f".cpnode-tmp-{dead}-d").write_bytes(b"x")
        assert unlimited.sweep_temporary(dead) == [f".cpnode-tmp-{dead}-d"]
    assert tree(storage) == ["kept"]


def test_a_sweep_with_nothing_to_sweep_leaves_the_ledger_file_untouched(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    # Each sweep wrote the ledger twice ("unknown", then the same count back), also when the
    # dead worker had left nothing: two writes for every worker death.
    storage = tmp_path / "storage"
    dead = dead_pid()
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("kept", bytes(100))
        assert disk._ledger is not None
        ledger = Path(disk._ledger.path)
        os.utime(ledger, ns=(1_000_000_000, 1_000_000_000))  # any write would move it on
        before = ledger.stat()
        content = ledger.read_bytes()
        (storage / f".cpnode-tmp-{os.getpid()}-live").write_bytes(bytes(700))
        assert disk.sweep_temporary(dead) == []  # none of its
        assert disk.sweep_temporary(os.getpid()) == []  # a live writer's: not swept
        after = ledger.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert ledger.read_bytes() == content
        os.unlink(storage / f".cpnode-tmp-{os.getpid()}-live")
        with disk._ledger.locked() as usage:  # the writer counted its file, then died
            usage.used += 700
        (storage / f".cpnode-tmp-{dead}-a").write_bytes(bytes(700))
        assert disk.used_bytes() == 800
        assert disk.sweep_temporary(dead) == [f".cpnode-tmp-{dead}-a"]  # a real sweep
        assert disk.used_bytes() == 100
        assert ledger.stat().st_mtime_ns != before.st_mtime_ns
    assert tree(storage) == ["kept"]


def test_a_sweep_whose_recount_fails_leaves_the_ledger_to_be_counted_again(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    # The dead writer's temporaries went before the recount: a recount that failed (or a kill
    # in between) left the count the writer had made, wrong, and nothing to correct it.
    class ScanFailsOnce(DiskStore):
        failing = False

        def _scan_usage(self) -> int:
            if self.failing:
                self.failing = False
                raise OSError(errno.EIO, "the recount failed")
            return super()._scan_usage()

    storage = tmp_path / "storage"
    dead = dead_pid()
    with ScanFailsOnce(storage, MIB, node_dir.ledger_dir, reserve_bytes=0) as disk:
        disk.write("kept", bytes(100))
        assert disk._ledger is not None
        with disk._ledger.locked() as usage:  # the writer counted its file, then died
            usage.used += 700
        (storage / f".cpnode-tmp-{dead}-a").write_bytes(bytes(700))
        disk.failing = True
        with pytest.raises(OSError, match="the recount failed"):
            disk.sweep_temporary(dead)
        assert sorted(os.listdir(storage)) == ["kept"]
        assert disk.used_bytes() == 100  # counted afresh at the next look
        assert disk.sweep_temporary(dead) == []
        assert disk.used_bytes() == 100  # nothing found: the count stays


def test_a_rename_that_fails_takes_its_count_back(
    node_dir: NodeDirectory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count changes before the rename; a rename that fails (the system's EIO, injected:
    no real one can be had on demand) gives the system's error and leaves the ledger and the
    old content as they were, and no temporary file."""
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("kept", bytes(100))
        disk.write("file", bytes(10))

        def failing(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(diskstore.os, "rename", failing)
        with pytest.raises(FileError) as caught:
            disk.write("file", bytes(500))
        monkeypatch.undo()
        assert str(caught.value) == "Input/output error (os error 5)"
        assert disk.used_bytes() == 110
        assert sorted(os.listdir(storage)) == ["file", "kept"]
        assert disk.read("file") == bytes(10)


def test_a_write_into_a_filesystem_mounted_below_storage_dir_works(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """Temporaries live in ``storage_dir``, and no rename crosses devices: a write into a
    tmpfs mounted at ``mnt`` failed with "Invalid cross-device link (os error 18)". Its
    temporary now goes beside the target, and the room checked is the mount's."""
    storage = tmp_path / "storage"
    storage.mkdir()
    with mounted_tmpfs(storage / "mnt", "1m"), disk_store(node_dir, storage, 4 * MIB) as disk:
        directories = 2 * DIRECTORY_BYTES  # mnt/ (there before the store opened) and mnt/sub/
        disk.write("kept", bytes(100))
        disk.write("mnt/sub/file", bytes(500))
        assert disk.read("mnt/sub/file") == bytes(500)
        assert disk.used_bytes() == 600 + directories
        with pytest.raises(StoreFullError, match="mnt/sub has"):  # the mount's 1 MiB, not /tmp's
            disk.write("mnt/sub/big", bytes(2 * MIB))
        assert disk.used_bytes() == 600 + directories
        assert tree(storage) == ["kept", "mnt", "mnt/sub", "mnt/sub/file"]
        disk.write("mnt/sub/file", bytes(7))  # replaced in place, as anywhere else
        assert disk.used_bytes() == 107 + directories
        assert tree(storage) == ["kept", "mnt", "mnt/sub", "mnt/sub/file"]


@pytest.mark.parametrize(
    "path",
    ["mnt/file", "mnt/sub/file"],
    ids=["replacing-a-file", "making-a-directory"],
)
def test_a_writer_killed_as_it_renames_into_a_mount_is_swept_and_recounted(
    node_dir: NodeDirectory, tmp_path: Path, path: str
) -> None:
    """A write into a filesystem mounted below ``storage_dir`` keeps its temporary beside its
    target. A writer killed after counting it and before renaming it into place left nothing
    in ``storage_dir`` for the pool's sweep to find: the ledger stayed wrong (400 bytes low
    here, for a 500-byte file being replaced by 100 bytes; 4096 high for a directory) and the
    temporary stayed in the mount, until the node restarted (4 of 150 kills at random times
    met that window; 47 left their temporary). Now an empty temporary in ``storage_dir``
    marks such a write, so the sweep finds it, recounts, and removes both."""
    storage = tmp_path / "storage"
    storage.mkdir()
    with mounted_tmpfs(storage / "mnt", "1m"), disk_store(node_dir, storage, 4 * MIB) as disk:
        disk.write("mnt/file", bytes(500))
        args = (str(storage), node_dir.ledger_dir, path)
        with child_process(killed_as_it_renames, *args) as process:
            process.join(DEADLINE)
        assert process.exitcode == -signal.SIGKILL
        assert list(storage.rglob(f".cpnode-tmp-{process.pid}-*"))  # it died mid-write
        if has_temporary_files(storage, process.pid):  # what the pool does when it sees it die
            disk.sweep_temporary(process.pid)
        assert disk.used_bytes() == DIRECTORY_BYTES + 500 == charge(storage)
        assert not list(storage.rglob(".cpnode-tmp-*"))
        assert tree(storage) == ["mnt", "mnt/file"]
        assert disk.read("mnt/file") == bytes(500)


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_a_writer_killed_mid_write_leaves_nothing_after_the_sweep(
    node_dir: NodeDirectory, tmp_path: Path, kind: str
) -> None:
    """SIGKILL a real process while it writes 2..8 MiB blobs (each replacing a smaller or a
    bigger one): its temporary file stays until ``sweep_temporary(pid)``; the disk ledger is
    right whenever no temporary file is left, and right after the sweep when one is."""
    storage = tmp_path / "storage"
    directory = Path(node_dir.path, "mem") if kind == "memory" else storage
    caught_mid_write = 0
    with (
        MemoryStore(SHM, node_dir.node_id) as memory,
        disk_store(node_dir, storage, 64 * MIB) as disk,
    ):
        store: MemoryStore | DiskStore = memory if kind == "memory" else disk

        def on_disk() -> int:
            files = [p for p in storage.rglob("*") if p.is_file()]
            return sum(p.stat().st_size for p in files if not p.name.startswith(".cpnode-tmp-"))

        # Until two kills land mid-write (a loaded machine may need many tries), or 60 s.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            writing = SPAWN.Event()
            args = (kind, SHM, node_dir.node_id, str(storage), node_dir.ledger_dir, writing)
            with child_process(keep_storing_big_blobs, *args) as process:
                assert writing.wait(DEADLINE)
                time.sleep(random.uniform(0.005, 0.05))
                process.kill()
                process.join(DEADLINE)
                assert process.exitcode == -signal.SIGKILL
            left = sorted(name for name in os.listdir(directory) if f"tmp-{process.pid}-" in name)
            if kind == "disk" and not left:  # (the memory store has no ledger)
                assert disk.used_bytes() == on_disk()
            assert sorted(store.sweep_temporary(process.pid)) == left
            assert [name for name in os.listdir(directory) if "tmp-" in name] == []
            if kind == "disk":
                assert disk.used_bytes() == on_disk()
            caught_mid_write += bool(left)
            if caught_mid_write >= 2:
                break
        assert caught_mid_write, "never killed in the middle of a write"
        blob = store.retrieve("k0")  # what was stored before a kill is there, whole
        assert blob == bytes([blob[0]]) * (blob[0] * 2 * MIB)


def test_a_writer_killed_while_its_refused_write_removes_its_directories(
    node_dir: NodeDirectory, tmp_path: Path
) -> None:
    """A refused write's clean-up removes a directory, then gives its count back: a writer
    killed between the two left the ledger DIRECTORY_BYTES high for good, with no temporary
    for the pool's sweep to find (2 of 40, and 1 of 150, kills at random times met it). The
    ledger now says "unknown" until the count is given back, and the next to read it counts."""
    storage = tmp_path / "storage"
    with disk_store(node_dir, storage, MIB) as disk:
        disk.write("kept", bytes(10))
        args = (str(storage), node_dir.ledger_dir)
        with child_process(killed_as_its_refused_write_removes_a_directory, *args) as process:
            process.join(DEADLINE)
        assert process.exitcode == -signal.SIGKILL
        assert tree(storage) == ["a", "a/b", "kept"]  # a/b/c/ went, then the writer
        assert not has_temporary_files(storage, process.pid)
        assert disk.used_bytes() == 2 * DIRECTORY_BYTES + 10 == charge(storage)
        disk.write("a/b/f", b"x")  # and the store goes on from the count
        assert disk.used_bytes() == 2 * DIRECTORY_BYTES + 11 == charge(storage)


def test_no_descriptor_outlives_its_owner(node_id: str, tmp_path: Path) -> None:
    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_descriptors()
    with claim_node_dir(SHM, node_id) as claimed:
        with MemoryStore(SHM, node_id) as memory:
            memory.store("k" * 500, b"v")
            memory.list_entries()
            with pytest.raises(KeyNotFound):
                memory.retrieve("missing")
        quota = DIRECTORY_BYTES + 10
        with DiskStore(tmp_path / "s", quota, claimed.ledger_dir, reserve_bytes=0) as disk:
            disk.write("a/b", b"12345")
            disk.read("a/b")
            disk.get_storage_report()
            for failing in (
                lambda: disk.write("a/c", bytes(11)),
                lambda: disk.write("b/c", b""),
                lambda: disk.read("a/missing"),
                lambda: disk.read("../x"),
                lambda: disk.write("a/b/c", b"x"),
            ):
                with pytest.raises(StoreError):
                    failing()
        with PayloadSegment.create(SHM, claimed.segment_prefix, 100) as segment:
            PayloadSegment.open(SHM, segment.name, unlink=True).close()
        with pytest.raises(NodeDirectoryInUse):
            claim_node_dir(SHM, node_id)
    assert open_descriptors() == before


def test_the_usage_scan_keeps_one_directory_open_at_a_time(tmp_path: Path) -> None:
    """The first count of a store (a node's start) once opened every directory of the tree
    at once: with more directories than the process may hold descriptors (1,100 of them
    under a limit of 1,024) the store no longer opened, and every task said "Too many open
    files". Here a child process with a limit of 64 opens a tree 150 wide and 150 deep."""
    storage = tmp_path / "storage"  # made as an operator would: deeper than a path may go
    for index in range(150):
        (storage / f"wide{index}").mkdir(parents=True)
        (storage / f"wide{index}" / "f").write_bytes(b"ab")
    deep = "/".join(["d"] * 150)
    (storage / deep).mkdir(parents=True)
    (storage / deep / "f").write_bytes(b"abc")
    dead = storage / deep / f".cpnode-tmp-{dead_pid()}-0123"
    dead.write_bytes(b"left by a killed writer")
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "from shm.diskstore import DiskStore\n"
        "store = DiskStore(sys.argv[1], 1 << 20, sys.argv[2], reserve_bytes=0)\n"
        "print(store.used_bytes())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(storage), str(ledger)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == 150 * 2 + 3 + 300 * DIRECTORY_BYTES
    assert not dead.exists()  # removed at any depth
