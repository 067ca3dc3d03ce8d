"""Typed records for every CPCluster message, task and result variant.

One frozen, slotted dataclass per upstream variant, named as the upstream Rust enums name them
(`cpcluster_common::{NodeMessage, Task, TaskResult}`), so that this file reads beside the
upstream source. The records carry no behaviour; `codec.py` turns them into bytes and back.

Byte fields (`data`) are always `bytes`; the wire form (a JSON array of integers) is the codec's
business. Unit variants (`Heartbeat`, `GetGlobalRam`, ...) are dataclasses without fields, and
each has one shared instance (`HEARTBEAT`, ...) for callers that do not want to allocate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Role(enum.StrEnum):
    """A node's role; the master routes tasks by it (see node/master/scheduler.py)."""

    Worker = "Worker"
    Disk = "Disk"
    Internet = "Internet"


# ---------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True, slots=True)
class Compute:
    expression: str


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str


@dataclass(frozen=True, slots=True)
class Tcp:
    addr: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Udp:
    addr: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ComplexMath:
    expression: str


@dataclass(frozen=True, slots=True)
class StoreData:
    key: str
    data: bytes


@dataclass(frozen=True, slots=True)
class RetrieveData:
    key: str


@dataclass(frozen=True, slots=True)
class DiskWrite:
    path: str
    data: bytes


@dataclass(frozen=True, slots=True)
class DiskRead:
    path: str


@dataclass(frozen=True, slots=True)
class GetGlobalRam:
    pass


@dataclass(frozen=True, slots=True)
class GetStorage:
    pass


Task = (
    Compute
    | HttpRequest
    | Tcp
    | Udp
    | ComplexMath
    | StoreData
    | RetrieveData
    | DiskWrite
    | DiskRead
    | GetGlobalRam
    | GetStorage
)

# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Number:
    value: float


@dataclass(frozen=True, slots=True)
class Response:
    text: str


@dataclass(frozen=True, slots=True)
class Bytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class Stored:
    pass


@dataclass(frozen=True, slots=True)
class Written:
    pass


@dataclass(frozen=True, slots=True)
class Error:
    message: str


Result = Number | Response | Bytes | Stored | Written | Error

# ---------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class RegisterRole:
    role: Role


@dataclass(frozen=True, slots=True)
class RequestConnection:
    addr: str


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    addr: str
    port: int


@dataclass(frozen=True, slots=True)
class GetConnectedNodes:
    pass


@dataclass(frozen=True, slots=True)
class ConnectedNodes:
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SubmitTask:
    id: str
    task: Task


@dataclass(frozen=True, slots=True)
class GetTaskResult:
    id: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


@dataclass(frozen=True, slots=True)
class Heartbeat:
    pass


@dataclass(frozen=True, slots=True)
class HeartbeatAck:
    pass


@dataclass(frozen=True, slots=True)
class AssignTask:
    id: str
    task: Task


@dataclass(frozen=True, slots=True)
class TaskResult:
    id: str
    result: Result


@dataclass(frozen=True, slots=True)
class TaskAccepted:
    id: str


@dataclass(frozen=True, slots=True)
class DirectMessage:
    text: str


Message = (
    RegisterRole
    | RequestConnection
    | ConnectionInfo
    | GetConnectedNodes
    | ConnectedNodes
    | SubmitTask
    | GetTaskResult
    | Disconnect
    | Heartbeat
    | HeartbeatAck
    | AssignTask
    | TaskResult
    | TaskAccepted
    | DirectMessage
)

HEARTBEAT: Final = Heartbeat()
HEARTBEAT_ACK: Final = HeartbeatAck()
GET_CONNECTED_NODES: Final = GetConnectedNodes()
DISCONNECT: Final = Disconnect()
GET_GLOBAL_RAM: Final = GetGlobalRam()
GET_STORAGE: Final = GetStorage()
STORED: Final = Stored()
WRITTEN: Final = Written()
