"""Task executors for pool tests, loaded by workers through `WorkerSettings.executors`.

`compute` runs `Compute` tasks like the built-in executor, except for two test expressions:
`sleep S` sleeps S seconds (a task past its time limit), `grow N` allocates N MiB and keeps
them (a worker whose memory grows) and `orphan PREFIX` writes a payload segment under PREFIX in
/dev/shm, then hangs (a worker killed while it writes a big result).
"""

from __future__ import annotations

import time

from node.protocol import messages as m
from shm.segments import write_segment
from workers.expr import ExpressionError, evaluate_compute

_kept: list[bytes] = []


def compute(task: m.Compute) -> m.Result:
    expression = task.expression
    if expression.startswith("sleep "):
        time.sleep(float(expression.removeprefix("sleep ")))
        return m.Number(0.0)
    if expression.startswith("orphan "):
        write_segment("/dev/shm", expression.removeprefix("orphan "), [b"x" * 4096], 4096)
        time.sleep(30)
        return m.Number(0.0)
    if expression.startswith("grow "):
        _kept.append(b"x" * (int(expression.removeprefix("grow ")) << 20))
        return m.Number(float(len(_kept)))
    try:
        return m.Number(evaluate_compute(expression))
    except ExpressionError as exc:
        return m.Error(str(exc))
