"""JSON payloads ⇄ typed messages, byte-exact with the upstream (serde_json) encoding.

    payload ──decode()──▶ Message          Message ──encode()──▶ frame (prefix + payload)
    payload ──peek()────▶ Head(variant, id), without decoding the rest

serde's externally tagged enums: a unit variant is a string (``"Heartbeat"``), a newtype variant
an object with one key (``{"RegisterRole":"Worker"}``), a tuple variant an array
(``{"ConnectionInfo":["127.0.0.1:1",55001]}``), a struct variant an object whose fields keep
their declaration order (``{"AssignTask":{"id":..,"task":..}}``). `bytes` are integer arrays.

Decoding is strict like serde (wrong types, unknown variants, missing fields, bytes outside
0-255, non-finite numbers are errors) but, like serde without ``deny_unknown_fields``, extra
fields in a struct are ignored. Every failure is a `RemoteProtocolError` naming the place:
``AssignTask.task.Tcp.data[3]: expected an integer 0-255, got 256``.

Encoding never produces a frame the upstream master rejects: a non-finite `Number` is sent as
an `Error` naming the value, floats are written as serde_json writes them (ryu: ``3.0``,
``1e21``), and byte fields must be `bytes`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Final, NamedTuple, Protocol

import orjson

from node.protocol import messages as m
from node.protocol.errors import LocalProtocolError, RemoteProtocolError
from node.protocol.framing import frame
from shm import native

_dumps = orjson.dumps
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError

# --------------------------------------------------------------------------------------- helpers


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:37] + "..."
        return f"string {text!r}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, list):
        return f"array of {len(value)}"
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:4])
        return f"object {{{keys}}}"
    return type(value).__name__


def _fail(path: str, expected: str, value: object) -> RemoteProtocolError:
    where = path or "message"
    return RemoteProtocolError(f"{where}: expected {expected}, got {_describe(value)}")


def _str(value: object, path: str) -> str:
    if type(value) is not str:
        raise _fail(path, "a string", value)
    return value


def _f64(value: object, path: str) -> float:
    kind = type(value)
    if kind is float:
        return value  # type: ignore[return-value]  # orjson never yields NaN or inf
    if kind is int:
        return float(value)  # type: ignore[arg-type]
    raise _fail(path, "a number", value)


def _u16(value: object, path: str) -> int:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        raise _fail(path, "an integer 0-65535", value)
    return value


def _bytes(value: object, path: str) -> bytes:
    if type(value) is not list:
        raise _fail(path, "an array of integers 0-255", value)
    # C-level scans: one pass for the element types, one in bytes() for the range.
    if set(map(type, value)) <= {int}:
        try:
            return bytes(value)
        except ValueError:
            pass
    for index, item in enumerate(value):
        if type(item) is not int or not 0 <= item <= 255:
            raise _fail(f"{path}[{index}]", "an integer 0-255", item)
    raise AssertionError("unreachable: bytes() rejected a valid array")  # pragma: no cover


def _fields(value: object, path: str, names: tuple[str, ...]) -> tuple[Any, ...]:
    if type(value) is not dict:
        raise _fail(path, "an object with fields " + ", ".join(names), value)
    try:
        return tuple(value[name] for name in names)
    except KeyError as exc:
        raise RemoteProtocolError(f"{path}: missing field `{exc.args[0]}`") from None


def _variant(value: object, path: str) -> tuple[str, object]:
    if type(value) is not dict or len(value) != 1:
        raise _fail(path, "an object with exactly one variant key", value)
    ((name, inner),) = value.items()
    return name, inner


# --------------------------------------------------------------------------------------- tasks

_UNIT_TASKS: Final[dict[str, m.Task]] = {
    "GetGlobalRam": m.GET_GLOBAL_RAM,
    "GetStorage": m.GET_STORAGE,
}


def _task_compute(v: object, p: str) -> m.Task:
    (expression,) = _fields(v, p, ("expression",))
    return m.Compute(_str(expression, p + ".expression"))


def _task_complex(v: object, p: str) -> m.Task:
    (expression,) = _fields(v, p, ("expression",))
    return m.ComplexMath(_str(expression, p + ".expression"))


def _task_http(v: object, p: str) -> m.Task:
    (url,) = _fields(v, p, ("url",))
    return m.HttpRequest(_str(url, p + ".url"))


def _task_tcp(v: object, p: str) -> m.Task:
    addr, data = _fields(v, p, ("addr", "data"))
    return m.Tcp(_str(addr, p + ".addr"), _bytes(data, p + ".data"))


def _task_udp(v: object, p: str) -> m.Task:
    addr, data = _fields(v, p, ("addr", "data"))
    return m.Udp(_str(addr, p + ".addr"), _bytes(data, p + ".data"))


def _task_store(v: object, p: str) -> m.Task:
    key, data = _fields(v, p, ("key", "data"))
    return m.StoreData(_str(key, p + ".key"), _bytes(data, p + ".data"))


def _task_retrieve(v: object, p: str) -> m.Task:
    (key,) = _fields(v, p, ("key",))
    return m.RetrieveData(_str(key, p + ".key"))


def _task_disk_write(v: object, p: str) -> m.Task:
    path, data = _fields(v, p, ("path", "data"))
    return m.DiskWrite(_str(path, p + ".path"), _bytes(data, p + ".data"))


def _task_disk_read(v: object, p: str) -> m.Task:
    (path,) = _fields(v, p, ("path",))
    return m.DiskRead(_str(path, p + ".path"))


_TASK_PARSERS: Final[dict[str, Callable[[object, str], m.Task]]] = {
    "Compute": _task_compute,
    "HttpRequest": _task_http,
    "Tcp": _task_tcp,
    "Udp": _task_udp,
    "ComplexMath": _task_complex,
    "StoreData": _task_store,
    "RetrieveData": _task_retrieve,
    "DiskWrite": _task_disk_write,
    "DiskRead": _task_disk_read,
}


def task_from_json(value: object, path: str = "task") -> m.Task:
    """Build a task from its parsed JSON form (as in `SubmitTask`/`AssignTask` or a batch file)."""
    if type(value) is str:
        task = _UNIT_TASKS.get(value)
        if task is None:
            raise RemoteProtocolError(f"{path}: unknown task variant {value!r}")
        return task
    name, inner = _variant(value, path)
    parser = _TASK_PARSERS.get(name)
    if parser is None:
        if name in _UNIT_TASKS:
            raise _fail(f"{path}", f"the unit variant {name!r} as a plain string", value)
        raise RemoteProtocolError(f"{path}: unknown task variant {name!r}")
    return parser(inner, f"{path}.{name}")


# --------------------------------------------------------------------------------------- results

_UNIT_RESULTS: Final[dict[str, m.Result]] = {"Stored": m.STORED, "Written": m.WRITTEN}


def result_from_json(value: object, path: str = "result") -> m.Result:
    if type(value) is str:
        result = _UNIT_RESULTS.get(value)
        if result is None:
            raise RemoteProtocolError(f"{path}: unknown result variant {value!r}")
        return result
    name, inner = _variant(value, path)
    sub = f"{path}.{name}"
    if name == "Number":
        return m.Number(_f64(inner, sub))
    if name == "Response":
        return m.Response(_str(inner, sub))
    if name == "Bytes":
        return m.Bytes(_bytes(inner, sub))
    if name == "Error":
        return m.Error(_str(inner, sub))
    raise RemoteProtocolError(f"{path}: unknown result variant {name!r}")


# --------------------------------------------------------------------------------------- messages

_UNIT_MESSAGES: Final[dict[str, m.Message]] = {
    "GetConnectedNodes": m.GET_CONNECTED_NODES,
    "Disconnect": m.DISCONNECT,
    "Heartbeat": m.HEARTBEAT,
    "HeartbeatAck": m.HEARTBEAT_ACK,
}
_ROLES: Final = {role.value: role for role in m.Role}


def _msg_register(v: object) -> m.Message:
    role = _ROLES.get(v) if type(v) is str else None
    if role is None:
        raise _fail("RegisterRole", "one of Worker, Disk, Internet", v)
    return m.RegisterRole(role)


def _msg_connection_info(v: object) -> m.Message:
    if type(v) is not list or len(v) != 2:
        raise _fail("ConnectionInfo", "an array [addr, port]", v)
    return m.ConnectionInfo(_str(v[0], "ConnectionInfo[0]"), _u16(v[1], "ConnectionInfo[1]"))


def _msg_connected_nodes(v: object) -> m.Message:
    if type(v) is not list:
        raise _fail("ConnectedNodes", "an array of addresses", v)
    return m.ConnectedNodes(tuple(_str(a, f"ConnectedNodes[{i}]") for i, a in enumerate(v)))


def _msg_assign(v: object) -> m.Message:
    ident, task = _fields(v, "AssignTask", ("id", "task"))
    return m.AssignTask(_str(ident, "AssignTask.id"), task_from_json(task, "AssignTask.task"))


def _msg_submit(v: object) -> m.Message:
    ident, task = _fields(v, "SubmitTask", ("id", "task"))
    return m.SubmitTask(_str(ident, "SubmitTask.id"), task_from_json(task, "SubmitTask.task"))


def _msg_result(v: object) -> m.Message:
    ident, result = _fields(v, "TaskResult", ("id", "result"))
    return m.TaskResult(_str(ident, "TaskResult.id"), result_from_json(result, "TaskResult.result"))


_MESSAGE_PARSERS: Final[dict[str, Callable[[object], m.Message]]] = {
    "RegisterRole": _msg_register,
    "RequestConnection": lambda v: m.RequestConnection(_str(v, "RequestConnection")),
    "ConnectionInfo": _msg_connection_info,
    "ConnectedNodes": _msg_connected_nodes,
    "SubmitTask": _msg_submit,
    "GetTaskResult": lambda v: m.GetTaskResult(_str(v, "GetTaskResult")),
    "AssignTask": _msg_assign,
    "TaskResult": _msg_result,
    "TaskAccepted": lambda v: m.TaskAccepted(_str(v, "TaskAccepted")),
    "DirectMessage": lambda v: m.DirectMessage(_str(v, "DirectMessage")),
}


def message_from_json(value: object) -> m.Message:
    """Build a message from its parsed JSON form."""
    if type(value) is str:
        message = _UNIT_MESSAGES.get(value)
        if message is None:
            raise RemoteProtocolError(f"message: unknown unit variant {value!r}")
        return message
    name, inner = _variant(value, "message")
    parser = _MESSAGE_PARSERS.get(name)
    if parser is None:
        if name in _UNIT_MESSAGES:
            raise _fail("message", f"the unit variant {name!r} as a plain string", value)
        raise RemoteProtocolError(f"message: unknown variant {name!r}")
    return parser(inner)


def loads(payload: bytes | bytearray | memoryview | str) -> object:
    """Parse JSON text; any failure is a `RemoteProtocolError`."""
    try:
        return _loads(payload)
    except _JSONDecodeError as exc:
        raise RemoteProtocolError(f"malformed JSON: {exc}") from None


def decode(payload: bytes | bytearray | memoryview) -> m.Message:
    """Decode one frame payload into a message; raises only `RemoteProtocolError`."""
    try:
        return message_from_json(loads(payload))
    except RemoteProtocolError:
        raise
    except RecursionError:  # pragma: no cover - orjson caps nesting itself
        raise RemoteProtocolError("message: nested too deeply") from None


# --------------------------------------------------------------------------------------- peek


class Head(NamedTuple):
    """The variant of a payload and, for id-carrying variants, its id (None otherwise)."""

    variant: str
    id: str | None


_HEAD_WINDOW: Final = 4096
# One match is cheaper than the handful of bytes methods that would do the same.
_ASSIGN_ID: Final = re.compile(rb'\{"AssignTask":\{"id":"([^"\\]*+)"').match
_ID_HEAD = re.compile(rb'\s*\{\s*"([A-Za-z]+)"\s*:\s*\{\s*"id"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ANY_HEAD = re.compile(rb'\s*(?:"([A-Za-z]+)"|\{\s*"([A-Za-z]+)")')


def assign_task_id(payload: bytes) -> str | None:
    """The id of an `AssignTask` payload as every CPCluster master writes it (``{"AssignTask":
    {"id":"...``), or None for any other payload or an escaped id (then use `peek`)."""
    match = _ASSIGN_ID(payload)
    if match is None:
        return None
    try:
        return match[1].decode()
    except UnicodeDecodeError:
        return None


def python_assign_task_ids(payloads: list[bytes]) -> list[str | None]:
    """`assign_task_id` of each payload: the reference of the compiled `assign_task_ids`."""
    return [assign_task_id(payload) for payload in payloads]


_speedups = native.load("node.protocol._speedups")
assign_task_ids: Callable[[list[bytes]], list[str | None]] = (
    python_assign_task_ids if _speedups is None else _speedups.assign_task_ids
)
"""`assign_task_id` of each payload, in C where `_speedups` was built."""


def peek_id(payload: bytes) -> str | None:
    """`peek`'s id, or None also when even the head is unreadable."""
    try:
        return peek(payload).id
    except RemoteProtocolError:
        return None


def peek(payload: bytes) -> Head:
    """Variant and id of a payload for routing: from its first bytes when it is in the form
    serde writes; else (the id after the task, ...) by parsing a payload of up to 1 MiB and
    `_PARSE_ELEMENTS_AT_MOST` values whole, or around its byte array, never decoding that array
    (neither: no id, and the frame is skipped; no frame costs the event loop more than a few ms).

    Routing only: the full decode still validates. Raises `RemoteProtocolError` when even
    the head is unreadable, or the id in it is not UTF-8 (no master could have meant it).
    """
    ident = assign_task_id(payload)
    if ident is not None:  # the common frame: no regex, no JSON
        return Head("AssignTask", ident)
    head = payload[:_HEAD_WINDOW]
    match = _ID_HEAD.match(head)
    if match is not None:
        return Head(match.group(1).decode("ascii"), _head_id_text(match.group(2)))
    match = _ANY_HEAD.match(head)
    if match is None:
        raise RemoteProtocolError("message: no variant name at the start of the payload")
    name = (match.group(1) or match.group(2)).decode("ascii")
    if match.group(2) is not None and name in _ID_VARIANTS:
        # Valid JSON in another form than serde writes ("id" after "task", spaces, ...): the
        # id is looked up in the parsed payload, or around a big byte array.
        return Head(name, _id_anywhere(payload, name))
    return Head(name, None)


def head_id(payload: bytes) -> str | None:
    """The id at the head of a payload, where `peek` reads it first (the first ``"id"`` of
    the variant's object, in the form serde writes or with spaces), or None when the head
    shows none. A worker answers under this id: the one the node booked the task under, also
    when a later duplicate key says otherwise (the JSON parser keeps the last)."""
    ident = assign_task_id(payload)
    if ident is not None:
        return ident
    match = _ID_HEAD.match(payload[:_HEAD_WINDOW])
    if match is None:
        return None
    try:
        return _head_id_text(match.group(2))
    except RemoteProtocolError:
        return None


def _head_id_text(raw: bytes) -> str:
    if b"\\" in raw:
        return str(loads(b'"' + raw + b'"'))  # a JSON string: always a str
    try:
        return raw.decode()
    except UnicodeDecodeError:
        # Two such ids would both read as U+FFFD and be taken for one task.
        raise RemoteProtocolError("message: the id is not valid UTF-8") from None


_ID_VARIANTS: Final = frozenset({"AssignTask", "SubmitTask", "TaskResult"})
_PARSE_WHOLE_BYTES: Final = 64 * 1024
"""`around_blob` parses at most this much around a byte array."""
_PARSE_AT_MOST_BYTES: Final = 1 << 20
_PARSE_ELEMENTS_AT_MOST: Final = 10_000
_PARSE_ANY_BYTES: Final = 16 * 1024
"""`peek` parses a payload whose id is not at its head whole when it is at most
`_PARSE_ANY_BYTES` long (whatever it holds: a few ms for the worst JSON, and any task but a
blob fits, an expression being at most 10,000 bytes), or at most `_PARSE_AT_MOST_BYTES` long
with at most `_PARSE_ELEMENTS_AT_MOST` JSON values (counted as its commas and opening brackets,
those in strings too): about 2 ms of orjson's time for the worst JSON of that size, where a MiB
of ``[[],[],...]`` took 100-300 ms. Any other payload only around its byte array."""
_MAX_BRACKETS: Final = 64
"""`around_blob` gives up on a payload with more brackets than this (of each kind)."""


class Searchable(Protocol):
    """Bytes, or a read-only `mmap` of a payload in a segment."""

    def find(self, sub: bytes, start: int = ..., /) -> int: ...
    def __getitem__(self, index: slice, /) -> bytes: ...
    def __len__(self) -> int: ...


def _id_anywhere(payload: bytes, name: str) -> str | None:
    if len(payload) <= _PARSE_AT_MOST_BYTES and not costly_to_parse(payload):
        try:
            value = _loads(payload)
        except _JSONDecodeError:
            return None
        return _id_in(value, name)
    return id_around_byte_array(payload, name)


def costly_to_parse(payload: bytes) -> bool:
    """Whether parsing `payload` whole could hold an event loop for more than a few ms: longer
    than `_PARSE_ANY_BYTES` with more than `_PARSE_ELEMENTS_AT_MOST` JSON values (see `peek`).
    The node skips such a frame where it would decode it on its loop (no message a master or
    peer sends it there is that big)."""
    return len(payload) > _PARSE_ANY_BYTES and _elements(payload) > _PARSE_ELEMENTS_AT_MOST


def _elements(payload: bytes) -> int:
    """At least how many values a JSON text holds beyond its first (strings may hold commas
    too: a count errs high, never low), at C speed."""
    return payload.count(b",") + payload.count(b"[") + payload.count(b"{")


def id_around_byte_array(payload: Searchable, name: str) -> str | None:
    """The id of a big `name` payload (`AssignTask`, ...) in any JSON form, read around its
    byte array; None when `around_blob` cannot show it."""
    around = around_blob(payload)
    return None if around is None else _id_in(around[0], name)


def _id_in(value: object, name: str) -> str | None:
    body = value.get(name) if type(value) is dict else None
    ident = body.get("id") if type(body) is dict else None
    return ident if type(ident) is str else None


def around_blob(payload: Searchable) -> tuple[Any, int, int] | None:
    """For a payload that is mostly the byte array of a blob task or result (`AssignTask` or
    `SubmitTask` of `StoreData`, `DiskWrite`, `Tcp`, `Udp`; `TaskResult` of `Bytes`) in any
    JSON form: the payload parsed with that array replaced by ``0``, and the array's start and
    end offsets (``payload[start:end]`` runs from ``[`` to ``]``). No JSON parser reads the
    array, and what is around it parses as the whole payload would (duplicate keys included).

    The array is the widest pair of brackets with none between them, found with C-speed
    ``find``. That pair may sit inside strings: the splice counts only when the blob's place
    holds ``0`` with it and ``1`` with ``1`` spliced in instead (a ``0`` written there, the
    pair in a string, would not change). None when there is no such pair, more than
    `_MAX_BRACKETS` brackets of a kind, more than `_PARSE_WHOLE_BYTES` around the array, what
    is around it is no JSON, or the pair is not the blob.
    """
    pair = _widest_flat_brackets(payload)
    if pair is None:
        return None
    start, end = pair
    if len(payload) - (end - start) > _PARSE_WHOLE_BYTES:
        return None
    before, after = payload[:start], payload[end:]
    try:
        value = _loads(before + b"0" + after)
        if _blob_slot(value) != 0 or _blob_slot(_loads(before + b"1" + after)) != 1:
            return None
    except _JSONDecodeError:
        return None
    return value, start, end


def _widest_flat_brackets(payload: Searchable) -> tuple[int, int] | None:
    """(start, end) of the widest ``[``...``]`` with no bracket between them."""
    opens, closes = _offsets(payload, b"["), _offsets(payload, b"]")
    if not opens or not closes:
        return None
    best: tuple[int, int] | None = None
    following = 0  # index in `closes` of the first ']' after the current '['
    for index, start in enumerate(opens):
        while following < len(closes) and closes[following] < start:
            following += 1
        if following == len(closes):
            break
        end = closes[following] + 1
        if index + 1 < len(opens) and opens[index + 1] < end:
            continue  # another '[' before this one closes: not a flat array
        if best is None or end - start > best[1] - best[0]:
            best = (start, end)
    return best


def _blob_slot(value: object) -> int | None:
    """The integer a parsed blob task or result holds where its bytes go, else None."""
    if type(value) is not dict or len(value) != 1:
        return None
    ((name, body),) = value.items()
    if name not in _ID_VARIANTS or type(body) is not dict:
        return None
    inner = body.get("result" if name == "TaskResult" else "task")
    if type(inner) is not dict or len(inner) != 1:
        return None
    ((variant, fields),) = inner.items()
    if name == "TaskResult":
        slot = fields if variant == "Bytes" else None
    else:
        slot = fields.get("data") if variant in _BLOB_VARIANTS and type(fields) is dict else None
    return slot if type(slot) is int else None


_BLOB_VARIANTS: Final = frozenset({"StoreData", "DiskWrite", "Tcp", "Udp"})


def _offsets(payload: Searchable, char: bytes) -> list[int] | None:
    """Offsets of `char` in `payload` (memchr speed); None when there are too many."""
    found: list[int] = []
    position = payload.find(char)
    while position >= 0:
        if len(found) == _MAX_BRACKETS:
            return None
        found.append(position)
        position = payload.find(char, position + 1)
    return found


# --------------------------------------------------------------------------------------- encode


def format_f64(value: float) -> bytes:
    """A finite float as serde_json writes it (ryu): ``3.0``, ``0.1``, ``1e21``, ``1e-7``."""
    text = _dumps(value)
    return text.replace(b"e+", b"e") if b"e+" in text else text


def _enc_bytes(data: bytes, path: str) -> bytes:
    if type(data) is not bytes:
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        else:
            raise LocalProtocolError(f"{path}: expected bytes, got {type(data).__name__}")
    if len(data) <= _LIST_BYTES:
        return _dumps(list(data))
    # The same text from a uint8 array, without a list of Python ints: orjson crashes the
    # process (SIGSEGV, orjson 3.13) on a list of some 130 million of them.
    from shm.bytesjson import encode_byte_array  # here: the codec loads fast without numpy

    return encode_byte_array(data)


_LIST_BYTES: Final = 4096


def _enc_str(text: str, path: str) -> bytes:
    if type(text) is not str:
        raise LocalProtocolError(f"{path}: expected str, got {type(text).__name__}")
    return _dumps(text)


def json_str(text: str) -> bytes:
    """A JSON string literal, escaped exactly as serde_json escapes it."""
    return _enc_str(text, "string")


def task_to_json(task: m.Task) -> bytes:
    """The JSON form of a task."""
    match task:
        case m.Compute(expression):
            return b'{"Compute":{"expression":' + _enc_str(expression, "Compute") + b"}}"
        case m.ComplexMath(expression):
            return b'{"ComplexMath":{"expression":' + _enc_str(expression, "ComplexMath") + b"}}"
        case m.HttpRequest(url):
            return b'{"HttpRequest":{"url":' + _enc_str(url, "HttpRequest.url") + b"}}"
        case m.Tcp(addr, data) | m.Udp(addr, data):
            name = type(task).__name__
            return (
                b'{"' + name.encode() + b'":{"addr":' + _enc_str(addr, name + ".addr")
                + b',"data":' + _enc_bytes(data, name + ".data") + b"}}"
            )  # fmt: skip
        case m.StoreData(key, data):
            return (
                b'{"StoreData":{"key":' + _enc_str(key, "StoreData.key")
                + b',"data":' + _enc_bytes(data, "StoreData.data") + b"}}"
            )  # fmt: skip
        case m.RetrieveData(key):
            return b'{"RetrieveData":{"key":' + _enc_str(key, "RetrieveData.key") + b"}}"
        case m.DiskWrite(path, data):
            return (
                b'{"DiskWrite":{"path":' + _enc_str(path, "DiskWrite.path")
                + b',"data":' + _enc_bytes(data, "DiskWrite.data") + b"}}"
            )  # fmt: skip
        case m.DiskRead(path):
            return b'{"DiskRead":{"path":' + _enc_str(path, "DiskRead.path") + b"}}"
        case m.GetGlobalRam():
            return b'"GetGlobalRam"'
        case m.GetStorage():
            return b'"GetStorage"'
    raise LocalProtocolError(f"not a task: {task!r}")


def non_finite_error(value: float) -> m.Error:
    """The `Error` sent instead of a NaN/infinite `Number` (JSON has no form for it)."""
    name = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return m.Error(f"Evaluation error: the result is {name}, which has no JSON form")


def result_to_json(result: m.Result) -> bytes:
    """The JSON form of a result; a non-finite `Number` becomes an `Error` naming it."""
    match result:
        case m.Number(value):
            if type(value) is not float:
                if type(value) is not int:
                    raise LocalProtocolError(f"Number: expected float, got {type(value).__name__}")
                value = float(value)
            if not math.isfinite(value):
                return result_to_json(non_finite_error(value))
            return b'{"Number":' + format_f64(value) + b"}"
        case m.Response(text):
            return b'{"Response":' + _enc_str(text, "Response") + b"}"
        case m.Error(message):
            return b'{"Error":' + _enc_str(message, "Error") + b"}"
        case m.Bytes(data):
            return b'{"Bytes":' + _enc_bytes(data, "Bytes") + b"}"
        case m.Stored():
            return b'"Stored"'
        case m.Written():
            return b'"Written"'
    raise LocalProtocolError(f"not a result: {result!r}")


def task_result_payload(ident: str, result: m.Result) -> bytes:
    """The payload of ``TaskResult{id, result}`` (the node's hot path)."""
    return (
        b'{"TaskResult":{"id":' + _enc_str(ident, "TaskResult.id")
        + b',"result":' + result_to_json(result) + b"}}"
    )  # fmt: skip


def encode_payload(message: m.Message) -> bytes:
    """The JSON payload of a message (no length prefix)."""
    match message:
        case m.TaskResult(ident, result):
            return task_result_payload(ident, result)
        case m.Heartbeat():
            return b'"Heartbeat"'
        case m.HeartbeatAck():
            return b'"HeartbeatAck"'
        case m.AssignTask(ident, task) | m.SubmitTask(ident, task):
            name = type(message).__name__
            return (
                b'{"' + name.encode() + b'":{"id":' + _enc_str(ident, name + ".id")
                + b',"task":' + task_to_json(task) + b"}}"
            )  # fmt: skip
        case m.GetConnectedNodes():
            return b'"GetConnectedNodes"'
        case m.Disconnect():
            return b'"Disconnect"'
        case m.RegisterRole(role):
            if not isinstance(role, m.Role):
                raise LocalProtocolError(f"RegisterRole: expected a Role, got {role!r}")
            return b'{"RegisterRole":"' + role.value.encode() + b'"}'
        case m.ConnectionInfo(addr, port):
            if type(port) is not int or not 0 <= port <= 0xFFFF:
                raise LocalProtocolError(f"ConnectionInfo.port: expected 0-65535, got {port!r}")
            text = _enc_str(addr, "ConnectionInfo.addr")
            return b'{"ConnectionInfo":[' + text + b"," + str(port).encode() + b"]}"
        case m.ConnectedNodes(addrs):
            items = [_enc_str(a, "ConnectedNodes") for a in addrs]
            return b'{"ConnectedNodes":[' + b",".join(items) + b"]}"
        case m.RequestConnection(addr):
            return b'{"RequestConnection":' + _enc_str(addr, "RequestConnection") + b"}"
        case m.GetTaskResult(ident):
            return b'{"GetTaskResult":' + _enc_str(ident, "GetTaskResult") + b"}"
        case m.TaskAccepted(ident):
            return b'{"TaskAccepted":' + _enc_str(ident, "TaskAccepted") + b"}"
        case m.DirectMessage(text):
            return b'{"DirectMessage":' + _enc_str(text, "DirectMessage") + b"}"
    raise LocalProtocolError(f"not a message: {message!r}")


def encode(message: m.Message) -> bytes:
    """A whole frame for `message`: length prefix + JSON payload."""
    return frame(encode_payload(message))
