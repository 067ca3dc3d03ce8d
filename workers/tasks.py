"""Task executors: one function per task type, run inside a worker process.

    AssignTask payload ──TaskRunner.run_payload()──▶ TaskResult payload (bytes, wire-ready)

The runner decodes the payload itself (the supervisor only peeked at its id), executes the task
and encodes the result, so the supervisor never pays for either. Everything a task can go
wrong with ends as an `Error` result naming the reason: a result is always produced.

`Compute` and `ComplexMath` take a fast path that reads the payload's dict directly instead of
building records (`workers.expr` memoises repeated expressions).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.errors import RemoteProtocolError
from workers.expr import ExpressionError, evaluate_complex, evaluate_compute
from workers.stats import TaskStats

log = logging.getLogger("cpnode.worker")

_ERROR_RESULT = b',"result":{"Error":'


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
    extra: dict[str, str] = field(default_factory=dict)


def compute_result_json(expression: str) -> bytes:
    """The encoded result of a `Compute` task (a non-finite value becomes an `Error`)."""
    try:
        return codec.result_to_json(m.Number(evaluate_compute(expression)))
    except ExpressionError as exc:
        return codec.result_to_json(m.Error(str(exc)))


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
        self._executors: dict[type, Callable[[m.Task], bytes]] = {
            m.Compute: lambda t: compute_result_json(t.expression),  # type: ignore[union-attr]
            m.ComplexMath: lambda t: complex_result_json(t.expression),  # type: ignore[union-attr]
        }

    def run_task(self, task: m.Task) -> bytes:
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

    def run_payload(self, payload: bytes) -> bytes:
        """Decode an `AssignTask` payload, run it, return the `TaskResult` payload."""
        started = time.perf_counter()
        result = self._run_expression(payload)
        if result is not None:
            kind = "Compute" if b'"task":{"Compute"' in payload else "ComplexMath"
        else:
            kind, result = self._run_decoded(payload)
        self.stats.record(kind, _ERROR_RESULT in result, time.perf_counter() - started)
        return result

    def _run_decoded(self, payload: bytes) -> tuple[str, bytes]:
        try:
            message = codec.decode(payload)
        except RemoteProtocolError as exc:
            ident = _id_of(payload)
            return "malformed", codec.task_result_payload(ident, m.Error(f"malformed task: {exc}"))
        if type(message) is not m.AssignTask:
            error = m.Error(f"not a task: {type(message).__name__}")
            return "malformed", codec.task_result_payload(_id_of(payload), error)
        head = b'{"TaskResult":{"id":' + codec.json_str(message.id)
        kind = type(message.task).__name__
        return kind, head + b',"result":' + self.run_task(message.task) + b"}}"

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
        if type(expression) is not str:
            return None
        return (
            b'{"TaskResult":{"id":' + orjson.dumps(ident) + b',"result":' + run(expression) + b"}}"
        )


def _id_of(payload: bytes) -> str:
    try:
        return codec.peek(payload).id or ""
    except RemoteProtocolError:
        return ""
