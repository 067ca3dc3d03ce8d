"""shm.bytesjson: JSON byte arrays, checked against orjson (the reference) on both decoder paths."""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shm import bytesjson
from shm.bytesjson import ByteArrayError, decode_byte_array, encode_byte_array

WHITESPACE = st.text(alphabet=" \t\n\r", max_size=3)


@contextlib.contextmanager
def vectorised(chunk_text: int) -> Iterator[None]:
    """Send every text through the numpy decoder, in chunks of ``chunk_text`` characters."""
    saved = bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT
    bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT = 0, chunk_text
    try:
        yield
    finally:
        bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT = saved


PATHS = {
    "orjson path": contextlib.nullcontext,
    "vectorised, 5-char chunks": lambda: vectorised(5),
    "vectorised, 64-char chunks": lambda: vectorised(64),
    "vectorised, default chunks": lambda: vectorised(bytesjson.CHUNK_TEXT),
}


def reference(text: bytes) -> bytes | None:
    """What the text means as a byte array by orjson's reading (None: not one). Stricter than
    JSON like our decoder: no sign, not even on ``-0``."""
    try:
        values = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(values, list) or b"-" in text:
        return None
    if not all(type(value) is int and 0 <= value <= 255 for value in values):
        return None
    return bytes(values)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"[]", b""),
        (b" [ \n ] \t", b""),
        (b"[0]", b"\x00"),
        (b"[255]", b"\xff"),
        (b"[104,105]", b"hi"),
        (b"[ 1 , 2 ]\n", b"\x01\x02"),
        (b"\r\n[\t0,\n10 ,  99,100,\t255]\r\n", bytes([0, 10, 99, 100, 255])),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_decodes_examples(text: bytes, expected: bytes, path: str) -> None:
    with PATHS[path]():
        assert decode_byte_array(text) == expected
        assert decode_byte_array(memoryview(text)) == expected
        assert decode_byte_array(bytearray(text)) == expected


@given(st.binary(max_size=3000))
@example(b"")
@example(bytes(range(256)))
def test_encode_matches_orjson_and_round_trips(data: bytes) -> None:
    text = encode_byte_array(data)
    assert text == orjson.dumps(list(data))
    assert encode_byte_array(memoryview(data)) == text
    assert decode_byte_array(text) == data


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150)
@given(data=st.binary(max_size=400), spaces=st.data())
def test_decodes_any_whitespace_like_orjson(path: str, data: bytes, spaces: st.DataObject) -> None:
    gaps = [spaces.draw(WHITESPACE) for _ in range(2 * len(data) + 4)]
    elements = [f"{gaps[2 * i]}{value}{gaps[2 * i + 1]}" for i, value in enumerate(data)]
    text = f"{gaps[-4]}[{gaps[-3]}{','.join(elements)}{gaps[-2]}]{gaps[-1]}".encode()
    with PATHS[path]():
        assert decode_byte_array(text) == data == reference(text)


ELEMENTS = st.one_of(
    st.integers(0, 255).map(str),
    st.sampled_from(
        [
            "",
            "0",
            "01",
            "00",
            "007",
            "-0",
            "-1",
            "+1",
            "256",
            "999",
            "1000",
            "2550",
            "1.5",
            "1.",
            ".5",
            "1e2",
            "1E2",
            "0x1",
            " ",
            "1 2",
            "\t",
            "a",
            "true",
            "null",
            '"1"',
            "[1]",
            "[]",
            "\x00",
            "\xff",
        ]
    ),
)
SEPARATORS = st.sampled_from([",", ",", ",", " , ", ",,", "", " ", ";"])


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=300)
@given(
    elements=st.lists(ELEMENTS, max_size=12),
    separators=st.data(),
    brackets=st.sampled_from(
        [
            ("[", "]"),
            ("[", "]"),
            (" [", "] "),
            ("", "]"),
            ("[", ""),
            ("[[", "]"),
            ("[", "]]"),
            ("[", "],"),
            ("{", "}"),
        ]
    ),
)
def test_accepts_exactly_what_orjson_reads_as_bytes(
    path: str, elements: list[str], separators: st.DataObject, brackets: tuple[str, str]
) -> None:
    body = elements[0] if elements else ""
    for element in elements[1:]:
        body += separators.draw(SEPARATORS) + element
    text = f"{brackets[0]}{body}{brackets[1]}".encode("latin-1")
    expected = reference(text)
    with PATHS[path]():
        if expected is None:
            with pytest.raises(ByteArrayError):
                decode_byte_array(text)
        else:
            assert decode_byte_array(text) == expected


@pytest.mark.parametrize(
    ("text", "reason", "element", "offset"),
    [
        (b"", "empty input", None, 0),
        (b"  \n", "empty input", None, 3),
        (b"1]", "expected '['", None, 0),
        (b"[1", "expected ']'", None, 1),
        (b"[]x", "expected ']'", None, 2),
        (b"[01]", "leading zero in '01'", 0, 1),
        (b"[7,00]", "leading zero in '00'", 1, 3),
        (b"[1,,2]", "empty element", 1, 3),
        (b"[,1]", "empty element", 0, 1),
        (b"[1,]", "empty element", 1, 3),
        (b"[1, ]", "empty element", 1, 4),
        (b"[-1]", "a sign is not allowed", 0, 1),
        (b"[-0]", "a sign is not allowed", 0, 1),
        (b"[+1]", "a sign is not allowed", 0, 1),
        (b"[1.0]", "a decimal point is not allowed", 0, 2),
        (b"[2,1e2]", "an exponent is not allowed", 1, 4),
        (b"[256]", "256 is above 255", 0, 1),
        (b"[1,2,1000]", "1000 is above 255", 2, 5),
        (b"[1 2]", "expected ',' between elements, found '2'", 0, 3),
        (b'["a"]', "unexpected '\"'", 0, 1),
        (b"[true]", "unexpected 't'", 0, 1),
        (b"[[1]]", "unexpected '['", 0, 1),
        (b"[1,\x00]", "unexpected byte 0x00", 1, 3),
        (b"[" + b"," * 50 + b"]", "empty element", 0, 1),
        (b"[1," + b"9" * 5000 + b"]", "99999999... is above 255", 1, 3),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_errors_name_the_problem_element_and_offset(
    text: bytes, reason: str, element: int | None, offset: int, path: str
) -> None:
    with PATHS[path](), pytest.raises(ByteArrayError) as caught:
        decode_byte_array(text)
    assert reason in caught.value.reason
    assert (caught.value.element, caught.value.offset) == (element, offset)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value).startswith("invalid JSON byte array: ")


NUMBERS = [f"{value:0{width}d}" for width in (1, 2, 3) for value in range(10**width)]


@pytest.mark.parametrize("path", PATHS)
def test_every_number_of_one_to_three_digits(path: str) -> None:
    with PATHS[path]():
        for number in NUMBERS:
            text = f"[7,{number},8]".encode()
            valid = int(number) <= 255 and (number == "0" or not number.startswith("0"))
            if valid:
                assert decode_byte_array(text) == bytes([7, int(number), 8]), number
            else:
                with pytest.raises(ByteArrayError) as caught:
                    decode_byte_array(text)
                assert caught.value.element == 1, number


def test_large_array_in_many_chunks() -> None:
    data = os.urandom(3 * bytesjson.CHUNK_TEXT)
    text = orjson.dumps(list(data))
    assert decode_byte_array(text) == data
    assert decode_byte_array(memoryview(text)) == data
    assert encode_byte_array(data) == text


def test_large_pretty_printed_array() -> None:
    data = os.urandom(bytesjson.CHUNK_TEXT)
    text = orjson.dumps(list(data), option=orjson.OPT_INDENT_2)
    assert b"\n  " in text
    assert decode_byte_array(text) == data


def test_long_whitespace_runs_and_no_comma_within_a_chunk() -> None:
    gap = b" " * (2 * bytesjson.CHUNK_TEXT)
    text = b"[1," + gap + b"2" + gap + b",3]"
    assert decode_byte_array(gap + text + gap) == b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("gap", "expected"),
    [
        (b"1" + b" " * 5000 + b"2", None),  # split by whitespace across many windows
        (b" " * 4999 + b"1 2" + b" " * 5000, None),  # split right at a window's edge
        (b" " * 4999 + b"12" + b" " * 5000, b"\x0c"),
        (b" " * 20_000 + b"255", b"\xff"),
    ],
)
def test_a_chunk_longer_than_the_buffers_never_grows_them(
    monkeypatch: pytest.MonkeyPatch, gap: bytes, expected: bytes | None
) -> None:
    # No comma for 20,000 characters: the chunk runs on to the next one. Its whitespace is
    # removed 4,096 characters at a time, and the buffers keep their size (200 MiB of spaces
    # once grew them to 1.6 GB).
    grown: list[int] = []
    grow = bytesjson._ChunkDecoder._grow

    def recorded(decoder: Any, capacity: int) -> None:
        grown.append(capacity)
        grow(decoder, capacity)

    monkeypatch.setattr(bytesjson._ChunkDecoder, "_grow", recorded)
    text = b"[7," + gap + b",9]"
    with vectorised(4096):
        if expected is None:
            with pytest.raises(ByteArrayError, match="expected ','") as caught:
                decode_byte_array(text)
            assert caught.value.element == 1
        else:
            assert decode_byte_array(text) == b"\x07" + expected + b"\x09"
    assert grown == [4096]  # made once, at the chunk size


@pytest.mark.parametrize(
    ("gap", "expected", "bound"),
    [
        # The output (half the text, allocated up front) and the windows' temporaries.
        (b" " * (4 << 20) + b"1" + b" " * (4 << 20), b"\x07\x01\x09", 1.0),
        # ... and the copy `_diagnose` reads the bad element from.
        (b"1" * (8 << 20), None, 2.0),
    ],
    ids=["spaces", "digits"],
)
def test_a_long_element_costs_memory_by_the_window_not_by_its_length(
    gap: bytes, expected: bytes | None, bound: float
) -> None:
    # 8 MiB without a comma: once the whole of it at a time, 8 bytes of index per character
    # (and 1.6 GB for 200 MiB of spaces).
    text = b"[7," + gap + b",9]"
    tracemalloc.start()
    try:
        if expected is None:
            with pytest.raises(ByteArrayError, match="is above 255"):
                decode_byte_array(text)
        else:
            assert decode_byte_array(text) == expected
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bound * len(text), f"{peak} bytes at the peak for {len(text)} of text"


@pytest.mark.parametrize("bad", [b"256", b"01", b"", b"-3", b"1.5", b"12 3"])
def test_error_deep_in_a_large_array_has_its_global_position(bad: bytes) -> None:
    values = list(os.urandom(2 * bytesjson.CHUNK_TEXT))
    index = len(values) - 1000
    head = orjson.dumps(values[:index])[:-1] + b","
    text = head + bad + b"," + orjson.dumps(values[index + 1 :])[1:]
    with pytest.raises(ByteArrayError) as caught:
        decode_byte_array(text)
    assert caught.value.element == index
    assert len(head) <= caught.value.offset <= len(head) + len(bad)


def test_digits_without_commas_for_longer_than_a_chunk() -> None:
    text = b"[1," + b"1" * (bytesjson.CHUNK_TEXT + 10) + b",2]"
    with pytest.raises(ByteArrayError) as caught:
        decode_byte_array(text)
    assert caught.value.element == 1
    assert "above 255" in caught.value.reason


@pytest.mark.parametrize("path", [name for name in PATHS if name != "orjson path"])
@pytest.mark.parametrize("head", ["", "1,", "12,", "123,", "1,2,"])
@pytest.mark.parametrize(("bad", "reason"), [(",", "empty element"), ("0", "leading zero")])
def test_errors_at_either_byte_of_a_lane(path: str, head: str, bad: str, reason: str) -> None:
    """The vectorised decoder reads two bytes per lane: a fault must be found whichever byte
    of a lane it falls on (the heads shift it by one byte at a time)."""
    for tail in ["5", "25", "125"]:
        text = f"[{head}12,{bad}{tail},7]".encode()
        with PATHS[path](), pytest.raises(ByteArrayError) as caught:
            decode_byte_array(text)
        assert reason in caught.value.reason, text
        assert caught.value.element == head.count(",") + 1, text
