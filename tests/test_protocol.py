"""The codec against the frames captured from the upstream master and node, plus bad input."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import protocol as p
from node.protocol import codec
from node.protocol.errors import RemoteProtocolError
from workers.storage import decode_blob_task

DATA = Path(__file__).parent / "data"
FRAMES = [orjson.loads(line) for line in (DATA / "frames.jsonl").read_text().splitlines() if line]


def frames_of(direction: str) -> list[bytes]:
    return [f["frame"].encode() for f in FRAMES if f["direction"] == direction]


# Every from_node frame, as the message upstream encoded (built by hand, not by decoding).
FROM_NODE_MESSAGES: list[p.Message] = [
    p.RegisterRole(p.Role.Worker),
    p.RegisterRole(p.Role.Disk),
    p.RegisterRole(p.Role.Internet),
    p.GetConnectedNodes(),
    p.Heartbeat(),
    p.Disconnect(),
    p.RequestConnection("127.0.0.1:44204"),
    p.SubmitTask("t-compute", p.Compute("1+2")),
    p.GetTaskResult("t-compute"),
    p.TaskResult("r-compute", p.Number(3.0)),
    p.TaskResult("r-compute-frac", p.Number(1 / 3)),
    p.TaskResult("r-compute-neg", p.Number(-1.0)),
    p.TaskResult("r-compute-fn", p.Number(4.0)),
    p.TaskResult(
        "r-compute-err", p.Error("Parse error: Missing argument at the end of expression.")
    ),
    p.TaskResult("r-compute-var", p.Error("Evaluation error: unknown variable `x`.")),
    p.TaskResult("r-compute-badfn", p.Error("Evaluation error: function `foo`: Unknown function")),
    p.TaskResult("r-http", p.Response("hello\n")),
    p.TaskResult("r-tcp", p.Bytes(b"echo:hi")),
    p.TaskResult("r-udp", p.Bytes(b"u:\x00\xff")),
    p.TaskResult("r-complex", p.Response("5+5i")),
    p.TaskResult("r-complex-div", p.Response("0.5-1i")),
    p.TaskResult("r-store", p.Stored()),
    p.TaskResult("r-retrieve", p.Bytes(b"\x01\x02\x03")),
    p.TaskResult("r-retrieve-missing", p.Error("Key not found")),
    p.TaskResult("r-ram", p.Response("k1: 3 bytes\n")),
    p.TaskResult("r-diskwrite", p.Written()),
    p.TaskResult("r-diskwrite-escape", p.Error("Invalid path")),
    p.TaskResult("r-diskread", p.Bytes(b"hi")),
    p.TaskResult("r-storage", p.Response("free: 1073741824 bytes\nNo entries found\n")),
]


def test_vectors_cover_every_captured_frame() -> None:
    assert len(frames_of("to_node")) == 18
    assert len(FROM_NODE_MESSAGES) == len(frames_of("from_node")) == 29
    assert len(frames_of("rejected_by_master")) == 9


@pytest.mark.parametrize("payload", frames_of("to_node"), ids=lambda b: b.decode()[:60])
def test_to_node_frames_decode_and_reencode_identically(payload: bytes) -> None:
    message = p.decode(payload)
    assert p.encode_payload(message) == payload
    assert p.encode(message) == len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(
    ("message", "payload"),
    list(zip(FROM_NODE_MESSAGES, frames_of("from_node"), strict=True)),
    ids=lambda v: v.decode()[:60] if isinstance(v, bytes) else None,
)
def test_from_node_frames_are_produced_byte_for_byte(message: p.Message, payload: bytes) -> None:
    assert p.encode_payload(message) == payload
    assert p.decode(payload) == message


def test_to_node_frames_decode_to_the_expected_records() -> None:
    decoded = [p.decode(f) for f in frames_of("to_node")]
    assert decoded[0] == p.HeartbeatAck()
    assert decoded[1] == p.ConnectedNodes(("127.0.0.1:44188",))
    assert decoded[3] == p.ConnectionInfo("127.0.0.1:44204", 55001)
    assert decoded[6] == p.TaskResult("t-compute", p.Number(3.0))
    assert decoded[9] == p.AssignTask("t-tcp", p.Tcp("127.0.0.1:9", b"hi"))
    assert decoded[10] == p.AssignTask("t-udp", p.Udp("127.0.0.1:9", b"\x00\xff"))
    assert decoded[16] == p.AssignTask("t-ram", p.GetGlobalRam())


@pytest.mark.parametrize("payload", frames_of("rejected_by_master"), ids=lambda b: b.decode())
def test_frames_the_master_rejects_are_rejected_by_our_decoder(payload: bytes) -> None:
    with pytest.raises(p.RemoteProtocolError):
        p.decode(payload)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_become_an_error_naming_the_value(value: float) -> None:
    payload = p.encode_payload(p.TaskResult("x", p.Number(value)))
    name = "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    assert payload == (
        b'{"TaskResult":{"id":"x","result":{"Error":"Evaluation error: the result is '
        + name.encode()
        + b', which has no JSON form"}}}'
    )
    assert payload not in frames_of("rejected_by_master")
    assert isinstance(p.decode(payload), p.TaskResult)


@pytest.mark.parametrize(
    "message",
    [
        p.TaskResult("x", p.Number("3")),
        p.TaskResult("x", p.Bytes("aGk=")),
        p.RegisterRole("Worker"),
    ],  # type: ignore[arg-type]
)
def test_encoder_refuses_what_the_wire_cannot_carry(message: p.Message) -> None:
    with pytest.raises(p.LocalProtocolError):
        p.encode(message)


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.0, b"3.0"), (1e21, b"1e21"), (1e-7, b"1e-7"), (1e15, b"1000000000000000.0"),
     (1.2345678901234568e20, b"1.2345678901234568e20"), (-0.0, b"-0.0"), (5e-324, b"5e-324"),
     (0.1 + 0.2, b"0.30000000000000004"), (1e-5, b"0.00001")],
)  # fmt: skip
def test_floats_are_written_as_serde_json_writes_them(value: float, text: bytes) -> None:
    assert codec.format_f64(value) == text
    assert p.encode_payload(p.TaskResult("i", p.Number(value))).endswith(b":" + text + b"}}}")


# ---------------------------------------------------------------------------------- framing


def test_frames_reassemble_in_every_split() -> None:
    payloads = [b'"Heartbeat"', b"", b"x" * 300, b'{"TaskAccepted":"a"}']
    stream = b"".join(p.frame(x) for x in payloads)
    for cut in range(len(stream) + 1):
        decoder = p.FrameDecoder()
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert out == payloads
        assert decoder.pending == 0
    decoder = p.FrameDecoder()
    assert [x for i in range(len(stream)) for x in decoder.feed(stream[i : i + 1])] == payloads


def test_oversized_frame_is_rejected_at_its_prefix_before_any_body() -> None:
    decoder = p.FrameDecoder(max_frame_bytes=10)
    assert decoder.feed((10).to_bytes(4, "big") + b"0123456789") == [b"0123456789"]
    assert decoder.feed(b"\x00\x00") == []
    with pytest.raises(
        p.FrameTooLarge, match=r"frame of 11 bytes announced, above the limit of 10"
    ):
        decoder.feed(b"\x00\x0b")
    assert decoder.pending == 0


def test_huge_announcement_allocates_nothing() -> None:
    decoder = p.FrameDecoder()
    with pytest.raises(p.FrameTooLarge) as info:
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)
    assert info.value.length == 0xFFFFFFFF
    assert info.value.limit == p.DEFAULT_MAX_FRAME_BYTES == 1 << 30
    assert decoder.pending == 0


def test_partial_body_is_buffered_only_as_it_arrives() -> None:
    decoder = p.FrameDecoder()
    assert decoder.feed((1 << 20).to_bytes(4, "big") + b"a" * 10) == []
    assert decoder.expecting == 1 << 20
    assert decoder.pending == 10
    assert decoder.received == 14


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"{", "malformed JSON: "),
        (b"\xff", "malformed JSON: "),
        (b"OK", "malformed JSON: "),
        (b"42", "message: expected an object with exactly one variant key, got number 42"),
        (b'"heartbeat"', "message: unknown unit variant 'heartbeat'"),
        (b'{"Foo":1}', "message: unknown variant 'Foo'"),
        (b'{"Heartbeat":null}', "message: expected the unit variant 'Heartbeat' as a plain string"),
        (b'{"A":1,"B":2}', "message: expected an object with exactly one variant key, got object"),
        (b'{"RegisterRole":"worker"}', "RegisterRole: expected one of Worker, Disk, Internet, got string 'worker'"),
        (b'{"TaskResult":{"id":"x"}}', "TaskResult: missing field `result`"),
        (b'{"TaskResult":{"id":7,"result":"Stored"}}', "TaskResult.id: expected a string, got number 7"),
        (b'{"TaskResult":{"id":"x","result":{"Number":"3"}}}', "TaskResult.result.Number: expected a number, got string '3'"),
        (b'{"TaskResult":{"id":"x","result":{"Number":true}}}', "TaskResult.result.Number: expected a number, got true"),
        (b'{"TaskResult":{"id":"x","result":{"Number":null}}}', "TaskResult.result.Number: expected a number, got null"),
        (b'{"TaskResult":{"id":"x","result":{"Bytes":[1,256]}}}', "TaskResult.result.Bytes[1]: expected an integer 0-255, got number 256"),
        (b'{"TaskResult":{"id":"x","result":{"Bytes":[1,-1]}}}', "TaskResult.result.Bytes[1]: expected an integer 0-255, got number -1"),
        (b'{"TaskResult":{"id":"x","result":{"Bytes":[true]}}}', "TaskResult.result.Bytes[0]: expected an integer 0-255, got true"),
        (b'{"TaskResult":{"id":"x","result":{"Bytes":[1.0]}}}', "TaskResult.result.Bytes[0]: expected an integer 0-255, got number 1.0"),
        (b'{"TaskResult":{"id":"x","result":{"Bytes":"aGk="}}}', "TaskResult.result.Bytes: expected an array of integers 0-255, got string 'aGk='"),
        (b'{"TaskResult":{"id":"x","result":"Pending"}}', "TaskResult.result: unknown result variant 'Pending'"),
        (b'{"AssignTask":{"id":"x","task":{"Tcp":{"addr":"h:1","data":[0,1,2,300]}}}}', "AssignTask.task.Tcp.data[3]: expected an integer 0-255, got number 300"),
        (b'{"AssignTask":{"id":"x","task":{"Shell":{"cmd":"rm"}}}}', "AssignTask.task: unknown task variant 'Shell'"),
        (b'{"AssignTask":{"id":"x","task":"Compute"}}', "AssignTask.task: unknown task variant 'Compute'"),
        (b'{"AssignTask":{"id":"x","task":{"Compute":{}}}}', "AssignTask.task.Compute: missing field `expression`"),
        (b'{"AssignTask":{"id":"x","task":{"Compute":{"expression":1}}}}', "AssignTask.task.Compute.expression: expected a string, got number 1"),
        (b'{"ConnectionInfo":["a",70000]}', "ConnectionInfo[1]: expected an integer 0-65535, got number 70000"),
        (b'{"ConnectedNodes":"a"}', "ConnectedNodes: expected an array of addresses, got string 'a'"),
        (b'[' * 2000 + b']' * 2000, "malformed JSON: "),
        (b"1e400", "malformed JSON: "),
    ],
    ids=lambda v: v.decode("utf-8", "replace")[:50] if isinstance(v, bytes) else None,
)  # fmt: skip
def test_bad_payloads_give_one_typed_error_saying_what_and_where(
    payload: bytes, error: str
) -> None:
    with pytest.raises(p.RemoteProtocolError) as info:
        p.decode(payload)
    assert str(info.value).startswith(error)


def test_unknown_struct_fields_are_ignored_like_serde() -> None:
    message = p.decode(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}},"x":1}}')
    assert message == p.AssignTask("a", p.Compute("1"))


# ---------------------------------------------------------------------------------- peek


@pytest.mark.parametrize(
    ("payload", "head"),
    [
        (b'{"AssignTask":{"id":"t-1","task":"GetStorage"}}', ("AssignTask", "t-1")),
        (b'{"AssignTask":{"id":"a\\"b","task":"GetStorage"}}', ("AssignTask", 'a"b')),
        (b'{"TaskResult":{"id":"r","result":"Stored"}}', ("TaskResult", "r")),
        (b'"HeartbeatAck"', ("HeartbeatAck", None)),
        (b'{"ConnectedNodes":[]}', ("ConnectedNodes", None)),
        # Valid JSON that serde would not write: the id is found all the same.
        (b'{"AssignTask":{"task":"GetStorage","id":"late"}}', ("AssignTask", "late")),
        (b' {\n "AssignTask" : { "id" : "sp\\u00e9" } }', ("AssignTask", "sp\u00e9")),
        (b'{"TaskResult":{"result":"Stored","id":"r2"}}', ("TaskResult", "r2")),
        (b'{"AssignTask":{"task":"GetStorage","id":7}}', ("AssignTask", None)),  # no string
        (b'{"AssignTask":{"task":"GetStorage","id":"cut', ("AssignTask", None)),
        (b'{"Other":{"x":1,"id":"x"}}', ("Other", None)),  # no variant that carries an id
    ],
)
def test_peek_reads_variant_and_id_from_the_head(
    payload: bytes, head: tuple[str, str | None]
) -> None:
    assert tuple(p.peek(payload)) == head


@pytest.mark.parametrize(
    ("payload", "ident"),
    [
        (b'{"AssignTask":{"id":"t-1","task":"GetStorage"}}', "t-1"),
        (b'{"AssignTask":{"id":"","task":"GetStorage"}}', ""),
        ('{"AssignTask":{"id":"é€","task":"GetStorage"}}'.encode(), "é€"),
        (b'{"AssignTask":{"id":"a\\"b","task":"GetStorage"}}', None),  # escaped: use peek
        (b'{"AssignTask":{"id":"a\\\\b","task":"GetStorage"}}', None),
        (b'{"AssignTask":{"id":"\xff","task":"GetStorage"}}', None),  # not UTF-8
        (b'{"AssignTask":{"id":"open', None),
        (b'{"AssignTask": {"id":"spaced","task":"GetStorage"}}', None),
        (b'{"TaskResult":{"id":"r","result":"Stored"}}', None),
    ],
)
def test_assign_task_id_reads_only_the_id_as_masters_write_it(
    payload: bytes, ident: str | None
) -> None:
    assert codec.assign_task_id(payload) == ident


def test_peek_does_not_read_a_large_body() -> None:
    payload = (
        b'{"AssignTask":{"id":"big","task":{"StoreData":{"key":"k","data":['
        + b"1," * 10**6
        + b"1]}}}}"
    )
    assert p.peek(payload) == ("AssignTask", "big")


def _big_array(size: int = 200_000) -> bytes:
    return orjson.dumps(list(bytes(range(256)) * (size // 256)))


@pytest.mark.parametrize(
    ("before", "after", "ident"),
    [
        (b'{"AssignTask":{"task":{"Tcp":{"data":', b',"addr":"h:1"}},"id":"last[0]"}}', "last[0]"),
        (b'{ "AssignTask" : { "id" : "a\\"b" , "task" : { "StoreData" : { "key" : "]" , '
         b'"data" : ', b" } } } }", 'a"b'),
        (b'{"TaskResult":{"result":{"Bytes":', b'},"id":"res"}}', "res"),
    ],
)  # fmt: skip
def test_peek_finds_the_id_after_a_big_byte_array_without_parsing_it(
    before: bytes, after: bytes, ident: str
) -> None:
    array = _big_array()
    payload = before + array + after
    assert p.peek(payload).id == ident
    around = codec.around_blob(payload)
    assert around is not None
    assert payload[around[1] : around[2]] == array


_PAD = b" " * 70_000


@pytest.mark.parametrize(
    "payload",
    [
        # The widest pair is in the id, and "data" holds a literal 0: the splice changes the
        # id, and the blob's place holds 0 whatever is spliced in.
        b'{"AssignTask":{"task":{"StoreData":{"key":"k","data":0}},"id":"a[' + _PAD + b']"}}',
        # ... in the address, which the splice would have turned into 127.0.0.1:80.
        b'{"AssignTask":{"task":{"Tcp":{"addr":"127.0.0.1:8[' + b"1," * 40_000
        + b'1]","data":0}},"id":"q"}}',
        # Duplicate keys: the pair spans strings and the id orjson keeps (the last one).
        b'{"AssignTask":{"task":{"StoreData":{"key":"k","data":0}},"id":"x","s":"[' + _PAD
        + b'","id":"y","task":{"RetrieveData":{"key":"z"}},"t":"]"}}',
    ],
    ids=["id", "addr", "duplicate-keys"],
)  # fmt: skip
def test_brackets_in_strings_never_stand_for_the_blob(payload: bytes) -> None:
    # Each made the node answer under another id than orjson reads, or run another task.
    assert codec.around_blob(payload) is None
    many = payload.count(b",") > 10_000  # then not parsed whole either: no id, frame skipped
    assert p.peek(payload).id == (None if many else orjson.loads(payload)["AssignTask"]["id"])
    assert decode_blob_task(payload) is None  # the generic decoder answers it


@pytest.mark.parametrize(
    "make",
    [
        # The widest pair of brackets is in a string: the key looks like an array.
        lambda a: b'{"AssignTask":{"task":{"StoreData":{"data":[1],"key":"' + a + b'"}},"id":"i"}}',
        # Nested arrays are no byte array.
        lambda a: b'{"AssignTask":{"task":{"Tcp":{"addr":"h:1","data":[' + a + b']}},"id":"i"}}',
        # Too many brackets to look at.
        lambda a: b'{"AssignTask":{"task":{"Tcp":{"addr":"' + b"[]" * 100 + b'","data":' + a
        + b'}},"id":"i"}}',
        # Not a blob task: the array is in no place for bytes.
        lambda a: b'{"AssignTask":{"task":{"Compute":{"expression":' + a + b'}},"id":"i"}}',
    ],
    ids=["array-in-a-string", "nested", "many-brackets", "no-blob-task"],
)  # fmt: skip
def test_peek_parses_up_to_10_000_values_when_the_big_array_is_not_the_blob(
    make: Callable[[bytes], bytes],
) -> None:
    below, above = make(_big_array(9_000)), make(_big_array(12_000))
    assert p.peek(below).id == "i"  # parsed whole: a few ms at most, whatever the JSON
    assert p.peek(above).id is None  # the node parses no such frame whole on its event loop


def test_peek_parses_a_task_of_up_to_16_kib_whole_whatever_it_holds() -> None:
    # 10,001 commas in an expression (a Compute the worker answers with an Error): counted as
    # values, they made the frame unreadable, and it went unanswered.
    payload = b'{"AssignTask":{"task":{"Compute":{"expression":"' + b"," * 10_001
    payload += b'"}},"id":"x"}}'
    assert 10_000 < len(payload) <= 16 * 1024
    assert p.peek(payload).id == "x"


def test_peek_parses_a_large_payload_of_few_values_whole() -> None:
    # 800 KB, its id last, no byte array: one long string costs orjson well under a ms.
    payload = b'{"AssignTask":{"task":{"Compute":{"expression":"' + b"1+" * 400_000
    payload += b'1"}},"id":"long"}}'
    assert p.peek(payload).id == "long"


def test_peek_does_not_parse_a_large_frame_of_small_arrays() -> None:
    # Just under the 1 MiB spill threshold, the id after the task: orjson took 100-300 ms
    # over this on the event loop (heartbeats late); now no parse, no id, the frame skipped.
    payload = (
        b'{"AssignTask":{"task":{"Compute":{"expression":"1","x":['
        + b",".join([b"[]"] * 340_000)
        + b']}},"id":"z"}}'
    )
    assert p.peek(payload) == ("AssignTask", None)


@pytest.mark.parametrize(
    ("payload", "ident"),
    [
        (b'{"AssignTask":{"id":"a","id":"b","task":{"Compute":{"expression":"1"}}}}', "a"),
        (b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}},"id":"b"}}', "a"),
        (b'{ "AssignTask" : { "id" : "a\\u0041" , "id" : "b" } }', "aA"),
        (b'{"AssignTask":{"task":{"Compute":{"expression":"1"}},"id":"b"}}', None),
        (b'{ "AssignTask" : { "id" : "a\xff" } }', None),
        (b'"Heartbeat"', None),
    ],
)
def test_head_id_is_the_id_peek_books_a_task_under(payload: bytes, ident: str | None) -> None:
    assert codec.head_id(payload) == ident
    if ident is not None:
        assert p.peek(payload).id == ident


@pytest.mark.parametrize(
    "payload",
    [
        b'{"AssignTask":{"id":"u\xff","task":{"Compute":{"expression":"1"}}}}',
        b'{ "AssignTask" : { "id" : "u\xfe" , "task" : {} } }',
        b'{"AssignTask":{"id":"\\u0041\xff","task":{"Compute":{"expression":"1"}}}}',
    ],
)
def test_an_id_that_is_not_utf8_is_unreadable_not_replaced(payload: bytes) -> None:
    # "replace" made two such ids one (both "u\ufffd"): two frames, one task, one answer.
    with pytest.raises(RemoteProtocolError):
        p.peek(payload)


# ---------------------------------------------------------------------------------- properties

_text = st.text(max_size=20)
_data = st.binary(max_size=40)
_tasks = st.one_of(
    st.builds(p.Compute, _text), st.builds(p.ComplexMath, _text), st.builds(p.HttpRequest, _text),
    st.builds(p.Tcp, _text, _data), st.builds(p.Udp, _text, _data),
    st.builds(p.StoreData, _text, _data), st.builds(p.RetrieveData, _text),
    st.builds(p.DiskWrite, _text, _data), st.builds(p.DiskRead, _text),
    st.just(p.GetGlobalRam()), st.just(p.GetStorage()),
)  # fmt: skip
_results = st.one_of(
    st.builds(p.Number, st.floats(allow_nan=False, allow_infinity=False)),
    st.builds(p.Response, _text), st.builds(p.Bytes, _data), st.builds(p.Error, _text),
    st.just(p.Stored()), st.just(p.Written()),
)  # fmt: skip
_messages = st.one_of(
    st.builds(p.RegisterRole, st.sampled_from(p.Role)), st.builds(p.RequestConnection, _text),
    st.builds(p.ConnectionInfo, _text, st.integers(0, 65535)),
    st.builds(p.ConnectedNodes, st.lists(_text, max_size=4).map(tuple)),
    st.builds(p.SubmitTask, _text, _tasks), st.builds(p.AssignTask, _text, _tasks),
    st.builds(p.TaskResult, _text, _results), st.builds(p.GetTaskResult, _text),
    st.builds(p.TaskAccepted, _text), st.builds(p.DirectMessage, _text),
    st.sampled_from([p.Heartbeat(), p.HeartbeatAck(), p.GetConnectedNodes(), p.Disconnect()]),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_messages)
def test_well_formed_messages_round_trip(message: p.Message) -> None:
    frame_bytes = p.encode(message)
    (payload,) = p.FrameDecoder().feed(frame_bytes)
    assert p.decode(payload) == message
    assert p.peek(payload).variant == type(message).__name__


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_arbitrary_bytes_in_any_split_raise_only_protocol_errors(
    data: bytes, cuts: list[int]
) -> None:
    decoder = p.FrameDecoder(max_frame_bytes=64)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, stop in itertools.pairwise(bounds):
        try:
            payloads = decoder.feed(data[start:stop])
        except p.FrameTooLarge:
            return
        for payload in payloads:
            try:
                p.decode(payload)
                p.peek(payload)
            except p.RemoteProtocolError:
                pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
    | st.sampled_from(["Heartbeat", "Stored", "GetStorage", "Compute", "AssignTask", "Bytes"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["AssignTask", "TaskResult", "id", "task", "result", "Compute", "expression",
                         "Tcp", "addr", "data", "Bytes", "Number", "ConnectionInfo", "RegisterRole"]),
        inner, max_size=3),
    max_leaves=12,
))  # fmt: skip
def test_structured_junk_raises_only_protocol_errors(value: object) -> None:
    with contextlib.suppress(p.RemoteProtocolError):
        p.decode(json.dumps(value).encode())


def test_protocol_package_loads_no_io_modules() -> None:
    code = (
        "import sys, node.protocol as p; "
        "p.decode(p.FrameDecoder().feed(p.encode(p.Heartbeat()))[0]); "
        "bad = sorted({'asyncio', 'socket', 'selectors', 'ssl'} & set(sys.modules)); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "[]"


class ListSpill:
    """A spill that collects the body in a list (the node's writes it to a segment)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> bytes:
        return b"\x00ref:" + str(self.length).encode()


def test_large_bodies_go_to_the_spill_as_they_arrive_in_any_split() -> None:
    spills: list[ListSpill] = []

    def spill(length: int) -> ListSpill:
        spills.append(ListSpill(length))
        return spills[-1]

    big = b"x" * 5000
    stream = p.frame(b"small") + p.frame(big) + p.frame(b"after")
    for cut in (1, 3, 4, 10, 999, 5003, len(stream) - 2):
        spills.clear()
        decoder = p.FrameDecoder(spill=spill, spill_from=1000)
        out = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert out == [b"small", b"\x00ref:5000", b"after"]
        assert len(spills) == 1 and b"".join(spills[0].chunks) == big
        assert decoder.pending == 0


def test_a_declined_spill_keeps_the_body_in_memory() -> None:
    decoder = p.FrameDecoder(spill=lambda length: None, spill_from=10)
    assert decoder.feed(p.frame(b"y" * 50)) == [b"y" * 50]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 100_000])
def test_byte_arrays_are_encoded_alike_on_either_side_of_the_list_limit(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    encoded = codec.encode(p.SubmitTask("x", p.StoreData("k", data)))
    expected = {"SubmitTask": {"id": "x", "task": {"StoreData": {"key": "k", "data": list(data)}}}}
    assert encoded[4:] == orjson.dumps(expected)


def test_a_blob_of_136_mib_is_encoded_without_crashing_the_process() -> None:
    # orjson.dumps(list(data)) killed the process with SIGSEGV from about 130 MiB (orjson
    # 3.13): `cpnode-submit store` of a big file, or the local master relaying it, died.
    script = (
        "from node.protocol import codec, messages as m\n"
        "frame = codec.encode(m.SubmitTask('x', m.StoreData('k', bytes(136 << 20))))\n"
        "assert frame.endswith(b',0]}}}}') and len(frame) > 2 * (136 << 20)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
