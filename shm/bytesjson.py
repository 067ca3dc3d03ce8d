"""Fast conversion between ``bytes`` and their wire form, a JSON array of integers 0-255.

CPCluster carries every blob (``StoreData``, ``Tcp``, ``Bytes`` results ...) as ``[104,105]``. A
16 MiB blob is a ~60 MB array; parsing it into a list of Python ints and back costs about half a
second, so this module takes faster ways.

The compiled codec ``shm._bytesjson`` (C, built at install time) does both when it is there.
It encodes from a table of four bytes per input byte (2.5-6x orjson's numpy serializer) and
decodes the region between the brackets in one pass (20-33x the orjson baseline in the runs so
far), saying only valid or not; a plain scan (``_diagnose``) then names the first bad element.
Without a C compiler (or with ``CPNODE_NO_EXTENSION=1`` at install) orjson encodes and the numpy
decoder below decodes, about 5-6x the baseline: for text longer than ``SMALL_TEXT``::

    text ─ strip whitespace, check "[" … "]" ─► region between the brackets
    region ─ split at commas into ~256 KiB chunks (the temporaries stay in the CPU cache)
      chunk ─ copy into a padded buffer, read as two-byte lanes ─► two digit planes
            ─ per lane: comma at its even or odd byte? (never both: that is an empty element)
            ─ pick the three digits before the lane's comma (last, tens, hundreds) by parity
            ─ count checks prove every element is 1-3 digits ─► value, range, leading zero
            ─ comma lanes (np.flatnonzero over half the text) ─► one gather ─► output slice
      whitespace in a chunk ─► removed (after checking it never splits a number), then as above
    any chunk that fails ─► _diagnose(): a plain scan of that chunk names the element and offset

Short text goes through orjson (faster below about 2 KiB) and is checked element by element.
The decoder is stricter than JSON in one place on purpose: a sign is never accepted, not even
in ``-0``; no CPCluster peer writes one.
"""

from __future__ import annotations

import re
import types
from typing import Final

import numpy as np
import numpy.typing as npt
import orjson

from shm import native

_compiled: types.ModuleType | None = native.load("shm._bytesjson")  # None: numpy and orjson serve

__all__ = ["SMALL_TEXT", "ByteArrayError", "decode_byte_array", "encode_byte_array"]

U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

SMALL_TEXT: Final = 2048
"""Texts up to this many bytes are parsed by orjson; longer ones by the vectorised decoder."""

CHUNK_TEXT: Final = 1 << 18
"""Characters per chunk of the vectorised decoder: large enough to amortise the numpy calls,
small enough for the temporaries to stay in cache."""

_COMMA: Final = ord(",")
_ZERO: Final = ord("0")
_DIGIT_COMMA: Final = (_COMMA - _ZERO) & 0xFF
"""A comma in a digit plane (the byte minus ``ord("0")``, wrapping)."""
_FILLER: Final = ord("/")
"""Pads the lanes to an even length: neither a digit nor a comma."""
_WHITESPACE: Final = frozenset(b" \t\n\r")
_WS_TABLE: Final = np.zeros(256, dtype=np.bool_)
_WS_TABLE[list(_WHITESPACE)] = True
_WS_RUN: Final = re.compile(rb"[ \t\n\r]*")
_DIGIT_RUN: Final = re.compile(rb"[0-9]*")


class ByteArrayError(ValueError):
    """The text is not a JSON array of integers 0-255.

    ``element`` is the 0-based index of the offending element (None when the brackets are
    wrong) and ``offset`` the byte offset into the text where the problem was found.
    """

    def __init__(self, reason: str, *, offset: int, element: int | None = None) -> None:
        where = f"offset {offset}" if element is None else f"element {element}, offset {offset}"
        super().__init__(f"invalid JSON byte array: {reason} (at {where})")
        self.reason = reason
        self.offset = offset
        self.element = element


def encode_byte_array(data: bytes | bytearray | memoryview) -> bytes:
    """Return ``data`` as a compact JSON array, byte for byte what ``orjson.dumps(list(data))``
    gives (``b"[104,105]"``, ``b"[]"``). Any other buffer is read as its bytes (``cast("B")``;
    a non-contiguous one is a TypeError)."""
    if type(data) is not bytes and type(data) is not bytearray:
        data = memoryview(data).cast("B")
    if _compiled is not None:
        encoded: bytes = _compiled.encode(data)
        return encoded
    if len(data) <= 128:
        return orjson.dumps(list(data))
    array = np.frombuffer(data, dtype=np.uint8)
    return orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_byte_array(text: bytes | bytearray | memoryview) -> bytes:
    """Return the bytes a JSON array of integers 0-255 stands for.

    ``text`` runs from ``[`` to ``]``; whitespace is allowed wherever JSON allows it. Anything
    else (signs, decimals, exponents, leading zeros, values above 255, empty elements, other
    JSON values) raises ``ByteArrayError`` naming the element and the byte offset.
    """
    chars = np.frombuffer(text, dtype=np.uint8)
    first, last = _brackets(chars)
    if _skip_whitespace(chars[: last + 1], first + 1) == last:
        return b""
    if _compiled is not None:
        decoded: tuple[bytes | None, int, int] = _compiled.decode(text, first + 1, last)
        data, element, offset = decoded
        if data is not None:
            return data
        raise _diagnose(chars, offset, _next_comma(chars, offset, last), element)
    if len(chars) <= SMALL_TEXT:
        return _decode_small(chars, first, last)
    return _decode_vectorised(chars, first, last, CHUNK_TEXT)


def _next_comma(chars: U8, start: int, stop: int) -> int:
    """The offset of the first comma at or after ``start``, or ``stop``; looks at growing
    windows, so that the search costs by the distance, not by the text."""
    position = start
    window = 64
    while position < stop:
        hits = np.flatnonzero(chars[position : min(stop, position + window)] == _COMMA)
        if hits.size:
            return position + int(hits[0])
        position += window
        window = min(window * 4, CHUNK_TEXT)
    return stop


def _brackets(chars: U8) -> tuple[int, int]:
    """Return the offsets of the opening and closing bracket, with only whitespace outside."""
    first = _skip_whitespace(chars, 0)
    if first == len(chars):
        raise ByteArrayError("empty input, expected '['", offset=len(chars))
    if chars[first] != ord("["):
        raise ByteArrayError(f"expected '[', found {_describe(int(chars[first]))}", offset=first)
    last = len(chars) - 1 - _skip_whitespace(chars[::-1], 0)
    if last == first or chars[last] != ord("]"):
        found = "nothing" if last == first else _describe(int(chars[last]))
        raise ByteArrayError(f"expected ']' at the end, found {found}", offset=last)
    return first, last


def _skip_whitespace(chars: U8, start: int) -> int:
    """Return the offset of the first byte at or after ``start`` that is not JSON whitespace,
    or ``len(chars)``; looks at growing blocks so that a long run costs no Python loop."""
    position = start
    block = 64
    while position < len(chars):
        if not _WS_TABLE[chars[position]]:
            return position
        hits = np.flatnonzero(~_WS_TABLE[chars[position : position + block]])
        if hits.size:
            return position + int(hits[0])
        position += block
        block = min(block * 4, CHUNK_TEXT)
    return len(chars)


def _decode_small(chars: U8, first: int, last: int) -> bytes:
    """Parse with orjson, then insist on plain integers 0-255 written without a sign."""
    text = chars[first : last + 1].tobytes()
    try:
        values = orjson.loads(text)
    except orjson.JSONDecodeError:
        values = None
    if (
        isinstance(values, list)
        and b"-" not in text
        and all(type(value) is int and value <= 255 for value in values)
    ):
        return bytes(values)
    raise _diagnose(chars, first + 1, last, 0)


def _decode_vectorised(chars: U8, first: int, last: int, chunk_text: int) -> bytes:
    """Decode the elements between the brackets at ``first`` and ``last``, chunk by chunk."""
    # Every element takes at least two characters (one digit and a comma) except the last.
    out = np.empty((last - first) // 2 + 1, dtype=np.uint8)
    decoder = _ChunkDecoder(min(chunk_text, last - first))
    written = 0
    start = first + 1
    while True:
        end = _chunk_end(chars, start, last, chunk_text)
        count = decoder.decode(chars[start:end], out[written:])
        if count is None:
            raise _diagnose(chars, start, end, written)
        written += count
        if end == last:
            return out[:written].tobytes()
        start = end + 1


def _chunk_end(chars: U8, start: int, stop: int, chunk_text: int) -> int:
    """Return where the chunk that begins at ``start`` ends: the offset of a comma, or ``stop``.

    The chunk takes everything up to the last comma within ``chunk_text`` characters; when
    there is none it runs on to the next comma (the text is then invalid or mostly whitespace).
    """
    limit = start + chunk_text
    if limit >= stop:
        return stop
    tail = chars[max(start, limit - 16) : limit]
    hits = np.flatnonzero(tail == _COMMA)
    if hits.size:
        return limit - len(tail) + int(hits[-1])
    hits = np.flatnonzero(chars[start:limit] == _COMMA)
    if hits.size:
        return start + int(hits[-1])
    return _next_comma(chars, limit, stop)


class _ChunkDecoder:
    """Decodes one chunk (whole elements, without the commas around it) at a time, into
    buffers reused from chunk to chunk.

    The chunk is copied behind four comma bytes and followed by one (and a filler byte up to
    an even length), so that every element ends at a comma with three readable bytes before
    it. That text ``T`` is read as *lanes* of two bytes, lane ``k`` holding ``T[2k]`` and
    ``T[2k+1]``, split into two digit planes ``D0[k] = T[2k] - 48`` and ``D1[k] = T[2k+1] - 48``
    (uint8, wrapping). Two commas never share a lane in valid text, so one comma lane stands
    for one element and the lanes (half the text) are the unit of all the arithmetic:

    ========================  ===================================  ===============
    comma at                  hundreds ``h``, tens ``t``, last ``c``  lane mask
    ========================  ===================================  ===============
    ``T[2k]`` (even)          ``D1[k-2]``, ``D0[k-1]``, ``D1[k-1]``  ``e``
    ``T[2k+1]`` (odd)         ``D0[k-1]``, ``D1[k-1]``, ``D0[k]``    ``o``
    ========================  ===================================  ===============

    Each of ``h``, ``t``, ``c`` is ``min(even | ~e, odd | ~o)`` (``~`` as 0/255 bytes): the
    candidate of the lane's parity, or 255 (not a digit) in a lane without a comma. ``t`` and
    ``h`` count as digits of the element only while no comma came between.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = 0
        self._grow(max(capacity, 16))

    def _grow(self, capacity: int) -> None:
        self._capacity = capacity
        lanes = (capacity + 6) // 2 + 1
        self._text: U8 = np.full(2 * lanes + 2, _COMMA, dtype=np.uint8)
        self._d0: U8 = np.empty(lanes, dtype=np.uint8)
        self._d1: U8 = np.empty(lanes, dtype=np.uint8)
        self._even: Bools = np.empty(lanes, dtype=np.bool_)
        self._odd: Bools = np.empty(lanes, dtype=np.bool_)
        self._comma: Bools = np.empty(lanes, dtype=np.bool_)
        self._not_even: U8 = np.empty(lanes, dtype=np.uint8)
        self._not_odd: U8 = np.empty(lanes, dtype=np.uint8)
        self._c: U8 = np.empty(lanes, dtype=np.uint8)
        self._t: U8 = np.empty(lanes, dtype=np.uint8)
        self._h: U8 = np.empty(lanes, dtype=np.uint8)
        self._scratch: U8 = np.empty(lanes, dtype=np.uint8)
        self._c_digit: Bools = np.empty(lanes, dtype=np.bool_)
        self._t_digit: Bools = np.empty(lanes, dtype=np.bool_)
        self._h_digit: Bools = np.empty(lanes, dtype=np.bool_)
        self._floor: U8 = np.empty(lanes, dtype=np.uint8)

    def decode(self, chunk: U8, out: U8) -> int | None:
        """Write the chunk's values to the start of ``out``; return how many, or None when the
        chunk is not a valid run of elements.

        A chunk longer than the buffers has no comma within `CHUNK_TEXT` characters (see
        `_chunk_end`): one element, valid only as 1-3 digits in whitespace. Its whitespace is
        removed window by window, and the buffers never grow to its length (200 MiB of spaces
        in an array once cost 1.6 GB)."""
        if len(chunk) <= self._capacity:
            count = self._decode_compact(chunk, out)
            if count is not None or not _WS_TABLE[chunk].any():
                return count
        elif _kept_count(chunk) > 3:
            return None  # one element of more than 3 characters: invalid, say where
        compact = _without_whitespace(chunk)  # no longer than the chunk, or 3 kept characters
        if compact is None:
            return None
        return self._decode_compact(compact, out)

    def _decode_compact(self, chunk: U8, out: U8) -> int | None:
        length = len(chunk)  # at most the capacity (see `decode`)
        if length == 0:
            return None
        end = length + 5
        lanes = (end + 1) // 2
        text = self._text
        text[4 : length + 4] = chunk
        text[length + 4] = _COMMA
        text[end : 2 * lanes] = _FILLER
        pairs = text[: 2 * lanes].view(np.uint16)
        d0, d1 = self._d0[:lanes], self._d1[:lanes]
        np.copyto(d0, pairs, casting="unsafe")
        # The odd bytes are the low bytes of the lanes read one byte further on.
        np.copyto(d1, text[1 : 2 * lanes + 1].view(np.uint16), casting="unsafe")
        np.subtract(d0, _ZERO, out=d0)
        np.subtract(d1, _ZERO, out=d1)
        # Lanes 0 and 1 are the leading commas; lane k looks back into lanes k-1 and k-2.
        size = lanes - 2
        even, odd, comma = self._even[:size], self._odd[:size], self._comma[:size]
        np.equal(d0[2:], _DIGIT_COMMA, out=even)
        np.equal(d1[2:], _DIGIT_COMMA, out=odd)
        np.logical_or(even, odd, out=comma)
        ends = np.flatnonzero(comma)
        n = len(ends)
        if np.logical_and(even, odd, out=comma).any():
            return None  # two commas in one lane: an empty element
        not_even, not_odd = self._not_even[:size], self._not_odd[:size]
        np.subtract(even.view(np.uint8), 1, out=not_even)
        np.subtract(odd.view(np.uint8), 1, out=not_odd)
        c, t, h = self._c[:size], self._t[:size], self._h[:size]
        self._select(c, d1[1:-1], d0[2:])
        self._select(t, d0[1:-1], d1[1:-1])
        self._select(h, d1[:-2], d0[1:-1])
        c_digit, t_digit, h_digit = self._c_digit[:size], self._t_digit[:size], self._h_digit[:size]
        np.less_equal(c, 9, out=c_digit)
        np.less_equal(t, 9, out=t_digit)
        np.less_equal(h, 9, out=h_digit)
        np.logical_and(h_digit, t_digit, out=h_digit)
        # Lanes without a comma hold 255s and count nothing. Counted digits never exceed an
        # element's real length once its last character is a digit, so equal totals prove
        # that every element is exactly its 1-3 counted digits.
        counted = n + np.count_nonzero(t_digit) + np.count_nonzero(h_digit)
        if np.count_nonzero(c_digit) != n or counted != length - (n - 1):
            return None
        np.multiply(h, h_digit.view(np.uint8), out=h)
        if int(h.max()) > 2:
            return None
        np.multiply(t, t_digit.view(np.uint8), out=t)
        # The smallest value an element of its length may have is 0, 10 or 100; a leading zero
        # makes it smaller. With the hundreds digit at most 2 the uint8 sum wraps exactly for
        # 256-299, to 0-43: below 100 too.
        floor = self._floor[:size]
        np.multiply(h_digit.view(np.uint8), 9, out=floor)
        np.add(floor, t_digit.view(np.uint8), out=floor)
        np.multiply(floor, 10, out=floor)
        np.multiply(h, 10, out=h)
        np.add(h, t, out=h)
        np.multiply(h, 10, out=h)
        np.add(h, c, out=h)
        np.less(h, floor, out=c_digit)
        if c_digit.any():
            return None
        np.take(h, ends, out=out[:n])
        return n

    def _select(self, target: U8, even: U8, odd: U8) -> None:
        """``target = min(even | ~e, odd | ~o)``: the candidate of each lane's comma parity."""
        scratch = self._scratch[: len(target)]
        np.bitwise_or(even, self._not_even[: len(target)], out=target)
        np.bitwise_or(odd, self._not_odd[: len(target)], out=scratch)
        np.minimum(target, scratch, out=target)


def _kept_count(chunk: U8) -> int:
    """How many characters of the chunk are not whitespace, `CHUNK_TEXT` at a time."""
    return sum(
        int(np.count_nonzero(~_WS_TABLE[chunk[start : start + CHUNK_TEXT]]))
        for start in range(0, len(chunk), CHUNK_TEXT)
    )


def _without_whitespace(chunk: U8) -> U8 | None:
    """Return the chunk without JSON whitespace, or None when whitespace separates two digits.
    Looks at `CHUNK_TEXT` characters at a time: the temporaries are as large as what is kept,
    not as the chunk."""
    kept: npt.NDArray[np.intp] = np.concatenate(
        [
            np.flatnonzero(~_WS_TABLE[chunk[start : start + CHUNK_TEXT]]) + start
            for start in range(0, len(chunk), CHUNK_TEXT)
        ]
    )
    compact: U8 = chunk[kept]
    digits = (compact - _ZERO) <= 9
    split = digits[:-1] & digits[1:] & (np.diff(kept) != 1)
    if split.any():
        return None
    return compact


def _diagnose(chars: U8, start: int, stop: int, element: int) -> ByteArrayError:
    """Find the first error in the elements between offsets ``start`` and ``stop``.

    ``element`` is the index of the first element there; ``stop`` is a comma or the closing
    bracket. Runs only on text already known to be invalid, one chunk at most.
    """
    region = chars[start:stop].tobytes()
    position = 0
    while True:
        position = _skip_region_whitespace(region, position)
        offset = start + position
        if position == len(region) or region[position] == _COMMA:
            return ByteArrayError("empty element", offset=offset, element=element)
        number_start = position
        position = _run_end(_DIGIT_RUN, region, position)
        if position == number_start:
            return _bad_character(region[position], offset, element)
        digits = region[number_start:position]
        ends_number = position == len(region) or region[position] in _WHITESPACE
        if not ends_number and region[position] != _COMMA:
            return _bad_character(region[position], start + position, element)
        if len(digits) > 1 and digits[0] == _ZERO:
            reason = f"leading zero in {digits.decode()!r}"
            return ByteArrayError(reason, offset=start + number_start, element=element)
        if len(digits) > 3 or int(digits) > 255:
            shown = digits.decode() if len(digits) <= 12 else f"{digits[:8].decode()}..."
            reason = f"{shown} is above 255"
            return ByteArrayError(reason, offset=start + number_start, element=element)
        position = _skip_region_whitespace(region, position)
        if position == len(region):
            return ByteArrayError(
                "no error found in an array the fast path rejected",
                offset=start + position,
                element=element,
            )
        if region[position] != _COMMA:
            reason = f"expected ',' between elements, found {_describe(region[position])}"
            return ByteArrayError(reason, offset=start + position, element=element)
        position += 1
        element += 1


def _skip_region_whitespace(region: bytes, position: int) -> int:
    return _run_end(_WS_RUN, region, position)


def _run_end(run: re.Pattern[bytes], region: bytes, position: int) -> int:
    """Where the run of ``run`` characters starting at ``position`` ends (a C-speed scan)."""
    match = run.match(region, position)
    return position if match is None else match.end()


def _bad_character(char: int, offset: int, element: int) -> ByteArrayError:
    reasons = {
        ord("-"): "a sign is not allowed",
        ord("+"): "a sign is not allowed",
        ord("."): "a decimal point is not allowed",
        ord("e"): "an exponent is not allowed",
        ord("E"): "an exponent is not allowed",
    }
    reason = reasons.get(char, f"unexpected {_describe(char)}")
    return ByteArrayError(reason, offset=offset, element=element)


def _describe(char: int) -> str:
    if 0x20 < char < 0x7F:
        return f"{chr(char)!r}"
    return f"byte 0x{char:02x}"
