"""Scheduling state of the local master, sans-I/O: what waits, who runs what, what is done.

    SubmitTask ──submit()──▶ FIFO deque of its role ──dispatch() / after_frame()──▶ [(node, task)]
                                  ▲                                                     │
                                  └──── requeue at the FRONT ◀── remove_node() ◀────────┤ (evicted,
    TaskResult ──complete()──▶ results (id → result JSON, completion time)   closed, Disconnect)
                                  └──── expire_results(cutoff) drops those older than result_ttl_s

No sockets, no clock of its own: the server feeds it events with timestamps and turns the
assignments it returns into `AssignTask` frames. Every operation is O(1) (amortised) per task it
touches: a queue is a `collections.deque` of `TaskEntry` objects, and an entry that was completed
or replaced while it waited stays in its deque and is skipped when it reaches the front, instead of
being searched for and removed.

Two policies decide when a node receives work:
- `fifo` (ours): a node of the task's role with a free slot in its in-flight window gets the
  task as soon as it is submitted; a freed slot (a result) is refilled at once. Free nodes of a
  role take turns (round robin), so one node cannot swallow the queue while others idle.
- `upstream`: like the upstream master, a node receives tasks only while the server handles a
  frame from it (`after_frame`), and then every pending task of its role at once, no window.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from node.protocol import messages as m
from node.protocol.messages import Role

__all__ = [
    "Assignment",
    "NodeState",
    "Policy",
    "Scheduler",
    "SchedulerStats",
    "TaskEntry",
    "role_of",
]

# Upstream's routing table (the master's, by task type); every other task is a Worker's.
_ROLE_OF_TASK: Final[dict[type, Role]] = {
    m.DiskWrite: Role.Disk,
    m.DiskRead: Role.Disk,
    m.GetStorage: Role.Disk,
    m.Tcp: Role.Internet,
    m.Udp: Role.Internet,
}


def role_of(task: m.Task) -> Role:
    """The role of the nodes that may run `task`."""
    return _ROLE_OF_TASK.get(type(task), Role.Worker)


class Policy(enum.Enum):
    """When the master hands a node work (see the module docstring)."""

    FIFO = "fifo"
    UPSTREAM = "upstream"


class TaskEntry:
    """A task the master holds: waiting in its role's queue (`node` None) or active on `node`.

    `id_json` and `task_json` are the id and task already in their wire form, so handing the task
    out, answering `TaskAccepted` and journaling it never encode them again.
    """

    __slots__ = ("id", "id_json", "node", "role", "task_json")

    def __init__(self, ident: str, id_json: bytes, task_json: bytes, role: Role) -> None:
        self.id = ident
        self.id_json = id_json
        self.task_json = task_json
        self.role = role
        self.node: NodeState | None = None

    def __repr__(self) -> str:
        where = "pending" if self.node is None else f"active on {self.node.key}"
        return f"TaskEntry({self.id!r}, {self.role.value}, {where})"


class NodeState:
    """One node connection as the scheduler sees it; `key` is its address, for logs."""

    __slots__ = ("active", "eligible", "gone", "key", "last_seen", "role")

    def __init__(self, key: str, now: float) -> None:
        self.key = key
        # Upstream treats a node that never sends RegisterRole as a Worker.
        self.role = Role.Worker
        # Tasks go only to a connection that has sent its first Heartbeat (as upstream).
        self.eligible = False
        self.last_seen = now
        # Insertion order is assignment order, so a re-queue keeps the tasks' relative order.
        self.active: dict[str, TaskEntry] = {}
        self.gone = False

    def __repr__(self) -> str:
        return f"NodeState({self.key!r}, {self.role.value}, active={len(self.active)})"


Assignment = tuple[NodeState, TaskEntry]


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    pending: int
    active: int
    completed: int
    nodes: int
    eligible_nodes: int


class Scheduler:
    """Pending queues, nodes and their in-flight tasks, and the results; see the module docstring.

    The caller owns time: `now` arguments are monotonic seconds (node liveness), `at` arguments
    wall-clock seconds (result age, which must survive a restart).
    """

    def __init__(self, *, policy: Policy = Policy.FIFO, window: int = 1024) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.policy = policy
        self.window = window
        # Every task that is pending or active, by id. Insertion order is submission order,
        # which is what a snapshot for the journal wants.
        self._tasks: dict[str, TaskEntry] = {}
        self._queues: dict[Role, deque[TaskEntry]] = {role: deque() for role in Role}
        self._pending = 0
        self._active = 0
        # id -> (result JSON, wall-clock completion time); `_expiry` holds (time, id) in
        # completion order, so expiring old results never scans the live ones.
        self._results: dict[str, tuple[bytes, float]] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        self._nodes: dict[NodeState, None] = {}
        # fifo only: eligible nodes with a free slot, per role, in round-robin order.
        self._free: dict[Role, OrderedDict[NodeState, None]] = {
            role: OrderedDict() for role in Role
        }
        # fifo only: roles whose queue or free nodes changed since the last dispatch().
        self._dirty: set[Role] = set()

    # --- tasks -------------------------------------------------------------------------------

    def submit(self, ident: str, id_json: bytes, task_json: bytes, role: Role) -> None:
        """Queue a task at the back of its role's queue.

        A repeated id that is still active keeps running (one execution at a time) and takes the
        new task body should it be re-queued; a repeated id that waits is replaced and moves to
        the back; a repeated id that was completed runs again and its old result is dropped, so
        a client never reads the previous run's result as the answer to its new submission.
        """
        old = self._tasks.get(ident)
        if old is not None and old.node is not None:
            old.task_json = task_json
            old.role = role
            return
        if old is not None:
            self._pending -= 1  # the old entry stays in its deque and is skipped there
            del self._tasks[ident]
        self._drop_result(ident)
        entry = TaskEntry(ident, id_json, task_json, role)
        self._tasks[ident] = entry
        self._queues[role].append(entry)
        self._pending += 1
        self._dirty.add(role)

    def complete(self, ident: str, result_json: bytes, at: float) -> NodeState | None:
        """Record the result for `ident` (any id; a repeat overwrites).

        When the task is active on a node, it completes there and frees that node's slot; the
        node is returned. A waiting task with that id is completed without running.
        """
        entry = self._tasks.pop(ident, None)
        node = None
        if entry is not None:
            node = entry.node
            if node is None:
                self._pending -= 1
            else:
                del node.active[ident]
                self._active -= 1
                entry.node = None
                self._slot_freed(node)
        self._drop_result(ident)
        self._results[ident] = (result_json, at)
        self._expiry.append((at, ident))
        return node

    def result(self, ident: str) -> bytes | None:
        """The result JSON of `ident`, or None while it is pending, active or unknown."""
        found = self._results.get(ident)
        return None if found is None else found[0]

    def expire_results(self, cutoff: float) -> int:
        """Forget results completed at or before wall-clock `cutoff`; return how many."""
        expiry = self._expiry
        results = self._results
        dropped = 0
        while expiry and expiry[0][0] <= cutoff:
            at, ident = expiry.popleft()
            found = results.get(ident)
            # A result overwritten later has a newer entry further back in `_expiry`.
            if found is not None and found[1] == at:
                del results[ident]
                dropped += 1
        return dropped

    def _drop_result(self, ident: str) -> None:
        # Its `_expiry` entry stays behind; expire_results() recognises it as stale.
        self._results.pop(ident, None)

    # --- nodes -------------------------------------------------------------------------------

    def add_node(self, key: str, now: float) -> NodeState:
        node = NodeState(key, now)
        self._nodes[node] = None
        return node

    def set_role(self, node: NodeState, role: Role) -> None:
        """`RegisterRole`: from now on the node receives tasks of `role` only."""
        if node.role is role or node.gone:
            return
        self._free[node.role].pop(node, None)
        node.role = role
        self._slot_freed(node)

    def heartbeat(self, node: NodeState) -> bool:
        """A `Heartbeat` from `node`; True when it was its first (the node is now eligible)."""
        if node.eligible or node.gone:
            return False
        node.eligible = True
        self._slot_freed(node)
        return True

    def remove_node(self, node: NodeState) -> list[TaskEntry]:
        """Forget `node` (evicted, closed or `Disconnect`); its active tasks go back to the front
        of their queues, in the order they were assigned. Returns them."""
        if node.gone:
            return []
        node.gone = True
        del self._nodes[node]
        self._free[node.role].pop(node, None)
        requeued = list(node.active.values())
        node.active.clear()
        for entry in reversed(requeued):
            entry.node = None
            self._queues[entry.role].appendleft(entry)
            self._dirty.add(entry.role)
        self._active -= len(requeued)
        self._pending += len(requeued)
        return requeued

    def silent_nodes(self, cutoff: float) -> list[NodeState]:
        """Nodes last heard from before monotonic `cutoff` (a scan of nodes, never of tasks)."""
        return [node for node in self._nodes if node.last_seen < cutoff]

    def _slot_freed(self, node: NodeState) -> None:
        if (
            self.policy is Policy.FIFO
            and node.eligible
            and not node.gone
            and len(node.active) < self.window
        ):
            free = self._free[node.role]
            if node not in free:
                free[node] = None
            self._dirty.add(node.role)

    # --- assignment --------------------------------------------------------------------------

    def dispatch(self) -> list[Assignment]:
        """fifo: hand waiting tasks to free nodes of their role, round robin, in queue order.

        Only roles that changed since the last call are looked at, so calling this after every
        batch of events costs nothing when nothing can move. `upstream`: always empty.
        """
        out: list[Assignment] = []
        if self.policy is not Policy.FIFO:
            return out
        window = self.window
        for role in self._dirty:
            free = self._free[role]
            while free:
                entry = self._next_pending(role)
                if entry is None:
                    break
                node = next(iter(free))
                self._assign(node, entry)
                if len(node.active) >= window:
                    del free[node]
                else:
                    free.move_to_end(node)
                out.append((node, entry))
        self._dirty.clear()
        return out

    def after_frame(self, node: NodeState) -> list[Assignment]:
        """The server handled a frame from `node`.

        `upstream`: an eligible node gets every waiting task of its role, at once.
        fifo: the node's slots were already refilled as they freed up; nothing to add here.
        """
        out: list[Assignment] = []
        if self.policy is not Policy.UPSTREAM or not node.eligible or node.gone:
            return out
        role = node.role
        while (entry := self._next_pending(role)) is not None:
            self._assign(node, entry)
            out.append((node, entry))
        return out

    def _next_pending(self, role: Role) -> TaskEntry | None:
        queue = self._queues[role]
        tasks = self._tasks
        while queue:
            entry = queue.popleft()
            # Completed or replaced while it waited: the dict no longer holds this object.
            if tasks.get(entry.id) is entry and entry.node is None:
                return entry
        return None

    def _assign(self, node: NodeState, entry: TaskEntry) -> None:
        entry.node = node
        node.active[entry.id] = entry
        self._pending -= 1
        self._active += 1

    # --- inspection --------------------------------------------------------------------------

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            pending=self._pending,
            active=self._active,
            completed=len(self._results),
            nodes=len(self._nodes),
            eligible_nodes=sum(1 for node in self._nodes if node.eligible),
        )

    def live_records(self) -> int:
        """How many journal records a compacted journal would hold."""
        return len(self._tasks) + len(self._results)

    def snapshot(self) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, bytes, float]]]:
        """The state a restart must restore, as references (cheap; formatting happens elsewhere):
        every pending or active task as (id JSON, task JSON) in submission order, and every
        result as (id, result JSON, completion time)."""
        tasks = [(entry.id_json, entry.task_json) for entry in self._tasks.values()]
        results = [(ident, result, at) for ident, (result, at) in self._results.items()]
        return tasks, results
