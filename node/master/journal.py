"""The master's journal (`state_file`): pending and completed tasks survive a restart.

    event loop ─ submit()/result() ─▶ SimpleQueue ─▶ writer thread ─ write+flush ─▶ state_file
    event loop ─ compact(snapshot) ─▶ (same queue, in order) ─▶ temp file, fsync, os.replace
    event loop ◀── on_written(ticket), once per write ─── writer thread (replies let go)
    start:  state_file ── replay() ──▶ Replayed(tasks, results) ──▶ scheduler, then compact at once

The file is JSON lines, one record per line, appended and never edited in place:

    {"op":"journal","format":"cpnode-master","version":1}         first line of every file we write
    {"op":"submit","id":"t1","task":{"Compute":{"expression":"1+2"}}}
    {"op":"result","id":"t1","result":{"Number":3.0},"at":1718000000.123}

Replaying applies the records in order with the master's own rules (a result completes the task,
a later submit of a completed id runs it again), so the tasks left without a result are the ones
still to run: those pending and those active on a node when the master stopped. Results older
than `result_ttl_s` (`at` is wall-clock time) are dropped on replay and by compaction.

The event loop never touches the file. It formats each line (bytes concatenation, no JSON
encoder) into a list, and `flush()`, which the server calls once per batch of input it handled,
puts the whole list on the queue: one hand-over per batch, not per record, so the writer thread
seldom competes with the loop for the GIL. The writer writes whatever has accumulated in one call.
Each hand-over carries a ticket (1, 2, 3, ...; `ticket` is the one of the records formatted now);
after each write the writer reports the last ticket written, `on_written(ticket)` in its own
thread, which the server turns into one wake-up of its loop.

Durability: each batch is written and flushed to the operating system as soon as the thread
wakes. The server sends a reply that acknowledges records (`TaskAccepted`; a `HeartbeatAck` that
follows a node's results, which the node then forgets) only once their ticket is reported, so a
crash of the master process (SIGKILL, an exception, the OOM killer) loses nothing it
acknowledged; the loop does no file I/O and does not wait, the replies do. The file is fsync'ed at
most every `fsync_interval_s` (default 1 s, as Redis's `appendfsync everysec`) while records
arrive, and at close: a power cut or a kernel crash can lose about the last second, acknowledged
or not. While the file cannot be written (`failed`), a ticket is reported once its records were
dropped: the master keeps serving, and acknowledges without durability until a whole snapshot is
written again (the error is logged). A compaction holds back the replies queued behind it until
the new file is in place (it is fsync'ed). Should the writer thread die (a bug: logged once, with
its traceback), it reports `ALL_WRITTEN`, `failed` stays true for good, and the loop hands it
nothing more: each batch is dropped at `flush()` and counted (`dropped`, logged at close), so the
queue does not grow while the master serves on without persistence.

Compaction: when the file holds more than `compact_ratio` times the records the live state needs
(plus `compact_slack`), the loop hands the writer a snapshot (references to bytes it already
holds) and the writer rewrites the file: temp file in the same directory, fsync, `os.replace`,
fsync of the directory, then it appends to the new file. The journal is also compacted right after
every replay, which drops expired results, unreadable lines and a torn tail.

A torn last line (the master died mid-write) is skipped with a warning; so is any other line that
cannot be read, with its line number. A non-empty file without a single readable record is
refused (`JournalError`) rather than overwritten. A state file of the upstream master (one JSON
object with `pending_tasks`) is imported: its pending tasks, the tasks active on its nodes (which
upstream would lose) and its completed results; the original is kept beside it as
`<state_file>.upstream`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import orjson

from node.errors import CpnodeError
from node.files import replace_atomically
from node.protocol import RemoteProtocolError, result_from_json, result_to_json, task_from_json
from node.protocol import messages as m

__all__ = [
    "ALL_WRITTEN",
    "DEFAULT_COMPACT_RATIO",
    "DEFAULT_COMPACT_SLACK",
    "DEFAULT_FSYNC_INTERVAL_S",
    "Journal",
    "JournalError",
    "Replayed",
    "StateFileLock",
    "replay",
]

_log = logging.getLogger("cpnode.master.journal")

DEFAULT_FSYNC_INTERVAL_S: Final = 1.0
DEFAULT_COMPACT_RATIO: Final = 4
DEFAULT_COMPACT_SLACK: Final = 10_000
# The writer writes once it holds this many pieces (three per record), so a burst of 100,000
# submissions reaches the OS in parts rather than after one huge join.
_MAX_BATCH: Final = 8192
_PIECES_PER_RECORD: Final = 3  # see _submit_pieces and _result_pieces

HEADER: Final = b'{"op":"journal","format":"cpnode-master","version":1}\n'
_VERSION: Final = 1


class JournalError(CpnodeError):
    """The state file cannot be used (unreadable, or not a journal); the master does not start."""


@dataclass(slots=True)
class Replayed:
    """What a state file held: tasks still to run (submission order) and unexpired results."""

    tasks: list[tuple[str, m.Task]] = field(default_factory=list)
    results: list[tuple[str, bytes, float]] = field(default_factory=list)
    records: int = 0
    skipped: int = 0
    source: str = "none"  # "none" (no file), "journal" or "upstream"


# --- record formats (shared by the loop side and the writer) --------------------------------


def submit_record(id_json: bytes, task_json: bytes) -> bytes:
    return b"".join(_submit_pieces(id_json, task_json))


def result_record(id_json: bytes, result_json: bytes, at: float) -> bytes:
    return b"".join(_result_pieces(id_json, result_json, at))


def _submit_pieces(id_json: bytes, task_json: bytes) -> tuple[bytes, bytes, bytes]:
    return b'{"op":"submit","id":' + id_json + b',"task":', task_json, b"}\n"


def _result_pieces(id_json: bytes, result_json: bytes, at: float) -> tuple[bytes, bytes, bytes]:
    # repr() of a float round-trips and is valid JSON for every finite value.
    return (
        b'{"op":"result","id":' + id_json + b',"result":',
        result_json,
        b',"at":' + repr(at).encode() + b"}\n",
    )


# --- replay ----------------------------------------------------------------------------------


def _as_str(value: object, what: str) -> str:
    if type(value) is not str:
        raise ValueError(f"{what} is not a string")
    return value


def _as_time(value: object) -> float:
    if type(value) not in (int, float):
        raise ValueError("`at` is not a number")
    return float(value)  # type: ignore[arg-type]


class _State:
    """Replay's model of the master: the same rules as the scheduler, without nodes."""

    def __init__(self) -> None:
        self.tasks: dict[str, m.Task] = {}
        self.results: dict[str, tuple[bytes, float]] = {}

    def submit(self, ident: str, task: m.Task) -> None:
        self.results.pop(ident, None)
        self.tasks.pop(ident, None)  # a repeated waiting id moves to the back, as in the master
        self.tasks[ident] = task

    def result(self, ident: str, result_json: bytes, at: float) -> None:
        self.tasks.pop(ident, None)
        self.results.pop(ident, None)
        self.results[ident] = (result_json, at)


def _apply(state: _State, record: Any) -> None:
    if type(record) is not dict:
        raise ValueError("not a JSON object")
    op = record.get("op")
    if op == "submit":
        ident = _as_str(record.get("id"), "`id`")
        state.submit(ident, task_from_json(record.get("task")))
    elif op == "result":
        ident = _as_str(record.get("id"), "`id`")
        result = result_from_json(record.get("result"))
        state.result(ident, result_to_json(result), _as_time(record.get("at")))
    elif op == "journal":
        if record.get("version") != _VERSION:
            raise ValueError(f"journal version {record.get('version')!r}, expected {_VERSION}")
    else:
        raise ValueError(f"unknown op {op!r}")


def _import_upstream(document: dict[str, Any], label: str, now: float) -> Replayed:
    """The upstream master's `MasterState`: pending tasks, nodes' active tasks, results."""
    state = _State()
    skipped = 0
    pending = document.get("pending_tasks") or {}
    nodes = document.get("connected_nodes") or {}
    completed = document.get("completed_tasks") or {}
    sources: list[dict[str, Any]] = [pending] if isinstance(pending, dict) else []
    if isinstance(nodes, dict):
        sources += [
            node["active_tasks"]
            for node in nodes.values()
            if isinstance(node, dict) and isinstance(node.get("active_tasks"), dict)
        ]
    for tasks in sources:
        for ident, task in tasks.items():
            try:
                state.submit(ident, task_from_json(task))
            except RemoteProtocolError as error:
                skipped += 1
                _log.warning("%s: upstream task %r skipped: %s", label, ident, error)
    if isinstance(completed, dict):
        for ident, result in completed.items():
            try:
                state.result(ident, result_to_json(result_from_json(result)), now)
            except RemoteProtocolError as error:
                skipped += 1
                _log.warning("%s: upstream result %r skipped: %s", label, ident, error)
    return Replayed(
        tasks=list(state.tasks.items()),
        results=[(ident, result, at) for ident, (result, at) in state.results.items()],
        records=len(state.tasks) + len(state.results),
        skipped=skipped,
        source="upstream",
    )


def _looks_upstream(data: bytes) -> dict[str, Any] | None:
    if not data.lstrip().startswith(b"{"):
        return None
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict) and "pending_tasks" in document and "op" not in document:
        return document
    return None


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise JournalError unless a state file can be written at ``path`` (blocking): the file
    is always rewritten by a rename in its directory, so that directory must take a new file.
    Checked at start, so that a typo is an error then and not a master that persists nothing.
    """
    label = os.fspath(path)
    if os.path.isdir(label):
        raise JournalError(f"{label}: the state file is a directory")
    directory = os.path.dirname(os.path.abspath(label))
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".cpnode-probe.", dir=directory)
    except OSError as error:
        raise JournalError(
            f"{label}: cannot write the state file in {directory}: {error.strerror or error}"
        ) from None
    os.close(descriptor)
    os.unlink(probe)


def replay(path: str | os.PathLike[str], *, ttl_s: float, now: float | None = None) -> Replayed:
    """Read a state file (blocking: call it off the event loop). A missing file is empty.

    Raises JournalError when the file exists but cannot be read or holds no readable record.
    """
    label = os.fspath(path)
    now = time.time() if now is None else now
    try:
        with open(label, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        return Replayed()
    except OSError as error:
        raise JournalError(f"{label}: cannot read state file: {error.strerror or error}") from None
    upstream = _looks_upstream(data)
    if upstream is not None:
        replayed = _import_upstream(upstream, label, now)
    else:
        replayed = _replay_lines(data, label)
    cutoff = now - ttl_s
    replayed.results = [item for item in replayed.results if item[2] > cutoff]
    return replayed


def _replay_lines(data: bytes, label: str) -> Replayed:
    state = _State()
    lines = data.split(b"\n")
    # The last element is what follows the final newline: empty for a clean file, a torn
    # record when the master died mid-write.
    last = len(lines) - 1
    while last > 0 and not lines[last].strip():
        last -= 1
    records = skipped = 0
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            _apply(state, orjson.loads(line))
            records += 1
        except (orjson.JSONDecodeError, ValueError, RemoteProtocolError) as error:
            skipped += 1
            if number == last and not data.endswith(b"\n"):
                _log.warning(
                    "%s: line %d is incomplete (the master stopped mid-write); skipped",
                    label,
                    number + 1,
                )
            else:
                _log.warning("%s: line %d unreadable, skipped: %s", label, number + 1, error)
    if records == 0 and skipped:
        raise JournalError(
            f"{label}: not a cpnode-master journal ({skipped} unreadable lines, none readable); "
            "move it away or choose another state file"
        )
    return Replayed(
        tasks=list(state.tasks.items()),
        results=[(ident, result, at) for ident, (result, at) in state.results.items()],
        records=records,
        skipped=skipped,
        source="journal" if records else "none",
    )


# --- the writer --------------------------------------------------------------------------------


class StateFileLock:
    """`<state_file>.lock`, held (flock) by the master that uses the state file.

    A second master given the same file would replay it and rewrite it (`os.replace`) while the
    first went on appending to the file it had open, no longer the state file: everything the
    first accepted from then on was lost. The lock file goes when its master closes.
    """

    def __init__(self, state_file: str | os.PathLike[str]) -> None:
        self.state_file = os.fspath(state_file)
        self.path = self.state_file + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `JournalError` naming the master that holds it."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as error:
                raise JournalError(
                    f"{self.state_file}: cannot make its lock file {self.path}: "
                    f"{error.strerror or error}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise JournalError(
                    f"{self.state_file}: in use by another cpnode-master (pid {holder}, see "
                    f"{self.path}); give each master its own state file"
                ) from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # its holder removed it as we opened it: take the new one

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    tasks: list[tuple[bytes, bytes]]
    results: list[tuple[str, bytes, float]]
    ticket: int


_STOP: Final = object()
ALL_WRITTEN: Final = sys.maxsize
"""The ticket the writer reports when it stops: nothing it was handed waits any more."""


class Journal:
    """Appends records to the state file from a writer thread; see the module docstring.

    Every method is called from the event loop's thread; only the writer thread touches the file.
    Each hand-over (`flush`, `compact`) carries a ticket, numbered from 1 in order; `ticket` is
    the one the records formatted now will travel with. The writer calls `on_written(ticket)`
    (given to `start`, called in the writer's thread) once every hand-over up to that ticket
    is written and flushed to the operating system, or was dropped because the file could not
    be written (see `failed`); `ALL_WRITTEN` when it stops.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        compact_ratio: int = DEFAULT_COMPACT_RATIO,
        compact_slack: int = DEFAULT_COMPACT_SLACK,
    ) -> None:
        self.path = os.fspath(path)
        self.fsync_interval_s = fsync_interval_s
        self.compact_ratio = compact_ratio
        self.compact_slack = compact_slack
        # Records the file holds (as far as the loop knows: queued ones count already).
        self.records = 0
        self.compactions = 0
        self._lines: list[bytes] = []  # formatted since the last flush()
        self._handed = 0  # tickets handed to the writer
        self._on_written: Callable[[int], None] | None = None
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failed = False
        # Set by the writer thread as it dies: from then on the loop drops what it would
        # have handed over, rather than queue it for a thread that is gone.
        self._writer_gone = False
        self.dropped = 0  # records dropped since the writer was gone

    # --- loop side -------------------------------------------------------------------------

    def start(
        self,
        tasks: list[tuple[bytes, bytes]],
        results: list[tuple[str, bytes, float]],
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        """Start the writer; its first job rewrites the file from this (replayed) state."""
        self._on_written = on_written
        self.compact(tasks, results)
        self._thread = threading.Thread(target=self._run, name="cpnode-master-journal", daemon=True)
        self._thread.start()

    def submit(self, id_json: bytes, task_json: bytes) -> None:
        # In pieces: the writer joins them, so a big task's JSON is not copied on the loop.
        self._lines.extend(_submit_pieces(id_json, task_json))
        self.records += 1

    def result(self, id_json: bytes, result_json: bytes, at: float) -> None:
        self._lines.extend(_result_pieces(id_json, result_json, at))
        self.records += 1

    @property
    def ticket(self) -> int:
        """The ticket of the records formatted now: they are in the file (as far as a crash
        of this process goes) once the writer reports it."""
        return self._handed + 1

    def flush(self) -> None:
        """Hand the records formatted so far to the writer (cheap; call it once per batch)."""
        if self._writer_gone:
            self._drop()
        elif self._lines:
            self._handed += 1
            self._queue.put((self._handed, self._lines))
            self._lines = []

    def wants_compaction(self, live_records: int) -> bool:
        return self.records > self.compact_ratio * live_records + self.compact_slack

    @property
    def failed(self) -> bool:
        """The last write failed: records are not kept until a compaction (a whole snapshot of
        the live state) succeeds. The server asks for one now and then. Also true, for good,
        once the writer thread is gone (see `dropped`)."""
        return self._failed or self._writer_gone

    @property
    def writer_gone(self) -> bool:
        """The writer thread died (a bug, logged): nothing is written until the master restarts."""
        return self._writer_gone

    def compact(
        self, tasks: list[tuple[bytes, bytes]], results: list[tuple[str, bytes, float]]
    ) -> None:
        """Rewrite the file to hold exactly this state (plus what is queued after it)."""
        if self._writer_gone:
            self._drop()
            return
        self._lines = []  # the snapshot holds what they record
        self._handed += 1
        self._queue.put(_Snapshot(tasks, results, self._handed))
        self.records = len(tasks) + len(results)
        self.compactions += 1

    def close(self) -> None:
        """Write what is queued, fsync, stop the writer (blocking: call it off the loop)."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()
        if self.dropped:
            _log.error(
                "%s: at least %d records were not persisted: the journal's writer had failed",
                self.path,
                self.dropped,
            )

    def _drop(self) -> None:
        """The writer is gone: forget and count the records formatted since the last flush,
        and those queued before the loop saw it go (once: nothing is queued after that)."""
        lost = len(self._lines)
        self._lines = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if type(item) is tuple:
                lost += len(item[1])
        self.dropped += lost // _PIECES_PER_RECORD

    # --- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        file = None
        synced_at = time.monotonic()
        unsynced = False
        taken = 0  # the ticket of the last hand-over taken from the queue
        try:
            while True:
                timeout = None
                if unsynced:
                    timeout = max(0.0, synced_at + self.fsync_interval_s - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                batch: list[bytes] = []
                stop = False
                while item is not None:
                    if type(item) is tuple:
                        taken, lines = item
                        batch += lines
                        if len(batch) >= _MAX_BATCH:
                            file = self._write(file, batch)
                            unsynced = True
                            self._report(taken)
                    elif item is _STOP:
                        stop = True
                        break
                    else:
                        assert isinstance(item, _Snapshot)
                        # Records queued before the snapshot are part of it already.
                        batch.clear()
                        if file is not None:
                            file.close()
                        file = self._rewrite(item)
                        synced_at = time.monotonic()
                        unsynced = False
                        taken = item.ticket
                        self._report(taken)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                if batch:
                    file = self._write(file, batch)
                    unsynced = True
                    self._report(taken)
                if (
                    file is not None
                    and unsynced
                    and (stop or time.monotonic() - synced_at >= self.fsync_interval_s)
                ):
                    self._sync(file)
                    synced_at = time.monotonic()
                    unsynced = False
                if stop:
                    return
        except BaseException:
            # A bug. What the loop holds back for the writer is let go (in `finally`): it
            # must not wait for a thread that is gone, nor queue more for it.
            self._writer_gone = True
            _log.exception(
                "%s: the journal's writer failed; tasks are not persisted any more (the "
                "master serves on and drops their records)",
                self.path,
            )
            raise
        finally:
            self._report(ALL_WRITTEN)
            if file is not None:
                file.close()

    def _report(self, ticket: int) -> None:
        if self._on_written is not None:
            self._on_written(ticket)

    def _write(self, file: Any, batch: list[bytes]) -> Any:
        if batch and not self._failed:
            try:
                if file is None:
                    file = open(self.path, "ab")  # noqa: SIM115  (lives across batches)
                file.writelines(batch)  # a big task's JSON is not copied into a join
                file.flush()
            except OSError as error:
                self._fail(error)
        batch.clear()
        return file

    def _sync(self, file: Any) -> None:
        if self._failed:
            return
        try:
            os.fsync(file.fileno())
        except OSError as error:
            self._fail(error)

    def _rewrite(self, snapshot: _Snapshot) -> Any:
        """Write the snapshot as the whole file (after a failure too: it holds everything the
        records that were not written would have)."""

        def fill(out: BinaryIO) -> None:
            chunk = [HEADER]
            for id_json, task_json in snapshot.tasks:
                chunk.append(submit_record(id_json, task_json))
                if len(chunk) >= _MAX_BATCH:
                    out.write(b"".join(chunk))
                    chunk.clear()
            for ident, result_json, at in snapshot.results:
                chunk.append(result_record(orjson.dumps(ident), result_json, at))
                if len(chunk) >= _MAX_BATCH:
                    out.write(b"".join(chunk))
                    chunk.clear()
            out.write(b"".join(chunk))

        try:
            replace_atomically(self.path, fill)
            file = open(self.path, "ab")  # noqa: SIM115  (lives across batches)
        except OSError as error:
            self._fail(error)
            return None
        if self._failed:
            self._failed = False
            _log.warning("%s: the state file is written again; tasks are persisted", self.path)
        return file

    def _fail(self, error: OSError) -> None:
        # The master keeps serving without persistence rather than stopping its nodes' work,
        # and tries a whole snapshot now and then (see `failed`).
        reason = error.strerror or error
        if not self._failed:
            self._failed = True
            _log.error(
                "%s: cannot write the state file (%s); tasks are not persisted until it can be "
                "written again (the master will retry)",
                self.path,
                reason,
            )
        else:
            _log.warning("%s: still cannot write the state file (%s)", self.path, reason)


def keep_upstream_original(path: str | os.PathLike[str]) -> str:
    """Copy an upstream state file to `<path>.upstream` before it is rewritten in our format."""
    label = os.fspath(path)
    backup = label + ".upstream"
    shutil.copy2(label, backup)
    return backup
