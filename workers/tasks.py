"""Task executors: one function per task type, run inside a worker process.

    AssignTask payload ──TaskRunner.run_payload()──▶ TaskResult payload (bytes, wire-ready;
                                                     a big `Bytes` result: a `BytesResult`)

The runner decodes the payload itself (the supervisor only peeked at its id), executes the task
and encodes the result, so the supervisor never pays for either. Everything a task can go
wrong with ends as an `Error` result naming the reason: a result is always produced, and a bug
met while running one task (logged with its traceback) is that task's `Error`, never the end
of the worker.

A `Compute` with a plain expression, as masters write it, is answered by the compiled
`workers._fastpath.plain_result` (built at install time where a C compiler is), else read with
one regex match and answered without decoding (`_PLAIN_COMPUTE`, `workers.expr.evaluate_plain`);
the C function leaves to the latter the results it would not format alike (exponents), the ones
that are not finite and expressions above the length limit.
Other `Compute` and `ComplexMath` tasks take a path that reads the payload's dict directly
instead of building records (`workers.expr` memoises repeated expressions).
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import typing
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import RemoteProtocolError
from shm import native
from shm.bytesjson import ByteArrayError
from shm.segments import PayloadSegment, spill_reference
from workers.expr import (
    MAX_EXPRESSION_BYTES,
    PLAIN_JSON_EXPRESSION,
    ExpressionError,
    evaluate_complex,
    evaluate_compute,
    evaluate_plain,
)
from workers.stats import TaskStats
from workers.storage import (
    BLOB_FAST_PATH_BYTES,
    Answer,
    BytesResult,
    StorageTasks,
    decode_blob_task,
)

PlainBatch = Callable[
    [list[bytes], int, int, int, memoryview, int, int, "array[int]", "array[int]"],
    tuple[int, bytes, int],
]
"""`workers._fastpath.plain_batch`: (payloads, start, most, budget_ns, progress, seq,
max_result_bytes, bounds_ns, counts) -> (end, frames, nanoseconds)."""
_compiled_plain_result: Callable[[bytes], bytes | None] | None = None
_compiled_plain_batch: PlainBatch | None = None
_fastpath = native.load("workers._fastpath")
if _fastpath is not None:  # else the Python path answers everything
    _fastpath.set_max_expression_bytes(MAX_EXPRESSION_BYTES)
    _compiled_plain_result = _fastpath.plain_result
    _compiled_plain_batch = _fastpath.plain_batch

log = logging.getLogger("cpnode.worker")

_ERROR_RESULT = b',"result":{"Error":'
_RESULT_HEAD = b'{"TaskResult":{"id":"'
_NUMBER_RESULT = b'","result":{"Number":'
_LOWER_E = ord("e")
_perf_counter = time.perf_counter
_dumps = orjson.dumps
# The common task exactly as a master writes it: a `Compute` with a plain expression (see
# `workers.expr.plain_value`) and an id of printable ASCII without quotes or escapes. The hot
# path reads and checks both with this one match; anything else (other spacing, key order,
# escapes, other expressions) takes the decoding paths.
_PLAIN_COMPUTE = re.compile(
    rb'\{"AssignTask":\{"id":"([\x20\x21\x23-\x5b\x5d-\x7e]*+)",'
    rb'"task":\{"Compute":\{"expression":"(' + PLAIN_JSON_EXPRESSION.encode() + rb')"\}\}\}\}'
).fullmatch


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to know about its node; crosses to the worker process pickled."""

    role: m.Role = m.Role.Worker
    node_id: str = "default"
    storage_dir: str = "storage"
    shm_dir: str = "/dev/shm"
    disk_space_mb: int = 1024
    max_frame_bytes: int = 1 << 30
    log_level: str = "info"
    log_format: str = "text"
    extra: dict[str, str] = field(default_factory=dict)
    # Extension point: task type name -> "module:function" run instead of the built-in
    # executor (see `load_executor`). Imported by each worker at start; an import that fails
    # makes the worker exit at start, which the pool reports and backs off from.
    executors: dict[str, str] = field(default_factory=dict)


def compute_result_json(expression: str) -> bytes:
    """The encoded result of a `Compute` task (a non-finite value becomes an `Error`)."""
    try:
        return codec.result_to_json(m.Number(evaluate_compute(expression)))
    except ExpressionError as exc:
        return codec.result_to_json(m.Error(str(exc)))


def _plain_compute_result(ident: bytes, expression: bytes) -> bytes | None:
    """The `TaskResult` payload for a `_PLAIN_COMPUTE` match (its id is printable ASCII without
    escapes, so it is written back as it came); None when the value is not finite or the
    expression too long (the decoding path answers those with an `Error`)."""
    if len(expression) > MAX_EXPRESSION_BYTES:
        return None
    value = evaluate_plain(expression)
    if value - value != 0.0:  # nan or infinite
        return None
    number = _dumps(value)
    if _LOWER_E in number:  # serde_json writes 1e21, not 1e+21 (see `codec.format_f64`)
        number = number.replace(b"e+", b"e")
    return b"".join((_RESULT_HEAD, ident, _NUMBER_RESULT, number, b"}}}"))


def complex_result_json(expression: str) -> bytes:
    """The encoded result of a `ComplexMath` task."""
    try:
        return codec.result_to_json(m.Response(evaluate_complex(expression)))
    except ExpressionError as exc:
        return codec.result_to_json(m.Error(str(exc)))


class TaskRunner:
    """Executes tasks for one worker process."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.stats = TaskStats()
        self._executors: dict[type, Callable[[m.Task], Answer]] = {
            m.Compute: lambda t: compute_result_json(t.expression),  # type: ignore[union-attr]
            m.ComplexMath: lambda t: complex_result_json(t.expression),  # type: ignore[union-attr]
        }
        self.storage = storage_tasks(settings)
        self._executors.update(self.storage.executors())
        for kind, spec in settings.executors.items():
            self._executors[_task_type(kind)] = load_executor(spec)
        self._expression_fast_path = not {"Compute", "ComplexMath"} & settings.executors.keys()
        self._compiled_plain = _compiled_plain_result if self._expression_fast_path else None
        # The worker's loop runs runs of plain Computes with this, in C (see workers/worker.py).
        self.plain_batch = _compiled_plain_batch if self._expression_fast_path else None

    def run_task(self, task: m.Task) -> Answer:
        """Execute `task`; return its encoded result (never raises for a task's own failure)."""
        executor = self._executors.get(type(task))
        if executor is None:
            return codec.result_to_json(
                m.Error(f"{type(task).__name__} is not supported by this node yet")
            )
        try:
            return executor(task)
        except Exception as exc:  # a bug in an executor must still answer the task
            log.exception("task %s failed", type(task).__name__)
            return codec.result_to_json(m.Error(f"{type(task).__name__} failed: {exc!r}"))

    def run_payload(self, payload: bytes) -> Answer:
        """Decode an `AssignTask` payload, run it, return the `TaskResult` payload (a big
        `Bytes` result as a `BytesResult`, for the worker to stream). Never raises: a bug met
        on the way is logged and answered as the task's `Error`."""
        started = _perf_counter()
        result: Answer | None
        try:
            if self._expression_fast_path:
                # A plain Compute: in C where built, else (or where C declines) by the regex.
                compiled = self._compiled_plain
                result = None if compiled is None else compiled(payload)
                if result is None:
                    plain = _PLAIN_COMPUTE(payload)
                    if plain is not None:
                        result = _plain_compute_result(*plain.groups())
                if result is not None and len(result) <= self.settings.max_frame_bytes:
                    self.stats.record("Compute", False, _perf_counter() - started)
                    return result
            # A large payload is a blob task: parsing it whole to find out would cost seconds.
            fast = self._expression_fast_path and len(payload) < BLOB_FAST_PATH_BYTES
            result = self._run_expression(payload) if fast else None
            if result is not None:
                kind = "Compute" if b'"task":{"Compute"' in payload else "ComplexMath"
            else:
                kind, result = self._run_decoded(payload)
        except Exception as exc:
            kind, result = "failed", _failure_result(payload, exc)
        limit = self.settings.max_frame_bytes
        if len(result) > limit:  # a DiskRead of a huge file: no frame can carry it
            text = (
                f"the result would be a frame of {len(result)} bytes, above the limit of"
                f" {limit} bytes (max_frame_bytes)"
            )
            result = codec.task_result_payload(_task_id(payload), m.Error(text))
        error = type(result) is bytes and _ERROR_RESULT in result
        self.stats.record(kind, error, _perf_counter() - started)
        return result

    def _run_spilled(self, name: str, error: str, head: bytes) -> tuple[str, Answer]:
        """Run a task whose payload the supervisor wrote to a segment: map it, run it in place,
        and remove the segment (this worker now owns it)."""
        if error:
            return "spilled", codec.task_result_payload(_id_of(head), m.Error(error))
        try:
            segment = PayloadSegment.open(self.settings.shm_dir, name, unlink=True)
        except (OSError, ValueError) as exc:
            message = f"the task's payload segment {name} is gone: {exc}"
            return "spilled", codec.task_result_payload(_id_of(head), m.Error(message))
        try:
            return self._run_decoded(segment.buffer, head)
        finally:
            segment.close()

    def _run_decoded(
        self, payload: bytes | memoryview, payload_head: bytes | None = None
    ) -> tuple[str, Answer]:
        """Run any task by decoding it; `payload_head` (the first bytes, for the id in an
        error) is given when `payload` is a mapped segment."""
        if payload_head is None:
            assert type(payload) is bytes
            reference = spill_reference(payload)
            if reference is not None:
                return self._run_spilled(*reference)
            payload_head = payload
        try:
            blob = decode_blob_task(payload)
            if blob is not None:
                ident, task = blob
            else:
                message = codec.decode(payload)
                if type(message) is not m.AssignTask:
                    error = m.Error(f"not a task: {type(message).__name__}")
                    return "malformed", codec.task_result_payload(_id_of(payload_head), error)
                ident, task = message.id, message.task
        except (RemoteProtocolError, ByteArrayError) as exc:
            error = m.Error(f"malformed task: {exc}")
            return "malformed", codec.task_result_payload(_error_id(payload, payload_head), error)
        booked = codec.head_id(payload_head)
        if booked is not None and booked != ident:
            # Duplicate "id" keys (or variants): the node took the task for the first id; the
            # parser kept the last. One answer, under the id the node booked.
            error = m.Error(f"malformed task: more than one id ({booked!r}, {ident!r})")
            return "malformed", codec.task_result_payload(booked, error)
        result_head = b'{"TaskResult":{"id":' + codec.json_str(ident)
        return type(task).__name__, _enveloped(result_head, self.run_task(task))

    @staticmethod
    def _run_expression(payload: bytes) -> bytes | None:
        """`Compute`/`ComplexMath` without building records: the hot path. None when the
        payload is anything else, or not exactly well formed (the full decoder then answers)."""
        try:
            obj = orjson.loads(payload)
            body = obj["AssignTask"]
            ident = body["id"]
            task = body["task"]
            if len(obj) != 1 or type(ident) is not str or len(task) != 1:
                return None
            inner = task.get("Compute")
            run = compute_result_json
            if inner is None:
                inner = task.get("ComplexMath")
                run = complex_result_json
            expression = inner["expression"]
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None
        if type(expression) is not str or codec.head_id(payload) not in (ident, None):
            return None  # (another id at the head: `_run_decoded` answers the duplicate)
        return (
            b'{"TaskResult":{"id":' + orjson.dumps(ident) + b',"result":' + run(expression) + b"}}"
        )


def _enveloped(result_head: bytes, answer: Answer) -> Answer:
    """The `TaskResult` payload: `result_head` (up to the id), then the result."""
    if isinstance(answer, BytesResult):
        return answer.enclosed(result_head + b',"result":', b"}}")
    return result_head + b',"result":' + answer + b"}}"


def load_executor(spec: str) -> Callable[[m.Task], bytes]:
    """Import `"package.module:function"`, a function taking the task record (`m.Compute`,
    `m.StoreData`, ...) and returning its result record (`m.Number`, `m.Error`, ...); returns
    it wrapped to produce the encoded result. Raises ValueError or ImportError naming `spec`."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise ValueError(f'executor {spec!r}: expected "package.module:function"')
    function = getattr(importlib.import_module(module_name), name, None)
    if not callable(function):
        raise ValueError(f"executor {spec!r}: {module_name} has no function {name!r}")
    return lambda task: codec.result_to_json(function(task))


def _task_type(name: str) -> type:
    kind = getattr(m, name, None)
    if not isinstance(kind, type) or kind not in typing.get_args(m.Task):
        raise ValueError(f"executor for {name!r}: not a task type")
    return kind


def storage_tasks(settings: WorkerSettings) -> StorageTasks:
    """The storage executors of a worker with these settings (stores open on first use)."""
    return StorageTasks(
        settings.role,
        node_id=settings.node_id,
        shm_dir=settings.shm_dir,
        storage_dir=settings.storage_dir,
        disk_space_mb=settings.disk_space_mb,
    )


def sweep_dead_worker_files(settings: WorkerSettings, pid: int) -> list[str]:
    """Remove what the dead worker ``pid`` was writing into the stores (the pool calls this
    from the supervisor); return the names of the files removed."""
    storage = storage_tasks(settings)
    try:
        return storage.sweep_dead_writer(pid)
    finally:
        storage.close()


def _failure_result(payload: bytes, exc: Exception) -> bytes:
    """The `TaskResult` payload for a task whose run raised `exc`: a bug, logged with its
    traceback; the answer names the exception."""
    ident = _task_id(payload)
    log.error("task %r failed inside the worker", ident, exc_info=exc)
    error = m.Error(f"the worker failed to run this task: {exc!r}")
    return codec.task_result_payload(ident, error)


def _task_id(payload: bytes) -> str:
    """The id of the task `payload` carries, or of the spilled task it refers to ("" when
    there is none to read)."""
    reference = spill_reference(payload)
    return _id_of(payload if reference is None else reference[2])


def _error_id(payload: bytes | memoryview, head: bytes) -> str:
    """The id to answer a malformed task with: read from its head or, for a mapped payload
    whose id comes after its byte array (a JSON form serde does not write), around the array
    (a copy of the payload: an error path)."""
    ident = _id_of(head)
    if ident or type(payload) is bytes:
        return ident
    return codec.id_around_byte_array(bytes(payload), "AssignTask") or ""


def _id_of(payload: bytes) -> str:
    return codec.peek_id(payload) or ""
