"""Task executors for pool tests, loaded by workers through `WorkerSettings.executors`.

`compute` runs `Compute` tasks like the built-in executor, except for these test expressions:
`sleep S` sleeps S seconds (a task past its time limit), `spin S` computes in Python for S
seconds (a long computation: the worker's other thread gets the GIL only when the interpreter
switches), `hold S` spends S seconds (whole) in one C call that keeps the GIL (the worker's
other thread does not run meanwhile), `grow N` allocates N MiB and keeps
them (a worker whose memory grows), `orphan PREFIX` writes a payload segment under PREFIX in
/dev/shm, then hangs (a worker killed while it writes a big result), `wait PATH` runs until the
file PATH exists (a long task the test ends; at most WAIT_S), `pid PATH` adds the worker's pid
as a line to the file PATH, then runs until it is killed (at most WAIT_S: a task whose worker
the test kills), and `exit-once PATH S` makes the
file PATH and exits the process after S seconds, or answers 0 when PATH exists already (a
worker that dies in its task, which its retry survives).
"""

from __future__ import annotations

import ctypes
import os
import time

from node.protocol import messages as m
from shm.segments import write_segment
from workers.expr import ExpressionError, evaluate_compute

_kept: list[bytes] = []
WAIT_S = 30.0


def compute(task: m.Compute) -> m.Result:
    expression = task.expression
    if expression.startswith("sleep "):
        time.sleep(float(expression.removeprefix("sleep ")))
        return m.Number(0.0)
    if expression.startswith("spin "):
        deadline = time.monotonic() + float(expression.removeprefix("spin "))
        turns = 0
        while time.monotonic() < deadline:
            turns += 1
        return m.Number(float(turns))
    if expression.startswith("hold "):
        # A PyDLL function is called with the GIL held: libc's sleep() keeps it.
        ctypes.pythonapi.sleep(ctypes.c_uint(int(expression.removeprefix("hold "))))
        return m.Number(0.0)
    if expression.startswith("orphan "):
        write_segment("/dev/shm", expression.removeprefix("orphan "), [b"x" * 4096], 4096)
        time.sleep(30)
        return m.Number(0.0)
    if expression.startswith("wait "):
        path = expression.removeprefix("wait ")
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return m.Number(0.0)
    if expression.startswith("pid "):
        with open(expression.removeprefix("pid "), "a") as pids:
            pids.write(f"{os.getpid()}\n")
        time.sleep(WAIT_S)
        return m.Number(0.0)
    if expression.startswith("exit-once "):
        path, seconds = expression.removeprefix("exit-once ").rsplit(" ", 1)
        if os.path.exists(path):
            return m.Number(0.0)
        open(path, "x").close()
        time.sleep(float(seconds))
        os._exit(1)
    if expression.startswith("grow "):
        _kept.append(b"x" * (int(expression.removeprefix("grow ")) << 20))
        return m.Number(float(len(_kept)))
    try:
        return m.Number(evaluate_compute(expression))
    except ExpressionError as exc:
        return m.Error(str(exc))
