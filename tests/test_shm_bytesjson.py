"""shm.bytesjson: JSON byte arrays, checked against orjson (the reference) on both decoder paths."""

from __future__ import annotations

import array
import contextlib
import os
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shm import bytesjson, native
from shm.bytesjson import ByteArrayError, decode_byte_array, encode_byte_array

WHITESPACE = st.text(alphabet=" \t\n\r", max_size=3)


@contextlib.contextmanager
def numpy_decoder(
    small_text: int = bytesjson.SMALL_TEXT, chunk_text: int = bytesjson.CHUNK_TEXT
) -> Iterator[None]:
    """Decode without the compiled decoder: through orjson up to ``small_text`` characters,
    above that through the numpy decoder in chunks of ``chunk_text`` characters."""
    saved = bytesjson._compiled, bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT
    bytesjson._compiled, bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT = None, small_text, chunk_text
    try:
        yield
    finally:
        bytesjson._compiled, bytesjson.SMALL_TEXT, bytesjson.CHUNK_TEXT = saved


def vectorised(chunk_text: int) -> contextlib.AbstractContextManager[None]:
    """Send every text through the numpy decoder, in chunks of ``chunk_text`` characters."""
    return numpy_decoder(0, chunk_text)


NO_EXTENSION = native.skipped_on_purpose()


@contextlib.contextmanager
def compiled() -> Iterator[None]:
    """The default: the compiled codec, which an install with a C compiler always builds
    (unless told not to: then the tests of the compiled path skip)."""
    if bytesjson._compiled is None and NO_EXTENSION:
        pytest.skip("installed with CPNODE_NO_EXTENSION")
    assert bytesjson._compiled is not None, "shm._bytesjson was not built (see setup.py)"
    yield


@contextlib.contextmanager
def compiled_scalar() -> Iterator[None]:
    """The compiled decoder without its SSSE3 blocks: what a CPU without SSSE3 (or an ARM
    machine) runs."""
    with compiled():
        assert bytesjson._compiled is not None
        was = bytesjson._compiled.set_blocks(False)
        try:
            yield
        finally:
            bytesjson._compiled.set_blocks(was)


PATHS = {
    "compiled": compiled,
    "compiled, scalar": compiled_scalar,
    "orjson path": numpy_decoder,
    "vectorised, 5-char chunks": lambda: vectorised(5),
    "vectorised, 64-char chunks": lambda: vectorised(64),
    "vectorised, default chunks": lambda: vectorised(bytesjson.CHUNK_TEXT),
}


@pytest.fixture(params=["compiled", "vectorised, default chunks"])
def either_decoder(request: pytest.FixtureRequest) -> Iterator[None]:
    """For the tests of large texts: run them on the compiled and on the numpy decoder."""
    with PATHS[request.param]():
        yield


def test_the_compiled_decoder_is_built() -> None:
    # setup.py builds it unless told not to; an install that silently fell back to numpy
    # would run at a fifth of the speed the README promises.
    if NO_EXTENSION:
        assert bytesjson._compiled is None or bytesjson._compiled.decode(b"[1]", 1, 2)[0] == b"\x01"
    else:
        assert bytesjson._compiled is not None, "shm._bytesjson was not built (see setup.py)"
        assert bytesjson._compiled.decode(b"[1,22,255]", 1, 9) == (b"\x01\x16\xff", -1, -1)


def outcome(text: bytes) -> bytes | tuple[str, int | None, int]:
    """What the decoder makes of ``text``: the bytes, or the error's reason, element, offset."""
    try:
        return decode_byte_array(text)
    except ByteArrayError as error:
        return error.reason, error.element, error.offset


FAULTS = ["", " ", "\n", ",", "0", "9", "99", "-", ".", "x", "]", "\x00", "\xff"]


@pytest.mark.parametrize("path", ["compiled", "compiled, scalar"])
@settings(max_examples=300)
@given(
    values=st.lists(st.integers(0, 255), min_size=60, max_size=600),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 3), st.sampled_from(FAULTS)), max_size=6
    ),
)
def test_compiled_and_numpy_decoders_agree_on_long_texts(
    path: str, values: list[int], edits: list[tuple[float, int, str]]
) -> None:
    """Long enough (at least 60 elements, about 200 characters) to run through the compiled
    decoder's 16-character blocks; each of up to six edits replaces 0-3 characters somewhere
    with whitespace, digits, commas or junk. Both decoders return the same bytes or the same
    error, element and offset."""
    text = bytearray(orjson.dumps(values))
    for where, width, fault in edits:
        at = 1 + int(where * (len(text) - 2))
        text[at : at + width] = fault.encode("latin-1")
    with PATHS[path]():
        ours = outcome(bytes(text))
    with vectorised(64):
        assert outcome(bytes(text)) == ours
    expected = reference(bytes(text))
    if expected is not None:
        assert ours == expected


@pytest.mark.parametrize("path", ["compiled", "compiled, scalar"])
@pytest.mark.parametrize("fault", ["", " ", ",", "0", "256", "1000", "01", "x"])
def test_a_fault_at_every_position_of_a_block(fault: str, path: str) -> None:
    """The compiled decoder reads 16 characters at a time and looks back 3: a fault is found,
    and named as the numpy decoder names it, at each of 40 positions in a row (a space is a
    fault only inside a number)."""
    values = [7, 42, 255, 0, 100, 19] * 20
    for shift in range(40):
        text = orjson.dumps(values)[:-1] + b","
        text = text[: 80 + shift] + fault.encode() + text[80 + shift :] + b"5]"
        with PATHS[path]():
            ours = outcome(text)
        with vectorised(64):
            assert outcome(text) == ours, (shift, text[70:130])
        expected = reference(text)
        if expected is None:
            assert isinstance(ours, tuple), (shift, text[70:130])
        else:
            assert ours == expected, (shift, text[70:130])


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


@pytest.mark.parametrize("path", ["compiled", "orjson path"])
@given(data=st.binary(max_size=3000))
@example(data=b"")
@example(data=bytes(range(256)))
@example(data=bytes(range(256)) * 20)
def test_encode_matches_orjson_and_round_trips(path: str, data: bytes) -> None:
    with PATHS[path]():
        text = encode_byte_array(data)
        assert text == orjson.dumps(list(data))
        assert encode_byte_array(memoryview(data)) == text
        assert encode_byte_array(bytearray(data)) == text
        assert decode_byte_array(text) == data


@pytest.mark.parametrize("path", ["compiled", "orjson path"])
def test_a_memoryview_is_encoded_as_its_bytes(path: str) -> None:
    wide = array.array("H", [300, 1] * 100)
    with PATHS[path]():
        assert encode_byte_array(memoryview(wide)) == orjson.dumps(list(wide.tobytes()))
        with pytest.raises(TypeError):
            encode_byte_array(memoryview(b"abcd")[::2])


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


def test_large_array_in_many_chunks(either_decoder: None) -> None:
    data = os.urandom(3 * bytesjson.CHUNK_TEXT)
    text = orjson.dumps(list(data))
    assert decode_byte_array(text) == data
    assert decode_byte_array(memoryview(text)) == data
    assert encode_byte_array(data) == text


def test_large_pretty_printed_array(either_decoder: None) -> None:
    data = os.urandom(bytesjson.CHUNK_TEXT)
    text = orjson.dumps(list(data), option=orjson.OPT_INDENT_2)
    assert b"\n  " in text
    assert decode_byte_array(text) == data


def test_long_whitespace_runs_and_no_comma_within_a_chunk(either_decoder: None) -> None:
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
    gap: bytes, expected: bytes | None, bound: float, either_decoder: None
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
def test_error_deep_in_a_large_array_has_its_global_position(
    bad: bytes, either_decoder: None
) -> None:
    values = list(os.urandom(2 * bytesjson.CHUNK_TEXT))
    index = len(values) - 1000
    head = orjson.dumps(values[:index])[:-1] + b","
    text = head + bad + b"," + orjson.dumps(values[index + 1 :])[1:]
    with pytest.raises(ByteArrayError) as caught:
        decode_byte_array(text)
    assert caught.value.element == index
    assert len(head) <= caught.value.offset <= len(head) + len(bad)


def test_digits_without_commas_for_longer_than_a_chunk(either_decoder: None) -> None:
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
