"""node.protocol._speedups, the supervisor's compiled frame loops, against the Python code they
stand in for (which stays the reference): `FrameDecoder.feed` with and without the compiled
`split_frames`, and `assign_task_ids` against `assign_task_id`."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.protocol import codec, framing
from node.protocol.errors import FrameTooLarge
from node.protocol.framing import FrameDecoder, frame
from shm import native

if native.skipped_on_purpose():
    pytest.importorskip("node.protocol._speedups", reason="installed with CPNODE_NO_EXTENSION")
from node.protocol import _speedups  # an install without it fails here


class MemorySpill:
    """A spill that keeps the body, and hands on a marked copy of it."""

    def __init__(self) -> None:
        self.body = bytearray()

    def write(self, data: bytes) -> None:
        self.body += data

    def discard(self) -> None:
        self.body.clear()

    def finish(self) -> bytes:
        return b"spilled:" + bytes(self.body)


def some_spills(length: int) -> MemorySpill | None:
    return MemorySpill() if length % 3 else None  # declines some, as a full shm_dir does


def run(
    chunks: list[bytes], compiled: bool, limit: int, spill: bool
) -> tuple[list[bytes], int | None, int, int]:
    """Feed the chunks; the payloads, the length of a frame refused as too large (None if
    none), and the decoder's state at the end."""
    saved = framing._split_frames
    framing._split_frames = _speedups.split_frames if compiled else None
    try:
        decoder = FrameDecoder(limit, spill=some_spills if spill else None, spill_from=8)
        out: list[bytes] = []
        try:
            for chunk in chunks:
                out += decoder.feed(chunk)
        except FrameTooLarge as exc:
            return out + exc.payloads, exc.length, decoder.pending, decoder.expecting
        return out, None, decoder.pending, decoder.expecting
    finally:
        framing._split_frames = saved


def test_the_compiled_loops_are_used() -> None:
    from node import dispatch

    assert framing._split_frames is _speedups.split_frames
    assert codec.assign_task_ids is _speedups.assign_task_ids
    assert framing.frames_of is _speedups.frames_of
    assert dispatch.claim_tasks is _speedups.claim_tasks
    assert dispatch.frames_of is _speedups.frames_of


@settings(max_examples=1500)
@given(
    payloads=st.lists(st.binary(max_size=20), max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=6),
    limit=st.sampled_from([0, 5, 12, 1 << 20]),
    spill=st.booleans(),
)
@example(payloads=[b"", b"a", b""], cuts=[], limit=1 << 20, spill=True)
def test_feed_gives_the_same_payloads_with_and_without_the_compiled_loop(
    payloads: list[bytes], cuts: list[int], limit: int, spill: bool
) -> None:
    stream = b"".join(frame(p) for p in payloads) + b"\x00\x00"  # and a partial header
    edges = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    chunks = [stream[a:b] for a, b in itertools.pairwise(edges)]
    python = run(chunks, compiled=False, limit=limit, spill=spill)
    assert run(chunks, compiled=True, limit=limit, spill=spill) == python
    if python[1] is None and not spill:
        assert python[0] == payloads


def test_split_frames_stops_where_python_takes_over() -> None:
    stream = frame(b"abc") + frame(b"x" * 10) + frame(b"d")
    out: list[bytes] = []
    assert _speedups.split_frames(stream, 0, 100, 8, out) == 7  # stops at the frame to spill
    assert out == [b"abc"]
    assert _speedups.split_frames(stream, 7, 100, 1 << 40, out) == len(stream)
    assert out == [b"abc", b"x" * 10, b"d"]
    out.clear()
    assert _speedups.split_frames(stream, 0, 5, 1 << 40, out) == 7  # above the limit
    assert _speedups.split_frames(stream[:-1], 21, 100, 1 << 40, out) == 21  # not whole
    with pytest.raises(ValueError):
        _speedups.split_frames(stream, len(stream) + 1, 100, 1 << 40, out)


ASSIGN = codec.encode_payload


@settings(max_examples=1500)
@given(st.lists(st.binary(max_size=40) | st.text(max_size=8).map(str.encode), max_size=8))
@example([b'{"AssignTask":{"id":"t1","task":{"Compute":{"expression":"1"}}}}'])
@example([b'{"AssignTask":{"id":"', b'{"AssignTask":{"id":""', b'{"AssignTask":{"id":"a\\"b"'])
@example([b'{"AssignTask":{"id":"\xff"}', b'{"AssignTask":{"id":"\xed\xa0\x80"}', b"OK"])
def test_assign_task_ids_read_like_the_python_path(tails: list[bytes]) -> None:
    payloads = [b'{"AssignTask":{"id":"' + tail for tail in tails] + tails
    assert _speedups.assign_task_ids(payloads) == codec.python_assign_task_ids(payloads)


def test_assign_task_ids_of_real_tasks() -> None:
    from node.protocol import messages as m

    payloads = [ASSIGN(m.AssignTask(ident, m.Compute("1"))) for ident in ["t1", "", "é", 'a"b']]
    assert _speedups.assign_task_ids(payloads) == ["t1", "", "é", None]
    assert codec.python_assign_task_ids(payloads) == ["t1", "", "é", None]


def test_native_load_keeps_the_reason_a_module_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.missing() == {}  # this install has every compiled module
    assert native.summary() == f"compiled hot paths in use: {', '.join(native.MODULES)}"
    monkeypatch.setattr(native, "MODULES", (*native.MODULES, "shm._no_such_module"))
    monkeypatch.setattr(native, "_missing", {})
    assert native.load("shm._no_such_module") is None
    assert "No module named 'shm._no_such_module'" in native.missing()["shm._no_such_module"]
    assert native.summary().endswith(
        "; running the Python code instead of shm._no_such_module "
        "(No module named 'shm._no_such_module')"
    )


# ------------------------------------------------------------------ frames_of, claim_tasks


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_frames_of_is_the_frames_back_to_back(payloads: list[bytes]) -> None:
    expected = b"".join(map(frame, payloads))
    assert _speedups.frames_of(payloads) == expected
    assert framing.python_frames_of(payloads) == expected
    assert FrameDecoder().feed(expected) == payloads


def test_frames_of_refuses_what_is_not_a_list_of_bytes() -> None:
    with pytest.raises(TypeError):
        _speedups.frames_of((b"a",))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.frames_of([b"a", "b"])  # type: ignore[list-item]


def _task(ident: str, kind: str) -> bytes:
    from node.protocol import messages as m

    task = {"c": m.Compute("1+1"), "x": m.ComplexMath("1"), "s": m.GetStorage()}[kind]
    return ASSIGN(m.AssignTask(ident, task))


_IDS = st.sampled_from(["a", "b", "c", "t1", "é", 'q"', ""])


@settings(max_examples=1500)
@given(
    st.lists(st.tuples(_IDS, st.sampled_from("ccccxs")), max_size=12),
    st.sets(_IDS),
    st.sets(_IDS),
    st.sets(_IDS),
    st.integers(0, 12),
)
@example([("a", "c"), ("b", "c"), ("a", "c")], set(), set(), set(), 0)  # repeated in the run
def test_claim_tasks_claims_like_the_python_path(
    tasks: list[tuple[str, str]],
    held: set[str],
    answered: set[str],
    answered_before: set[str],
    start: int,
) -> None:
    from node.dispatch import python_claim_tasks

    ids = [ident for ident, _ in tasks]
    payloads = [_task(ident, kind) for ident, kind in tasks]
    start = min(start, len(ids))
    outcomes = []
    for claim in (_speedups.claim_tasks, python_claim_tasks):
        holding = {ident: b"before" for ident in held}
        end = claim(
            ids,
            payloads,
            start,
            holding,
            dict.fromkeys(answered, b""),
            dict.fromkeys(answered_before, b""),
        )
        outcomes.append((end, holding))
    assert outcomes[0] == outcomes[1]
    end, holding = outcomes[0]
    # What it claimed: every task from start to end, each a new Compute with a plain id.
    assert holding == {
        **dict.fromkeys(held, b"before"),
        **dict(zip(ids[start:end], payloads[start:end], strict=True)),
    }
    assert len(set(ids[start:end])) == end - start
    if end < len(ids):  # and why it stopped there
        ident = ids[end]
        assert (
            ident in holding
            or ident in answered
            or ident in answered_before
            or tasks[end][1] != "c"
            or not ident.isascii()
            or '"' in ident
        )


def test_claim_tasks_refuses_bad_arguments() -> None:
    payload = _task("a", "c")
    with pytest.raises(ValueError):
        _speedups.claim_tasks(["a"], [payload], 2, {}, {}, {})
    with pytest.raises(ValueError):
        _speedups.claim_tasks(["a"], [], 0, {}, {}, {})
    with pytest.raises(TypeError):
        _speedups.claim_tasks(["a"], [payload], 0, {}, {}, [])  # type: ignore[arg-type]
    assert _speedups.claim_tasks([None], [payload], 0, {}, {}, {}) == 0  # type: ignore[list-item]
