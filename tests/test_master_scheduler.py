"""The master's scheduling state, sans-I/O: events in, assignments out, no sockets."""

from __future__ import annotations

import sys
from collections import deque
from types import FrameType
from typing import Any

import orjson
import pytest

from node.master.scheduler import NodeState, Policy, Scheduler, SchedulerStats, role_of
from node.protocol import messages as m
from node.protocol import task_to_json

Role = m.Role


def submit(scheduler: Scheduler, ident: str, task: m.Task | None = None) -> None:
    task = task if task is not None else m.Compute(ident)
    scheduler.submit(ident, orjson.dumps(ident), task_to_json(task), role_of(task))


def node(scheduler: Scheduler, key: str, role: Role = Role.Worker) -> NodeState:
    state = scheduler.add_node(key, now=0.0)
    scheduler.set_role(state, role)
    scheduler.heartbeat(state)
    return state


def ids(assignments: list) -> list[tuple[str, str]]:
    return [(n.key, entry.id) for n, entry in assignments]


@pytest.mark.parametrize(
    "task, role",
    [
        (m.Compute("1"), Role.Worker),
        (m.ComplexMath("i"), Role.Worker),
        (m.HttpRequest("u"), Role.Worker),
        (m.StoreData("k", b""), Role.Worker),
        (m.RetrieveData("k"), Role.Worker),
        (m.GetGlobalRam(), Role.Worker),
        (m.DiskWrite("p", b""), Role.Disk),
        (m.DiskRead("p"), Role.Disk),
        (m.GetStorage(), Role.Disk),
        (m.Tcp("a", b""), Role.Internet),
        (m.Udp("a", b""), Role.Internet),
    ],
)
def test_role_of_follows_upstream_routing(task, role):
    assert role_of(task) is role


def test_fifo_round_robin_within_the_window():
    s = Scheduler(window=2)
    a, b = node(s, "a"), node(s, "b")
    for i in range(5):
        submit(s, f"t{i}")
    assert ids(s.dispatch()) == [("a", "t0"), ("b", "t1"), ("a", "t2"), ("b", "t3")]
    assert s.dispatch() == []
    assert s.complete("t1", b'"Stored"', at=1.0) is b
    assert ids(s.dispatch()) == [("b", "t4")]
    assert (s.stats().pending, s.stats().active, s.stats().completed) == (0, 4, 1)
    del a


def test_removed_nodes_tasks_go_back_to_the_front_in_order():
    s = Scheduler(window=3)
    a = node(s, "a")
    for i in range(5):
        submit(s, f"t{i}")
    assert ids(s.dispatch()) == [("a", "t0"), ("a", "t1"), ("a", "t2")]
    assert [e.id for e in s.remove_node(a)] == ["t0", "t1", "t2"]
    b = node(s, "b", Role.Worker)
    assert [e.id for _, e in s.dispatch()] == ["t0", "t1", "t2"]
    assert s.complete("t0", b"1", at=0.0) is b


def test_completed_or_replaced_waiting_tasks_are_skipped_lazily():
    s = Scheduler()
    submit(s, "done")
    submit(s, "replaced", m.Compute("old"))
    submit(s, "kept")
    s.complete("done", b"1", at=0.0)
    submit(s, "replaced", m.Compute("new"))
    node(s, "a")
    out = s.dispatch()
    assert [e.id for _, e in out] == ["kept", "replaced"]
    assert out[1][1].task_json == task_to_json(m.Compute("new"))
    assert s.stats().pending == 0


def test_resubmitting_an_active_task_does_not_run_it_twice():
    s = Scheduler()
    a = node(s, "a")
    submit(s, "t")
    assert len(s.dispatch()) == 1
    submit(s, "t")
    assert s.dispatch() == []
    assert s.stats().active == 1
    s.remove_node(a)
    node(s, "b")
    assert len(s.dispatch()) == 1  # still one task


def test_resubmitting_a_completed_task_drops_the_old_result():
    s = Scheduler()
    submit(s, "t")
    s.complete("t", b"1", at=0.0)
    assert s.result("t") == b"1"
    submit(s, "t")
    assert s.result("t") is None
    assert s.stats().pending == 1


def test_results_expire_in_completion_order_and_overwrites_restart_the_clock():
    s = Scheduler()
    s.complete("a", b"1", at=10.0)
    s.complete("b", b"2", at=20.0)
    s.complete("a", b"3", at=30.0)
    assert s.expire_results(cutoff=25.0) == 1  # b; a's first entry is stale
    assert (s.result("a"), s.result("b")) == (b"3", None)
    assert s.expire_results(cutoff=30.0) == 1
    assert s.stats().completed == 0


def test_nodes_are_not_eligible_before_their_first_heartbeat():
    s = Scheduler()
    a = s.add_node("a", now=0.0)
    submit(s, "t")
    assert s.dispatch() == []
    assert s.heartbeat(a) is True
    assert s.heartbeat(a) is False
    assert ids(s.dispatch()) == [("a", "t")]


def test_a_role_change_moves_the_node_to_the_other_queue():
    s = Scheduler()
    a = node(s, "a")
    submit(s, "disk", m.GetStorage())
    assert s.dispatch() == []
    s.set_role(a, Role.Disk)
    assert ids(s.dispatch()) == [("a", "disk")]


def test_silent_nodes_are_found_by_last_seen():
    s = Scheduler()
    a, b = node(s, "a"), node(s, "b")
    a.last_seen, b.last_seen = 1.0, 5.0
    assert s.silent_nodes(cutoff=3.0) == [a]


def test_upstream_policy_pushes_everything_only_after_a_frame():
    s = Scheduler(policy=Policy.UPSTREAM, window=1)
    a = node(s, "a")
    for i in range(4):
        submit(s, f"t{i}")
    assert s.dispatch() == []
    assert [e.id for _, e in s.after_frame(a)] == ["t0", "t1", "t2", "t3"]
    assert s.after_frame(a) == []


class _ScanCountingDeque(deque[Any]):
    """A role queue that counts the operations which walk the whole deque in C (iteration,
    `in`, `remove`, `index`, `count`): one line of Python each, so the line count of the test
    below would not see them grow with the queue."""

    scans = 0

    def __iter__(self) -> Any:
        _ScanCountingDeque.scans += 1
        return super().__iter__()

    def __reversed__(self) -> Any:
        _ScanCountingDeque.scans += 1
        return super().__reversed__()

    def __contains__(self, item: object) -> bool:
        _ScanCountingDeque.scans += 1
        return super().__contains__(item)

    def remove(self, item: Any) -> None:
        _ScanCountingDeque.scans += 1
        super().remove(item)

    def index(self, *args: Any) -> int:
        _ScanCountingDeque.scans += 1
        return super().index(*args)

    def count(self, item: Any) -> int:
        _ScanCountingDeque.scans += 1
        return super().count(item)


def test_work_per_task_does_not_grow_with_the_queue() -> None:
    # 100,000 waiting tasks must not slow an assignment: the work of one more submit, dispatch
    # and completion is the same with 1,000 or 100,000 tasks queued behind it. The work is
    # counted, not timed: the lines of the scheduler's code that run (a scan of the queue would
    # show up as lines per task growing with it). The master's speed with 100,000 tasks is
    # measured in bench/bench_master.py.
    scheduler_code = Scheduler.dispatch.__code__.co_filename

    def per_task_lines(queued: int) -> float:
        s = Scheduler(window=1)
        for i in range(queued):
            submit(s, f"q{i}")
        a = node(s, "a")
        s.dispatch()
        # (The scheduler's own queues, made to count the scans that lines cannot show.)
        s._queues = {role: _ScanCountingDeque(queue) for role, queue in s._queues.items()}
        _ScanCountingDeque.scans = 0
        lines = 0

        def count_lines(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal lines
            if event == "line":
                lines += 1
            return count_lines

        def on_call(frame: FrameType, event: str, arg: Any) -> Any:
            return count_lines if frame.f_code.co_filename == scheduler_code else None

        sys.settrace(on_call)
        try:
            for i in range(2000):
                active = next(iter(a.active))
                s.complete(active, b"1", at=0.0)
                s.dispatch()
                submit(s, f"n{i}")
        finally:
            sys.settrace(None)
        # The work was done: 2000 completions, the queue as long as before, one task active
        # (the first of the queued ones was dispatched before counting began).
        assert s.stats() == SchedulerStats(
            pending=queued - 1, active=1, completed=2000, nodes=1, eligible_nodes=1
        )
        assert _ScanCountingDeque.scans == 0, "a task's work walked a whole queue"
        return lines / 2000

    small = per_task_lines(1_000)
    large = per_task_lines(100_000)
    assert small > 0
    assert large <= small * 2, (small, large)
