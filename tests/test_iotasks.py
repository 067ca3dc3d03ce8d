"""HttpRequest, Tcp and Udp tasks against loopback servers, the network policy, the Internet
role's ports, and a node that keeps heartbeating through 200 slow URLs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from node import iotasks
from node.config import Config
from node.dispatch import Dispatcher
from node.iotasks import IoTaskRunner, NetworkPolicy
from node.master import MasterThread
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import frame
from shm.bytesjson import encode_byte_array
from shm.segments import IncomingSegment
from tests.conftest import LoopbackGuard
from tests.netservers import HttpServer, TcpEcho, UdpEcho, free_port
from tests.nodeproc import NodeProcess
from tests.test_node import run_tasks
from tests.test_result_segments import unconnected_link


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="hello, wörld")


async def _missing(request: web.Request) -> web.Response:
    return web.Response(status=404, text="no such page")


async def _redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ok")


async def _redirect_loop(request: web.Request) -> web.Response:
    raise web.HTTPFound("/loop")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("s", "2")))
    return web.Response(text="late")


async def _big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * 5000)


async def _big_chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for _ in range(5):
        await response.write(b"y" * 1000)
    await response.write_eof()
    return response


async def _latin1(request: web.Request) -> web.Response:
    return web.Response(
        body="café".encode("latin-1"), content_type="text/plain", charset="iso-8859-1"
    )


async def _charset(request: web.Request) -> web.Response:
    """`?charset=NAME&hex=BODY`: that body with that charset in Content-Type."""
    body = bytes.fromhex(request.query["hex"])
    header = f"text/plain; charset={request.query['charset']}"
    return web.Response(body=body, headers={"Content-Type": header})


ROUTES = {
    "/ok": _ok,
    "/missing": _missing,
    "/redirect": _redirect,
    "/loop": _redirect_loop,
    "/slow": _slow,
    "/big": _big,
    "/chunked": _big_chunked,
    "/latin1": _latin1,
    "/charset": _charset,
}


def digest_when_whole(size: int) -> Callable[[bytes], bytes]:
    """A `TcpEcho` reply: nothing until `size` bytes came, then their SHA-256 (hex)."""
    received = bytearray()

    def reply(chunk: bytes) -> bytes:
        received.extend(chunk)
        return hashlib.sha256(received).hexdigest().encode() if len(received) == size else b""

    return reply


def wait_until_idle(http: HttpServer) -> None:
    """The shared server has no request running (earlier tests' handlers may still sleep)."""
    deadline = time.monotonic() + 10
    while http.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.active == 0, "an earlier test's request still runs"


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    with HttpServer(ROUTES) as server:
        yield server


def run(config: Config, tasks: list[m.Task], timeout: float = 30.0) -> list[m.Result]:
    """Run `tasks` on an IoTaskRunner; results in task order."""
    payloads = [codec.encode_payload(m.AssignTask(str(i), task)) for i, task in enumerate(tasks)]
    return run_payloads(config, payloads, timeout)


def run_payloads(config: Config, payloads: list[bytes], timeout: float = 30.0) -> list[m.Result]:
    """Run `AssignTask` payloads with the ids "0", "1", ... on an IoTaskRunner."""

    async def go() -> list[m.Result]:
        results: dict[str, m.Result] = {}
        every = asyncio.Event()

        def done(ident: str, result_frame: bytes) -> None:
            message = codec.decode(result_frame[4:])
            assert isinstance(message, m.TaskResult) and message.id == ident
            assert ident not in results, "answered twice"
            results[ident] = message.result
            if len(results) == len(payloads):
                every.set()

        runner = IoTaskRunner(config, done)
        await runner.start()
        try:
            for index, payload in enumerate(payloads):
                runner.submit(str(index), payload)
            async with asyncio.timeout(timeout):
                await every.wait()
        finally:
            await runner.close()
        return [results[str(index)] for index in range(len(payloads))]

    return asyncio.run(go())


def one(config: Config, task: m.Task) -> m.Result:
    return run(config, [task])[0]


def error_text(result: m.Result) -> str:
    assert isinstance(result, m.Error), result
    return result.message


# --- HttpRequest ---------------------------------------------------------------------------------


def test_http_200_gives_the_body(http: HttpServer) -> None:
    assert one(Config(), m.HttpRequest(http.url("/ok"))) == m.Response("hello, wörld")


def test_http_404_gives_the_body_as_upstream_does(http: HttpServer) -> None:
    assert one(Config(), m.HttpRequest(http.url("/missing"))) == m.Response("no such page")


def test_http_redirect_is_followed(http: HttpServer) -> None:
    assert one(Config(), m.HttpRequest(http.url("/redirect"))) == m.Response("hello, wörld")


def test_http_redirect_loop_is_an_error(http: HttpServer) -> None:
    assert "more than 10 redirects" in error_text(one(Config(), m.HttpRequest(http.url("/loop"))))


def test_http_slow_answer_times_out(http: HttpServer) -> None:
    # The server would answer "late" after 2 s: an error instead shows that the 300 ms timeout
    # fired first, no clock needed.
    text = error_text(one(Config(task_timeout_ms=300), m.HttpRequest(http.url("/slow?s=2"))))
    assert text == f"HttpRequest {http.url('/slow?s=2')}: no answer within 300 ms (task_timeout_ms)"


@pytest.mark.parametrize(("path", "body"), [("/big", "x" * 5000), ("/chunked", "y" * 5000)])
def test_http_body_past_the_limit_is_an_error(http: HttpServer, path: str, body: str) -> None:
    small, exact = (
        run(Config(http_max_body_bytes=4999), [m.HttpRequest(http.url(path))]),
        run(Config(http_max_body_bytes=5000), [m.HttpRequest(http.url(path))]),
    )
    assert "larger than http_max_body_bytes (4999)" in error_text(small[0])
    assert exact == [m.Response(body)]


def test_http_charset_of_the_response_is_used(http: HttpServer) -> None:
    assert one(Config(), m.HttpRequest(http.url("/latin1"))) == m.Response("café")


@pytest.mark.parametrize(
    ("charset", "body", "text"),
    [
        # encoding_rs (upstream) reads these labels as WHATWG does: windows-1252.
        ("iso-8859-1", b"\x80 caf\xe9", "€ café"),
        ("us-ascii", b"\x93q\x94", "“q”"),
        ("windows-1252", b"\x81\x8d", "\x81\x8d"),  # undefined in Python's cp1252: C1
        ("utf-8", b"\xef\xbb\xbfhi", "hi"),  # a byte-order mark is not text...
        ("iso-8859-1", b"\xff\xfeh\x00i\x00", "hi"),  # ... and wins over the label
        ("iso-8859-9", b"\x80\x8e\xfd", "€\x8e\u0131"),  # windows-1254, C1 where Python has none
        ("tis-620", b"\xa1\xff", "ก\ufffd"),  # windows-874: 0xFF is in no index
        ("iso-2022-kr", b"anything", "\ufffd"),  # WHATWG's "replacement" encoding
        # Python codec names that are no WHATWG label: UTF-8, as upstream (no internal error).
        ("latin-1", b"caf\xc3\xa9", "café"),
        ("base64", b"aGk=", "aGk="),
        ("idna", b"caf\xc3\xa9", "café"),
        ("unicode_escape", b"\\ud800 x", "\\ud800 x"),
        ("utf-7", b"+2AA-", "+2AA-"),
        ("no-such-charset", b"caf\xc3\xa9", "café"),
        ("utf-8", b"bad \xff byte", "bad \ufffd byte"),
    ],
)
def test_http_text_is_decoded_as_upstream_decodes_it(
    http: HttpServer, charset: str, body: bytes, text: str
) -> None:
    url = http.url(f"/charset?charset={charset}&hex={body.hex()}")
    assert one(Config(), m.HttpRequest(url)) == m.Response(text)


def test_http_a_big_body_is_framed_slice_by_slice_exactly() -> None:
    # Above _OFFLOAD_BYTES the frame is built in a thread, 256 KiB at a time: every character
    # class at every slice edge, and a multi-byte character split across two slices.
    text = ('aé"\\\n\x01€😀/' * 40_000)[:300_000]
    for body, charset in ((text.encode(), None), (text.encode("utf-16-le"), "utf-16le")):
        assert len(body) > 1 << 18
        got = iotasks._response_frame("big", body, charset)
        assert got == frame(codec.task_result_payload("big", m.Response(text)))


def test_http_refused_connection_names_the_reason() -> None:
    port = free_port()
    text = error_text(one(Config(), m.HttpRequest(f"http://127.0.0.1:{port}/")))
    assert text.startswith(f"HttpRequest http://127.0.0.1:{port}/: cannot connect")
    assert "refused" in text.lower()


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/file", "not a url", "http://", "file:///etc/passwd"]
)
def test_http_bad_urls_are_errors(url: str) -> None:
    assert error_text(one(Config(), m.HttpRequest(url))).startswith(f"HttpRequest {url}: ")


def test_a_host_name_idna_cannot_encode_is_a_bad_url_not_an_internal_error() -> None:
    # A 300-letter label was "internal error: UnicodeError(...)", logged with a traceback.
    url = "http://" + "a" * 300 + "/"
    text = error_text(one(Config(), m.HttpRequest(url)))
    assert text.startswith(f"HttpRequest {url}: not a valid http(s) URL ("), text


# --- the network policy --------------------------------------------------------------------------


def test_default_policy_refuses_the_metadata_address_without_connecting(
    loopback_only: LoopbackGuard,
) -> None:
    # The rule itself, as a runner with the default config holds it: no socket involved.
    policy = IoTaskRunner(Config(), lambda ident, result_frame: None).policy
    reason = "169.254.169.254 is refused by network_deny 169.254.0.0/16"
    assert policy.refusal("169.254.169.254") == reason
    assert policy.refusal("::ffff:169.254.169.254") == reason
    # And a task for it. Should the policy not be applied, `loopback_only` refuses the connect
    # before any packet leaves, and fails the test.
    text = error_text(one(Config(), m.HttpRequest("http://169.254.169.254/latest/meta-data/")))
    assert reason in text


def test_a_refused_address_is_not_connected_to() -> None:
    # A listener the policy refuses: the task is answered with the refusal and the listener's
    # backlog stays empty (nothing dialed it).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        config = Config(network_deny=["127.0.0.0/8"])
        http, tcp = run(
            config,
            [m.HttpRequest(f"http://127.0.0.1:{port}/latest/"), m.Tcp(f"127.0.0.1:{port}", b"x")],
        )
        assert "127.0.0.1 is refused by network_deny 127.0.0.0/8" in error_text(http)
        assert "127.0.0.1 is refused by network_deny 127.0.0.0/8" in error_text(tcp)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_loopback_only_refuses_what_could_leave_the_host(loopback_only: LoopbackGuard) -> None:
    # The guard the tests above rely on. A UDP connect() sends no packet, so even a guard that
    # let it through would put nothing on the wire.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        with pytest.raises(PermissionError, match="off loopback"):
            sock.connect(("192.0.2.1", 9))
        sock.connect(("127.0.0.1", 9))
    assert loopback_only.attempts == [("socket.connect", "('192.0.2.1', 9)")]
    loopback_only.attempts.clear()


def test_policy_refuses_ip_literals_and_names(http: HttpServer) -> None:
    config = Config(network_deny=["127.0.0.0/8", "::1/128"])
    literal, name = run(
        config, [m.HttpRequest(http.url("/ok")), m.HttpRequest(http.url("/ok", "localhost"))]
    )
    assert "127.0.0.1 is refused by network_deny 127.0.0.0/8" in error_text(literal)
    assert "is refused by network_deny" in error_text(name)


def test_policy_checks_every_redirect() -> None:
    async def away(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.2:{request.url.port}/ok")

    with HttpServer({"/away": away, "/ok": _ok}) as server:
        config = Config(network_allow=["127.0.0.1/32"], network_deny=[])
        text = error_text(one(config, m.HttpRequest(server.url("/away"))))
        assert "127.0.0.2 is in no network of network_allow" in text
        assert server.served == 1


def test_policy_most_specific_rule_wins() -> None:
    policy = NetworkPolicy(["0.0.0.0/0", "169.254.10.0/24"], ["169.254.0.0/16"])
    assert policy.refusal("169.254.10.7") is None
    assert policy.refusal("169.254.169.254") == (
        "169.254.169.254 is refused by network_deny 169.254.0.0/16"
    )
    assert policy.refusal("::ffff:169.254.169.254") is not None  # mapped IPv4 is IPv4
    assert policy.refusal("8.8.8.8") is None
    assert policy.refusal("::1") == "::1 is in no network of network_allow"
    tie = NetworkPolicy(["10.0.0.0/8"], ["10.0.0.0/8"])
    assert tie.refusal("10.1.2.3") == "10.1.2.3 is refused by network_deny 10.0.0.0/8"


def test_policy_applies_to_tcp_and_udp() -> None:
    config = Config(network_deny=["127.0.0.0/8"])
    tcp, udp = run(config, [m.Tcp("127.0.0.1:9", b"x"), m.Udp("127.0.0.1:9", b"x")])
    assert error_text(tcp) == "Tcp 127.0.0.1:9: 127.0.0.1 is refused by network_deny 127.0.0.0/8"
    assert error_text(udp) == "Udp 127.0.0.1:9: 127.0.0.1 is refused by network_deny 127.0.0.0/8"


def test_policy_judges_the_unspecified_addresses_as_the_loopback_they_reach(
    http: HttpServer,
) -> None:
    # Linux connects 0.0.0.0 to 127.0.0.1 and :: to ::1: a loopback deny rule held for
    # "127.0.0.1" and not for "0.0.0.0", with a real server answering on loopback.
    config = Config(network_deny=["127.0.0.0/8", "::1/128"])
    with TcpEcho(lambda data: b"secret") as echo, UdpEcho() as udp:
        tasks: list[m.Task] = [
            m.Tcp(f"0.0.0.0:{echo.port}", b"x"),
            m.Tcp(f"[::]:{echo.port}", b"x"),
            m.Tcp(f"[::ffff:0.0.0.0]:{echo.port}", b"x"),
            m.Udp(f"0.0.0.0:{udp.port}", b"x"),
            m.HttpRequest(http.url("/ok", host="0.0.0.0")),
        ]
        results = run(config, tasks)
    refused = [
        "0.0.0.0 (which reaches 127.0.0.1) is refused by network_deny 127.0.0.0/8",
        ":: (which reaches ::1) is refused by network_deny ::1/128",
        "0.0.0.0 (which reaches 127.0.0.1) is refused by network_deny 127.0.0.0/8",
        "0.0.0.0 (which reaches 127.0.0.1) is refused by network_deny 127.0.0.0/8",
        "0.0.0.0 (which reaches 127.0.0.1) is refused by network_deny 127.0.0.0/8",
    ]
    for result, reason in zip(results, refused, strict=True):
        assert error_text(result).endswith(reason), result


# --- Tcp and Udp ---------------------------------------------------------------------------------


def test_tcp_writes_and_reads_one_reply() -> None:
    with TcpEcho(lambda data: b"echo:" + data) as echo:
        assert one(Config(), m.Tcp(f"127.0.0.1:{echo.port}", b"ping")) == m.Bytes(b"echo:ping")


def test_tcp_with_megabytes_of_data_arrives_whole() -> None:
    # Above 1 MiB of payload the array is decoded off the event loop (vectorised, in a
    # thread): the peer must still get every byte, in order.
    data = os.urandom(2 << 20)
    with TcpEcho(digest_when_whole(len(data))) as echo:
        result = one(Config(), m.Tcp(f"127.0.0.1:{echo.port}", data))
    assert result == m.Bytes(hashlib.sha256(data).hexdigest().encode())


def test_a_big_tcp_task_in_another_json_form_is_decoded_off_the_loop_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # "task" before "id", spaces: valid JSON no master writes. The array is still decoded by
    # the vectorised codec in a thread, never by the generic decoder on the event loop.
    data = os.urandom(2 << 20)
    big_decodes: list[int] = []
    generic = codec.decode

    def decode(payload: bytes) -> m.Message:
        if len(payload) > 1 << 20:
            big_decodes.append(len(payload))
        return generic(payload)

    monkeypatch.setattr(codec, "decode", decode)
    threads: list[str] = []
    blob_decode = iotasks.decode_blob_task

    def recorded(payload: bytes) -> tuple[str, m.Task] | None:
        threads.append(threading.current_thread().name)
        return blob_decode(payload)

    monkeypatch.setattr(iotasks, "decode_blob_task", recorded)
    with TcpEcho(digest_when_whole(len(data))) as echo:
        task = codec.task_to_json(m.Tcp(f"127.0.0.1:{echo.port}", data))
        payload = b'{ "AssignTask" : { "task" : ' + task + b' , "id" : "0" } }'
        (result,) = run_payloads(Config(), [payload])
    assert result == m.Bytes(hashlib.sha256(data).hexdigest().encode())
    assert big_decodes == []
    assert len(threads) == 1 and threading.main_thread().name not in threads


def test_a_spilled_tcp_task_is_read_and_decoded_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Tcp frame of 1 MiB or more reaches the runner as a reference to its segment; the
    # dispatcher once read it whole on the event loop (42 ms for 16 MiB of data).
    shm = tmp_path / "shm"
    shm.mkdir()
    threads: list[str] = []
    read = iotasks.read_spilled

    def recorded(shm_dir: str, payload: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return read(shm_dir, payload)

    monkeypatch.setattr(iotasks, "read_spilled", recorded)
    data = os.urandom(300_000)

    def spill(body: bytes, error: str = "") -> bytes:
        incoming = IncomingSegment(str(shm), "cpnode-iotest", len(body))
        incoming.write(body)
        if error:  # what a write that found shm_dir full leaves: no file, the reason
            incoming.error = error
            incoming.discard()
        return incoming.finish()

    with TcpEcho(digest_when_whole(len(data))) as echo:
        body = codec.encode_payload(m.AssignTask("0", m.Tcp(f"127.0.0.1:{echo.port}", data)))
        lost = spill(codec.encode_payload(m.AssignTask("1", m.Tcp("127.0.0.1:9", b"x"))), "full")
        results = run_payloads(Config(shm_dir=str(shm)), [spill(body), lost])
    assert results == [
        m.Bytes(hashlib.sha256(data).hexdigest().encode()),
        m.Error("the task's payload was lost: full"),
    ]
    assert len(threads) == 2 and threading.main_thread().name not in threads
    assert os.listdir(shm) == []  # the segment went once read


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 18) + 1, 1 << 20])
def test_a_bytes_result_frame_is_the_codecs_at_any_size(size: int) -> None:
    # Above 256 KiB the array is encoded in a thread by the vectorised codec: same bytes.
    data = os.urandom(size)
    ident = 'id "with" \\ escapes and ü'
    expected = frame(codec.task_result_payload(ident, m.Bytes(data)))
    assert asyncio.run(iotasks._bytes_frame(ident, data)) == expected


def test_a_big_tcp_reply_is_encoded_in_a_thread_and_comes_back_as_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `_tcp` answers with what one read returned (often 128 KiB of a 1 MiB reply here): with
    # the offload threshold at 4 KiB, any such read takes the threaded encoder.
    monkeypatch.setattr(iotasks, "_OFFLOAD_BYTES", 4096)
    threads: list[str] = []

    def encode(data: bytes) -> bytes:
        threads.append(threading.current_thread().name)
        return encode_byte_array(data)

    monkeypatch.setattr(iotasks, "encode_byte_array", encode)
    reply = os.urandom(1 << 20)
    with TcpEcho(lambda data: reply) as echo:
        (result,) = run(Config(tcp_read_bytes=1 << 20), [m.Tcp(f"127.0.0.1:{echo.port}", b"go")])
    assert isinstance(result, m.Bytes) and len(result.data) > 1024
    assert result.data == reply[: len(result.data)]
    assert len(threads) == 1 and threading.main_thread().name not in threads


def test_a_big_tcp_task_with_a_bad_array_gets_the_codecs_diagnosis() -> None:
    # Answered from the vectorised codec's error (what a worker says of a big StoreData), not
    # by decoding 3.6 MB again with orjson on the event loop.
    payload = codec.encode_payload(m.AssignTask("0", m.Tcp("127.0.0.1:9", bytes(1 << 20))))
    bad = payload.replace(b'"data":[0,0,0,', b'"data":[0,0,256,', 1)
    offset = bad.index(b"256") - bad.index(b'"data":[') - len(b'"data":')
    (result,) = run_payloads(Config(), [bad])
    reason = f"256 is above 255 (at element 2, offset {offset})"
    assert result == m.Error(f"malformed task: invalid JSON byte array: {reason}")


def test_a_big_tcp_task_with_another_tasks_field_is_malformed() -> None:
    # `key` is StoreData's field: the fast path must not read this as a Tcp task.
    payload = codec.encode_payload(m.AssignTask("0", m.Tcp("127.0.0.1:9", bytes(1 << 20))))
    bad = payload.replace(b'"addr":', b'"key":', 1)
    (result,) = run_payloads(Config(), [bad])
    assert isinstance(result, m.Error)
    assert result.message.startswith("malformed task: ") and "addr" in result.message


_ONE_DIGIT_BYTES = bytes(i % 10 for i in range(25_000))
_EMPTY_ARRAYS = b"[" + b",".join([b"[]"] * 15_000) + b"]"
_DEEP = b"[" * 1000 + b"]" * 1000
COSTLY_BUT_SMALL = [
    # The `data` field as JSON, fields after it, the answer (the bytes the peer gets, or the
    # error), and whether the generic decoder reads it (else the vectorised codec does).
    pytest.param(
        encode_byte_array(_ONE_DIGIT_BYTES), b"", _ONE_DIGIT_BYTES, False, id="25000-bytes"
    ),
    pytest.param(
        encode_byte_array(_ONE_DIGIT_BYTES)[:-1] + b",256]",
        b"",
        "AssignTask.task.Tcp.data[25000]: expected an integer 0-255, got number 256",
        True,
        id="a-value-above-255-last",
    ),
    pytest.param(
        _EMPTY_ARRAYS,
        b"",
        "AssignTask.task.Tcp.data[0]: expected an integer 0-255, got array of 0",
        True,
        id="data-of-15000-arrays",
    ),
    pytest.param(b"[1,2,3]", b',"junk":' + _EMPTY_ARRAYS, b"\1\2\3", True, id="junk-of-arrays"),
    pytest.param(
        b"[1,2,3]",
        b',"junk":' + _DEEP + b',"more":[' + b",".join([_DEEP[600:-600]] * 70) + b"]",
        b"\1\2\3",
        True,
        id="junk-nested-deeply",
    ),
]


@pytest.mark.parametrize(("data", "more", "answer", "generic"), COSTLY_BUT_SMALL)
def test_a_small_payload_with_too_many_values_is_decoded_off_the_loop(
    data: bytes, more: bytes, answer: bytes | str, generic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under 64 KiB a payload was decoded on the event loop whatever it held: 25,000 values of
    # Tcp data, or 15,000 arrays in a field no master writes, held the loop for several ms.
    # Now a thread decodes it: the vectorised codec a byte array, the generic decoder (which
    # gives the answer it always gave) anything else.
    parsed: list[tuple[str, bool]] = []  # (which parser, whether on the event loop's thread)

    def recorder(real: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(payload: bytes, *args: object) -> Any:
            if len(payload) > 16 * 1024:  # the task's, not a result frame's
                on_loop = threading.current_thread() is threading.main_thread()
                parsed.append((real.__name__, on_loop))
            return real(payload, *args)

        return recorded

    monkeypatch.setattr(codec, "decode", recorder(codec.decode))
    monkeypatch.setattr(codec, "around_blob", recorder(codec.around_blob))
    size = len(answer) if isinstance(answer, bytes) else 0
    with TcpEcho(digest_when_whole(size)) as echo:
        task = b'{"Tcp":{"addr":"127.0.0.1:%d","data":%s%s}}' % (echo.port, data, more)
        payload = b'{"AssignTask":{"id":"0","task":' + task + b"}}"
        assert len(payload) <= iotasks._OFFLOAD_BYTES and codec.costly_to_parse(payload)
        (result,) = run_payloads(Config(), [payload])
    if isinstance(answer, bytes):
        assert result == m.Bytes(hashlib.sha256(answer).hexdigest().encode())
    else:
        assert result == m.Error(f"malformed task: {answer}")
    assert parsed and [name for name, on_loop in parsed if on_loop] == []
    assert ("decode" in [name for name, _ in parsed]) is generic


def test_tcp_reads_at_most_tcp_read_bytes() -> None:
    with TcpEcho(lambda data: b"z" * 5000) as echo:
        (default,) = run(Config(), [m.Tcp(f"127.0.0.1:{echo.port}", b"go")])
        (small,) = run(Config(tcp_read_bytes=10), [m.Tcp(f"127.0.0.1:{echo.port}", b"go")])
    assert isinstance(default, m.Bytes) and 0 < len(default.data) <= 1024
    assert small == m.Bytes(b"z" * 10)


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("127.0.0.1:{closed}", "refused"),
        ("127.0.0.1", 'missing ":port"'),
        # A numeric address whose zone names no interface: getaddrinfo() fails on this host,
        # with no DNS query (a name such as `x.invalid` would be sent to the DNS server).
        ("[fe80::1%no-such-if0]:80", "cannot resolve fe80::1%no-such-if0"),
    ],
)
def test_tcp_errors_name_the_reason(addr: str, reason: str, loopback_only: LoopbackGuard) -> None:
    addr = addr.format(closed=free_port())
    text = error_text(one(Config(), m.Tcp(addr, b"x")))
    assert text.startswith(f"Tcp {addr}: ")
    assert reason in text.lower() or reason in text


def test_udp_sends_and_awaits_one_datagram() -> None:
    with UdpEcho() as echo:
        result = one(Config(), m.Udp(f"127.0.0.1:{echo.port}", b"ping"))
    assert isinstance(result, m.Bytes) and result.data.startswith(b"ping@")


def test_udp_without_an_answer_times_out() -> None:
    with UdpEcho(answer=False) as silent:
        text = error_text(one(Config(task_timeout_ms=300), m.Udp(f"127.0.0.1:{silent.port}", b"?")))
    assert text == f"Udp 127.0.0.1:{silent.port}: no answer within 300 ms (task_timeout_ms)"


def test_udp_to_a_closed_port_is_refused() -> None:
    port = free_port(socket.SOCK_DGRAM)
    text = error_text(one(Config(task_timeout_ms=2000), m.Udp(f"127.0.0.1:{port}", b"?")))
    assert "refused" in text.lower()


# --- the Internet role ---------------------------------------------------------------------------


def test_internet_ports_are_bound_and_used_in_turn(caplog: pytest.LogCaptureFixture) -> None:
    ports = [free_port(), free_port()]
    ports = list(dict.fromkeys(ports))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        config = Config(role=m.Role.Internet, internet_ports=[*ports, busy])
        with TcpEcho() as tcp_echo, UdpEcho() as udp_echo, caplog.at_level(logging.INFO):
            tasks: list[m.Task] = [
                m.Tcp(f"127.0.0.1:{tcp_echo.port}", b"t%d" % i) for i in range(4)
            ]
            tasks += [m.Udp(f"127.0.0.1:{udp_echo.port}", b"u%d" % i) for i in range(4)]
            results = run(config, tasks)
    assert results[:4] == [m.Bytes(b"t%d" % i) for i in range(4)]
    for i, result in enumerate(results[4:]):
        assert isinstance(result, m.Bytes) and result.data.startswith(b"u%d@" % i)
    assert set(tcp_echo.peers) == set(ports)
    assert set(udp_echo.peers) == {*ports, busy}  # its UDP port was free
    log = caplog.text
    assert f"TCP {ports[0]}" in log and f"UDP {ports[0]}" in log
    assert f"internet_ports failed to bind: TCP {busy} (Address already in use)" in log


def test_internet_udp_send_error_is_the_answer_at_once() -> None:
    # A datagram the system refuses to send (70,000 bytes: EMSGSIZE) waited for a reply until
    # task_timeout_ms on an Internet node's shared port: its error reached nobody.
    config = Config(role=m.Role.Internet, internet_ports=[free_port()], task_timeout_ms=0)
    with UdpEcho() as echo:
        too_big, fine = run(
            config,
            [m.Udp(f"127.0.0.1:{echo.port}", b"z" * 70_000), m.Udp(f"127.0.0.1:{echo.port}", b"x")],
            timeout=10,
        )
    assert error_text(too_big) == f"Udp 127.0.0.1:{echo.port}: Message too long"
    assert fine == m.Bytes(b"x@%d" % config.internet_ports[0])  # the echo names the sender


def test_internet_tcp_tasks_to_one_target_at_once_use_different_ports() -> None:
    ports = list(dict.fromkeys([free_port(), free_port(), free_port()]))
    config = Config(role=m.Role.Internet, internet_ports=ports)

    def slow_echo(data: bytes) -> bytes:
        time.sleep(0.2)
        return data

    with TcpEcho(slow_echo) as echo:
        results = run(config, [m.Tcp(f"127.0.0.1:{echo.port}", b"%d" % i) for i in range(3)])
    assert results == [m.Bytes(b"%d" % i) for i in range(3)]
    assert sorted(echo.peers) == sorted(ports)


# --- scheduling ----------------------------------------------------------------------------------


def test_io_concurrency_bounds_tasks_in_flight(http: HttpServer) -> None:
    peak_before = http.peak
    wait_until_idle(http)
    http.peak = 0
    arrived_before = len(http.arrivals)
    results = run(Config(io_concurrency=3), [m.HttpRequest(http.url("/slow?s=0.2"))] * 9)
    assert results == [m.Response("late")] * 9
    # The server saw at most 3 requests at once, and 3 did overlap: the bound, and that it is
    # used. (It is the same server as the other tests', idle by now.)
    assert http.peak == 3
    # A task's slot is free as soon as it is answered: each of the three waves reached 3 at
    # once (one slot was once lost at the first completion: 1, 2, 3, 1, 2, 1, 2, ...).
    assert http.arrivals[arrived_before:].count(3) >= 3, http.arrivals[arrived_before:]
    http.peak = max(peak_before, http.peak)


def test_io_concurrency_1_runs_every_task_one_after_the_other(http: HttpServer) -> None:
    # With one slot the tasks queued behind the first never started (the finished task still
    # held its slot when the runner looked for the next one).
    wait_until_idle(http)
    arrived_before = len(http.arrivals)
    results = run(Config(io_concurrency=1), [m.HttpRequest(http.url("/slow?s=0.1"))] * 3)
    assert results == [m.Response("late")] * 3
    assert http.arrivals[arrived_before:] == [1, 1, 1]  # each alone, one after the other


def test_malformed_payload_is_answered_with_an_error() -> None:
    async def go() -> list[bytes]:
        answers: list[bytes] = []
        runner = IoTaskRunner(Config(), lambda ident, result_frame: answers.append(result_frame))
        await runner.start()
        try:
            runner.submit("bad", b'{"AssignTask":{"id":"bad","task":{"Tcp":{"addr":5}}}}')
            async with asyncio.timeout(5):
                while not answers:
                    await asyncio.sleep(0.01)
        finally:
            await runner.close()
        return answers

    (answer,) = asyncio.run(go())
    message = codec.decode(answer[4:])
    assert isinstance(message, m.TaskResult) and message.id == "bad"
    assert error_text(message.result).startswith("malformed task: ")


def test_close_cancels_running_tasks_without_answering(http: HttpServer) -> None:
    async def go() -> list[str]:
        answered: list[str] = []
        runner = IoTaskRunner(Config(), lambda ident, result_frame: answered.append(ident))
        await runner.start()
        payload = codec.encode_payload(m.AssignTask("a", m.HttpRequest(http.url("/slow?s=1"))))
        runner.submit("a", payload)
        await asyncio.sleep(0.2)
        assert runner.running == 1
        await runner.close()
        return answered

    assert asyncio.run(go()) == []


# --- the node ------------------------------------------------------------------------------------


FAILOVER_MS = 400


def test_200_slow_urls_do_not_delay_heartbeats(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text=request.query["n"])

    join = tmp_path / "join.json"
    with (
        HttpServer({"/slow": slow}) as server,
        MasterThread(Config(failover_timeout_ms=FAILOVER_MS), join_path=str(join)) as master,
    ):
        process = NodeProcess(
            tmp_path,
            join,
            {
                "failover_timeout_ms": FAILOVER_MS,
                "master_addresses": [master.address],
                "io_concurrency": 100,
            },
            "--workers",
            "1",
        )
        try:
            process.wait_for_log("node ready")
            tasks: list[m.Task] = [m.HttpRequest(server.url(f"/slow?n={i}")) for i in range(200)]
            results = run_tasks(join, tasks, timeout=60)
            assert results == [m.Response(str(i)) for i in range(200)]
            assert server.peak == 100  # two rounds of 100 requests of 2 s each
            # While they ran the node's heartbeats kept coming: the master evicted nothing, the
            # node never lost its connection, and it is still eligible for work.
            assert not [r for r in caplog.records if "evicted" in r.getMessage()]
            assert "connection to master" not in process.log
            assert master.stats().eligible_nodes == 1
            process.record_children()
            assert process.stop() == 0
        finally:
            process.close()


def test_a_repeated_io_task_awaiting_confirmation_gets_its_result_again_not_a_second_run() -> None:
    # A Tcp task answered but not yet confirmed, assigned again (a master re-queued it): its
    # data once went out a second time; a worker's task got its result re-sent instead.
    link = unconnected_link()
    dispatcher = Dispatcher(2, link.send_results)
    dispatcher.outbox = link
    runs: list[str] = []
    dispatcher.io_runner = lambda ident, payload: runs.append(ident)
    payload = codec.encode_payload(m.AssignTask("tcp-1", m.Tcp("127.0.0.1:9", b"PAY 100")))
    answer = frame(codec.task_result_payload("tcp-1", m.Bytes(b"ok")))
    dispatcher.accept("tcp-1", payload)
    dispatcher.io_finished("tcp-1", answer)
    dispatcher.accept("tcp-1", payload)
    assert runs == ["tcp-1"]
    assert dispatcher.results_resent == 1
    assert link.unconfirmed == 2 and link.find_result("tcp-1") == answer


def test_the_dispatcher_finds_the_task_type_past_a_long_id_and_counts_every_form() -> None:
    # An HttpRequest behind a 5,000-character id went to a worker ("not supported by this
    # node yet"); a Compute with spaces in it was counted, then overwritten, in the metrics.
    async def scenario() -> Dispatcher:
        dispatcher = Dispatcher(4, lambda blob, count: None)
        dispatcher.io_runner = lambda ident, payload: ran.append(ident)
        long_id = "x" * 5000
        task = m.HttpRequest("http://127.0.0.1:9/")
        dispatcher.accept(long_id, codec.encode_payload(m.AssignTask(long_id, task)))
        compute = b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}}}}'
        spaced = b'{"AssignTask": {"id": "b", "task": {"Compute": {"expression": "1"}}}}'
        dispatcher.accept_from_master(["a", "b"], [compute, spaced])
        return dispatcher

    ran: list[str] = []
    dispatcher = asyncio.run(scenario())
    assert ran == ["x" * 5000]
    assert dispatcher.received_by_type == {"HttpRequest": 1, "Compute": 2}
