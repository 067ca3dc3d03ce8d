"""The storage tasks, run inside a worker: StoreData, RetrieveData, DiskWrite, DiskRead,
GetGlobalRam, GetStorage, with the upstream node's answers (tests/data/storage_vectors.jsonl).

    Worker role:  StoreData/RetrieveData/GetGlobalRam ──▶ MemoryStore (node-wide, in shm_dir)
    Disk role:    StoreData/RetrieveData/DiskWrite/DiskRead/GetStorage ──▶ DiskStore (quota)
    other roles:  DiskWrite/DiskRead ──▶ DiskStore without quota (upstream lets every role
                  write files; a tmpfs `storage_dir` makes it a shared-memory channel)

Each worker opens the stores on first use; the supervisor has claimed the node directory in
`shm_dir` before any worker starts, so every worker sees the same memory store and the same
quota ledger. Errors become `Error` results with upstream's texts. The memory store leaves
room in `shm_dir` for payload segments (`memory_reserve_bytes`). When a worker dies, the pool
calls `sweep_dead_writer` on its pid: what it was writing (temporary files) goes.

Large byte arrays skip the generic decoder: `decode_blob_task` finds the `data` array of a
`StoreData`/`DiskWrite` payload by a look at its head (or, in another JSON form, by the
brackets around it) and decodes it with the vectorised codec (what it cannot read is left to
the generic decoder, which names what is wrong).
Results carry their bytes through the vectorised encoder; a big one is a `BytesResult`, which
the worker encodes piece by piece straight into a payload segment (`workers.worker`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Final

import numpy as np
import orjson
import psutil

from node.protocol import codec
from node.protocol import messages as m
from shm.bytesjson import ByteArrayError, decode_byte_array, encode_byte_array
from shm.diskstore import MIB, DiskStore, has_temporary_files
from shm.errors import InvalidPath, QuotaExceeded, StoreError
from shm.memstore import MemoryStore
from shm.nodedir import LEDGER_DIR, node_dir_path
from workers.channel import SEGMENT_RESERVE_BYTES

log = logging.getLogger("cpnode.worker")

# Below this the generic decoder is as fast and validates everything in one place.
BLOB_FAST_PATH_BYTES: Final = 64 * 1024
# Each blob task with the name of its text field: another field is no such task (the generic
# decoder then says what is wrong with it).
_BLOB_TASKS: Final[dict[bytes, Callable[[str, bytes], m.Task]]] = {
    b'StoreData":{"key': m.StoreData,
    b'DiskWrite":{"path': m.DiskWrite,
    b'Tcp":{"addr': m.Tcp,
    b'Udp":{"addr': m.Udp,
}
_BLOB_HEAD = re.compile(
    rb'\{"AssignTask":\{"id":("(?:[^"\\]|\\.)*"),"task":\{"('
    + b"|".join(map(re.escape, _BLOB_TASKS))
    + rb')":("(?:[^"\\]|\\.)*"),"data":'
)
_BLOB_TAIL: Final = b"}}}}"


def decode_blob_task(payload: bytes | memoryview) -> tuple[str, m.Task] | None:
    """(id, task) of a large `StoreData`/`DiskWrite`/`Tcp`/`Udp` payload, decoding its byte
    array with the vectorised codec (numpy, which lets go of the GIL: the supervisor runs this
    in a thread for big `Tcp`/`Udp` tasks without stalling its event loop). The form every
    master writes is read by one regex; any other JSON form around the array (fields in
    another order, whitespace, escapes) by the generic decoder with the array left out. None
    for anything else (the generic decoder then answers it). Raises `ByteArrayError` for a
    malformed array, `RemoteProtocolError` for a malformed task around it."""
    if len(payload) < BLOB_FAST_PATH_BYTES:
        return None
    head = _BLOB_HEAD.match(payload, 0, 64 * 1024)
    if head is None or payload[-len(_BLOB_TAIL) :] != _BLOB_TAIL:
        return decode_blob_task_in_any_form(payload)
    try:
        ident = orjson.loads(head.group(1))
        name = orjson.loads(head.group(3))
    except orjson.JSONDecodeError:
        return None
    data = decode_byte_array(memoryview(payload)[head.end() : len(payload) - len(_BLOB_TAIL)])
    return ident, _BLOB_TASKS[head.group(2)](name, data)


def decode_blob_task_in_any_form(payload: bytes | memoryview) -> tuple[str, m.Task] | None:
    """`decode_blob_task` for valid JSON that serde would not write (fields in another order,
    whitespace, escapes): the generic decoder checks everything but the byte array, which it
    gets empty (`codec.around_blob`); the vectorised codec decodes the array. None when
    the array cannot be told apart. Raises `RemoteProtocolError` for a malformed task."""
    text = payload if type(payload) is bytes else bytes(payload)  # a mapped segment: copied
    around = codec.around_blob(text)
    if around is None:
        return None
    value, start, end = around
    if "AssignTask" not in value:
        return None  # a SubmitTask or TaskResult: no task for a node
    (fields,) = value["AssignTask"]["task"].values()  # the shape around_blob checked
    fields["data"] = []
    message = codec.message_from_json(value)
    assert isinstance(message, m.AssignTask)
    task = message.task
    assert isinstance(task, m.StoreData | m.DiskWrite | m.Tcp | m.Udp)  # what around_blob takes
    data = decode_byte_array(memoryview(text)[start:end])
    return message.id, dataclasses.replace(task, data=data)


STREAM_BYTES: Final = 256 * 1024
"""Blobs from this size on make a `BytesResult`: their JSON (3.6 times longer for random
bytes) is never assembled in memory."""
_STREAM_CHUNK: Final = 1 << 20  # blob bytes encoded at a time


class BytesResult:
    """The JSON of a `Bytes` result for a big blob, inside its envelope (`head` and `tail`:
    the rest of the `TaskResult` payload), produced piece by piece where it goes: the worker
    writes the pieces into a payload segment, so the whole text exists only there. ``len()``
    is its exact length, known before any piece is encoded; ``bytes()`` joins it (the rare
    path through memory)."""

    __slots__ = ("_size", "data", "head", "tail")

    def __init__(self, data: bytes, head: bytes = b"", tail: bytes = b"") -> None:
        self.data = data
        self.head = head
        self.tail = tail
        values = np.frombuffer(data, dtype=np.uint8)
        digits = len(data) + int(np.count_nonzero(values >= 10) + np.count_nonzero(values >= 100))
        commas = max(len(data) - 1, 0)
        self._size = len(head) + len(_BYTES_OPEN) + digits + commas + len(_BYTES_CLOSE) + len(tail)

    def enclosed(self, head: bytes, tail: bytes) -> BytesResult:
        """The same result inside `head` ... `tail` as well."""
        result = BytesResult.__new__(BytesResult)
        result.data = self.data
        result.head = head + self.head
        result.tail = self.tail + tail
        result._size = self._size + len(head) + len(tail)
        return result

    def __len__(self) -> int:
        return self._size

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The text in order: envelope, then the array `_STREAM_CHUNK` blob bytes at a time."""
        yield self.head + _BYTES_OPEN
        data = memoryview(self.data)
        for start in range(0, len(data), _STREAM_CHUNK):
            if start:
                yield b","
            yield memoryview(encode_byte_array(data[start : start + _STREAM_CHUNK]))[1:-1]
        yield _BYTES_CLOSE + self.tail

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces())


Answer = bytes | BytesResult
"""An executor's encoded result: the JSON text, or a big `Bytes` result to stream."""

_BYTES_OPEN: Final = b'{"Bytes":['
_BYTES_CLOSE: Final = b"]}"


def bytes_result_json(data: bytes) -> bytes | BytesResult:
    """`{"Bytes":[...]}`: a `BytesResult` for a big blob, else the text itself."""
    if len(data) >= STREAM_BYTES:
        return BytesResult(data)
    return b'{"Bytes":' + encode_byte_array(data) + b"}"


def os_error_text(error: OSError) -> str:
    """An OS error as Rust's `io::Error` displays it: "No such file or directory (os error 2)"."""
    code = error.errno or 0
    return f"{os.strerror(code) if code else error} (os error {code})"


class StorageTasks:
    """Executors for the storage tasks of one worker process."""

    def __init__(
        self, role: m.Role, *, node_id: str, shm_dir: str, storage_dir: str, disk_space_mb: int
    ) -> None:
        self.role = role
        self.node_id = node_id
        self.shm_dir = shm_dir
        self.storage_dir = storage_dir
        self.disk_space_mb = disk_space_mb
        self._memory: MemoryStore | None = None
        self._disk: DiskStore | None = None

    def executors(self) -> dict[type, Callable[[m.Task], Answer]]:
        table: dict[type, Callable[[m.Task], Answer]] = {
            m.StoreData: self._store_data,
            m.RetrieveData: self._retrieve_data,
            m.DiskWrite: self._disk_write,
            m.DiskRead: self._disk_read,
            m.GetGlobalRam: self._get_global_ram,
            m.GetStorage: self._get_storage,
        }
        return {kind: _answering_errors(run) for kind, run in table.items()}

    def close(self) -> None:
        for store in (self._memory, self._disk):
            if store is not None:
                store.close()
        self._memory = self._disk = None

    # ----------------------------------------------------------------------------- stores

    @property
    def memory(self) -> MemoryStore:
        if self._memory is None:
            reserve = memory_reserve_bytes(self.shm_dir)
            self._memory = MemoryStore(self.shm_dir, self.node_id, reserve_bytes=reserve)
        return self._memory

    @property
    def disk(self) -> DiskStore:
        if self._disk is None:
            if self.role is m.Role.Disk:
                ledger = os.path.join(node_dir_path(self.shm_dir, self.node_id), LEDGER_DIR)
                self._disk = DiskStore(self.storage_dir, self.disk_space_mb * MIB, ledger)
            else:  # as upstream: files on every role, the quota only on Disk nodes
                self._disk = DiskStore(self.storage_dir, None)
        return self._disk

    def sweep_dead_writer(self, pid: int) -> list[str]:
        """Remove the temporary files process ``pid`` (a worker that died) left in the memory
        store and in `storage_dir`; return their names. A look at two directories when there
        are none; a missing directory (the node is stopping, nothing was written) is no error."""
        removed = []
        try:
            memory = self.memory
        except FileNotFoundError:
            pass
        else:
            removed += memory.sweep_temporary(pid)
        if has_temporary_files(self.storage_dir, pid):
            removed += self.disk.sweep_temporary(pid)
        return removed

    # ----------------------------------------------------------------------------- tasks

    def _store_data(self, task: m.Task) -> bytes:
        assert isinstance(task, m.StoreData)
        if self.role is m.Role.Disk:
            self.disk.store(task.key, task.data)
        else:
            self.memory.store(task.key, task.data)
        return b'"Stored"'

    def _retrieve_data(self, task: m.Task) -> Answer:
        assert isinstance(task, m.RetrieveData)
        store = self.disk if self.role is m.Role.Disk else self.memory
        return bytes_result_json(store.retrieve(task.key))

    def _disk_write(self, task: m.Task) -> bytes:
        assert isinstance(task, m.DiskWrite)
        self.disk.write(task.path, task.data)
        return b'"Written"'

    def _disk_read(self, task: m.Task) -> Answer:
        assert isinstance(task, m.DiskRead)
        return bytes_result_json(self.disk.read(task.path))

    def _get_global_ram(self, task: m.Task) -> bytes:
        return codec.result_to_json(m.Response(self.memory.global_ram_report()))

    def _get_storage(self, task: m.Task) -> bytes:
        if self.role is not m.Role.Disk:
            return codec.result_to_json(m.Error("No disk store configured"))
        return codec.result_to_json(m.Response(self.disk.get_storage_report()))


def memory_reserve_bytes(shm_dir: str) -> int:
    """What the memory store leaves free in `shm_dir` for payload segments: what a segment
    itself leaves (`SEGMENT_RESERVE_BYTES`), but at most an eighth of a small filesystem, so a
    64 MiB `/dev/shm` (a container's default) still holds store entries."""
    return min(SEGMENT_RESERVE_BYTES, int(psutil.disk_usage(shm_dir).total) // 8)


def _answering_errors(run: Callable[[m.Task], Answer]) -> Callable[[m.Task], Answer]:
    def answer(task: m.Task) -> Answer:
        try:
            return run(task)
        except StoreError as error:
            # The wire text is upstream's few words; the log says why, for the operator.
            if isinstance(error, InvalidPath):
                log.info("%s refused %s: %s", type(task).__name__, _shown(error.path), error.why)
            elif isinstance(error, QuotaExceeded):
                log.info("%s refused: %s", type(task).__name__, error.detail)
            return codec.result_to_json(m.Error(str(error)))
        except (ByteArrayError, UnicodeError) as error:
            return codec.result_to_json(m.Error(f"{type(task).__name__}: {error}"))
        except OSError as error:
            if error.errno == errno.ENOSPC:
                return codec.result_to_json(m.Error(f"no space left in storage: {error}"))
            return codec.result_to_json(m.Error(os_error_text(error)))

    return answer


def _shown(path: str) -> str:
    """A path from a task, for a log line: quoted, and cut short when long."""
    text = repr(path)
    return text if len(text) <= 200 else f"{text[:200]}... ({len(path)} characters)"
