"""The storage tasks, run inside a worker: StoreData, RetrieveData, DiskWrite, DiskRead,
GetGlobalRam, GetStorage (DESIGN contract 7, PROTOCOL.md "What each task does").

    Worker role:  StoreData/RetrieveData/GetGlobalRam ──▶ MemoryStore (node-wide, in shm_dir)
    Disk role:    StoreData/RetrieveData/DiskWrite/DiskRead/GetStorage ──▶ DiskStore (quota)
    other roles:  DiskWrite/DiskRead ──▶ DiskStore without quota (upstream lets every role
                  write files; a tmpfs `storage_dir` makes it a shared-memory channel)

Each worker opens the stores on first use; the supervisor has claimed the node directory in
`shm_dir` before any worker starts, so every worker sees the same memory store and the same
quota ledger. Errors become `Error` results with upstream's texts.

Large byte arrays skip the generic decoder: `decode_blob_task` finds the `data` array of a
`StoreData`/`DiskWrite` payload by a look at its head and decodes it with the vectorised codec,
and results carry their bytes through the vectorised encoder.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from typing import Final

import orjson

from node.protocol import codec
from node.protocol import messages as m
from shm.bytesjson import ByteArrayError, decode_byte_array, encode_byte_array
from shm.diskstore import MIB, DiskStore
from shm.errors import StoreError
from shm.memstore import MemoryStore
from shm.nodedir import LEDGER_DIR, node_dir_path

# Below this the generic decoder is as fast and validates everything in one place.
BLOB_FAST_PATH_BYTES: Final = 64 * 1024
_BLOB_HEAD = re.compile(
    rb'\{"AssignTask":\{"id":("(?:[^"\\]|\\.)*"),"task":\{"(StoreData|DiskWrite)":'
    rb'\{"(?:key|path)":("(?:[^"\\]|\\.)*"),"data":'
)
_BLOB_TAIL: Final = b"}}}}"


def decode_blob_task(payload: bytes | memoryview) -> tuple[str, m.Task] | None:
    """(id, task) of a large `StoreData`/`DiskWrite` payload written as every master writes
    it, decoding its byte array with the vectorised codec; None for anything else (the generic
    decoder then handles it). Raises `ByteArrayError` for a malformed array."""
    if len(payload) < BLOB_FAST_PATH_BYTES or payload[-len(_BLOB_TAIL) :] != _BLOB_TAIL:
        return None
    head = _BLOB_HEAD.match(payload, 0, 64 * 1024)
    if head is None:
        return None
    ident = orjson.loads(head.group(1))
    name = orjson.loads(head.group(3))
    data = decode_byte_array(memoryview(payload)[head.end() : len(payload) - len(_BLOB_TAIL)])
    if head.group(2) == b"StoreData":
        return ident, m.StoreData(name, data)
    return ident, m.DiskWrite(name, data)


def bytes_result_json(data: bytes) -> bytes:
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

    def executors(self) -> dict[type, Callable[[m.Task], bytes]]:
        table: dict[type, Callable[[m.Task], bytes]] = {
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
            self._memory = MemoryStore(self.shm_dir, self.node_id)
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

    # ----------------------------------------------------------------------------- tasks

    def _store_data(self, task: m.Task) -> bytes:
        assert isinstance(task, m.StoreData)
        if self.role is m.Role.Disk:
            self.disk.store(task.key, task.data)
        else:
            self.memory.store(task.key, task.data)
        return b'"Stored"'

    def _retrieve_data(self, task: m.Task) -> bytes:
        assert isinstance(task, m.RetrieveData)
        store = self.disk if self.role is m.Role.Disk else self.memory
        return bytes_result_json(store.retrieve(task.key))

    def _disk_write(self, task: m.Task) -> bytes:
        assert isinstance(task, m.DiskWrite)
        self.disk.write(task.path, task.data)
        return b'"Written"'

    def _disk_read(self, task: m.Task) -> bytes:
        assert isinstance(task, m.DiskRead)
        return bytes_result_json(self.disk.read(task.path))

    def _get_global_ram(self, task: m.Task) -> bytes:
        return codec.result_to_json(m.Response(self.memory.global_ram_report()))

    def _get_storage(self, task: m.Task) -> bytes:
        if self.role is not m.Role.Disk:
            return codec.result_to_json(m.Error("No disk store configured"))
        return codec.result_to_json(m.Response(self.disk.get_storage_report()))


def _answering_errors(run: Callable[[m.Task], bytes]) -> Callable[[m.Task], bytes]:
    def answer(task: m.Task) -> bytes:
        try:
            return run(task)
        except StoreError as error:
            return codec.result_to_json(m.Error(str(error)))
        except (ByteArrayError, UnicodeError) as error:
            return codec.result_to_json(m.Error(f"{type(task).__name__}: {error}"))
        except OSError as error:
            if error.errno == errno.ENOSPC:
                return codec.result_to_json(m.Error(f"no space left in storage: {error}"))
            return codec.result_to_json(m.Error(os_error_text(error)))

    return answer
