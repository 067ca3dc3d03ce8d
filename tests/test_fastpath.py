"""workers._fastpath, the compiled answer to a plain `Compute` task, against the Python path
(`workers.tasks._plain_compute_result`), which stays the reference: byte for byte the same
result wherever the compiled one answers, and it declines only what it must leave to Python."""

from __future__ import annotations

import json
from array import array
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder
from shm import native
from workers import tasks, worker
from workers.expr import MAX_EXPRESSION_BYTES
from workers.stats import BUCKETS_NS, COMPLETED, FAILED, FIRST_BUCKET, TaskStats

from .test_expr import PLAIN_EXPRESSIONS

if native.skipped_on_purpose():
    pytest.importorskip("workers._fastpath", reason="installed with CPNODE_NO_EXTENSION")
from workers import _fastpath as fastpath

VECTORS = Path(__file__).parent / "data" / "compute_vectors.jsonl"
IDS = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12
) | st.text(max_size=4)


def python_answer(payload: bytes) -> bytes | None:
    plain = tasks._PLAIN_COMPUTE(payload)
    return None if plain is None else tasks._plain_compute_result(*plain.groups())


def check(payload: bytes) -> bytes | None:
    """The compiled answer, asserted to be the Python path's; when it declines, the Python
    path must decline too, or the value be one that Python's repr writes with an exponent
    (serde_json and orjson write 0.00001 where repr writes 1e-05: only Python formats those)."""
    compiled = fastpath.plain_result(payload)
    python = python_answer(payload)
    if compiled is None:
        if python is not None:
            value = abs(float(python.rpartition(b'"Number":')[2][:-3]))
            assert value != 0.0 and (value < 1e-4 or value >= 1e16), (payload, python)
    else:
        assert compiled == python, payload
    return compiled


def test_the_runner_uses_the_compiled_path() -> None:
    assert tasks._compiled_plain_result is fastpath.plain_result
    runner = tasks.TaskRunner(tasks.WorkerSettings())
    assert runner._compiled_plain is fastpath.plain_result
    payload = codec.encode_payload(m.AssignTask("t1", m.Compute("1+2*3")))
    assert fastpath.plain_result(payload) == b'{"TaskResult":{"id":"t1","result":{"Number":7.0}}}'
    assert runner.run_payload(payload) == fastpath.plain_result(payload)
    # A task type replaced by an executor of the operator's turns the fast paths off.
    assert runner.plain_batch is fastpath.plain_batch  # the worker's loop runs runs with it
    custom = tasks.TaskRunner(tasks.WorkerSettings(executors={"Compute": "json:dumps"}))
    assert custom._compiled_plain is None and custom.plain_batch is None


@settings(max_examples=1500)
@given(ident=IDS, text=PLAIN_EXPRESSIONS)
@example(ident="t", text="0.1+0.2").via("a float that needs 17 digits")
@example(ident="t", text="1e15*9.99").via("the largest results Python writes without exponent")
@example(ident="t", text="1e16").via("where Python writes an exponent and serde_json does not")
@example(ident="t", text="0.0001*1").via("the smallest fixed-point result")
@example(ident="t", text="0*1-0").via("zero")
@example(ident="t", text="0-0*1").via("a signed zero: 0 - 0 is 0, 0 * -1 is unreachable")
def test_plain_tasks_are_answered_like_the_python_path(ident: str, text: str) -> None:
    check(codec.encode_payload(m.AssignTask(ident, m.Compute(text))))


@settings(max_examples=1500)
@given(st.floats(min_value=0.0, allow_nan=False, allow_infinity=False), st.sampled_from("*/+-%"))
def test_every_double_is_written_like_the_python_path(value: float, operator: str) -> None:
    # repr() is a plain number (digits, a point, an exponent): the value goes through the
    # reader and the writer whole.
    check(codec.encode_payload(m.AssignTask("x", m.Compute(f"{value!r}{operator}1"))))


@given(st.binary(max_size=120))
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}}}}')
@example(b'{"AssignTask":{"id":"a\\"b","task":{"Compute":{"expression":"1"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1\\t+2"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":""}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1e"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"-1"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1+"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1 2"}}}}')
@example(b'{"AssignTask":{"id":"\xc3\xa9","task":{"Compute":{"expression":"1"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}}}} ')
@example(b'{"AssignTask":{"id":"a","task":{"ComplexMath":{"expression":"1"}}}}')
@example(b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"1"}}}')
def test_anything_else_is_declined(junk: bytes) -> None:
    prefix = b'{"AssignTask":{"id":"a","task":{"Compute":{"expression":"'
    for payload in (junk, prefix + junk, prefix + junk + b'"}}}}'):
        check(payload)


def test_a_payload_that_is_not_bytes_is_declined() -> None:
    payload = codec.encode_payload(m.AssignTask("t", m.Compute("1+1")))
    assert fastpath.plain_result(payload) is not None
    for other in (bytearray(payload), memoryview(payload), payload.decode(), None):
        assert fastpath.plain_result(other) is None


def test_expression_length_limit_matches_the_python_path() -> None:
    for length in (MAX_EXPRESSION_BYTES, MAX_EXPRESSION_BYTES + 1):
        text = "1" + "+1" * ((length - 1) // 2) + " " * ((length - 1) % 2)
        assert len(text) == length
        payload = codec.encode_payload(m.AssignTask("t", m.Compute(text)))
        answer = check(payload)
        assert (answer is not None) == (length <= MAX_EXPRESSION_BYTES)


def test_the_upstream_corpus_is_answered_as_upstream_did() -> None:
    answered = 0
    for line in VECTORS.read_text().splitlines():
        vector = json.loads(line)
        task = vector["task"].get("Compute")
        if task is None:
            continue
        payload = codec.encode_payload(m.AssignTask("v", m.Compute(task["expression"])))
        answer = check(payload)
        if answer is not None:
            assert json.loads(answer)["TaskResult"]["result"] == vector["result"], line
            answered += 1
    assert answered >= 10  # the corpus's plain expressions


# ------------------------------------------------------------------ plain_batch


def _slot(run_limit: int = worker.NO_RUN_LIMIT, seq: int = 0) -> memoryview:
    """A progress slot as a worker's loop leaves it after `seq` tasks."""
    slot = memoryview(bytearray(8 * worker.PROGRESS_FIELDS)).cast("q")
    slot[worker.RUN_LIMIT] = run_limit
    slot[worker.STARTED] = slot[worker.FINISHED] = seq
    return slot


def _counts() -> array[int]:
    return array("q", bytes(8 * (len(BUCKETS_NS) + 1)))


def _batch(
    payloads: list[bytes],
    start: int = 0,
    most: int = 1 << 20,
    slot: memoryview | None = None,
    seq: int = 0,
    limit: int = 1 << 20,
    budget_ns: int = 10**12,
) -> tuple[int, list[bytes], memoryview, array[int], int]:
    slot = _slot(seq=seq) if slot is None else slot
    counts = _counts()
    end, frames, nanoseconds = fastpath.plain_batch(
        payloads, start, most, budget_ns, slot, seq, limit, BUCKETS_NS, counts
    )
    return end, FrameDecoder().feed(frames), slot, counts, nanoseconds


PAYLOADS = st.lists(
    st.sampled_from(["1+2", "7/2", "2^3", "1/0", "x", "3*4-5", "0.1+0.2", "1e300*1e300"]).map(
        lambda text: codec.encode_payload(m.AssignTask("t", m.Compute(text)))
    ),
    max_size=30,
)


@settings(max_examples=400)
@given(PAYLOADS, st.integers(0, 30), st.integers(0, 30), st.integers(0, 1000))
def test_plain_batch_runs_a_run_as_plain_result_answers_each(
    payloads: list[bytes], start: int, most: int, seq: int
) -> None:
    start = min(start, len(payloads))
    end, frames, slot, counts, nanoseconds = _batch(payloads, start, most, seq=seq)
    answers = [fastpath.plain_result(p) for p in payloads]
    # The run from `start` that plain_result answers, at most `most` of it.
    expected_end = start
    while expected_end < min(len(payloads), start + most) and answers[expected_end] is not None:
        expected_end += 1
    assert end == expected_end
    assert frames == answers[start:end]
    ran = end - start
    assert slot[worker.STARTED] == slot[worker.FINISHED] == seq + ran
    assert (slot[worker.STARTED_AT_NS] > 0) == (ran > 0)  # a declined task is not recorded
    assert sum(counts) == ran and nanoseconds >= 0


def test_plain_batch_stops_at_the_run_limit_and_at_an_oversized_result() -> None:
    payloads = [codec.encode_payload(m.AssignTask(f"t{i}", m.Compute(f"{i}+1"))) for i in range(6)]
    end, frames, slot, _, _ = _batch(payloads, slot=_slot(run_limit=12, seq=10), seq=10)
    assert end == 2 and len(frames) == 2  # tasks 11 and 12 run; 13 is past the limit
    assert slot[worker.STARTED] == slot[worker.FINISHED] == 12
    assert slot[worker.SKIPPED_FROM] == 0  # 13 is skipped, and recorded, by the Python loop
    # A result above max_frame_bytes is left to the Python path (which answers an Error).
    size = len(fastpath.plain_result(payloads[0]) or b"")
    assert _batch(payloads, limit=size)[0] == 6
    assert _batch(payloads, limit=size - 1)[0] == 0
    runner = tasks.TaskRunner(tasks.WorkerSettings(max_frame_bytes=size - 1))
    assert codec.decode(runner.run_payload(payloads[0])) == m.TaskResult(
        "t0",
        m.Error(
            f"the result would be a frame of {size} bytes, above the limit of {size - 1} bytes"
            " (max_frame_bytes)"
        ),
    )
    # A run stops once budget_ns has passed, after at least one task.
    assert _batch(payloads, budget_ns=0)[0] == 1


def test_plain_batch_counts_like_task_stats() -> None:
    payloads = [codec.encode_payload(m.AssignTask("a", m.Compute("1")))] * 5
    end, _, _, counts, nanoseconds = _batch(payloads)
    stats = TaskStats()
    stats.record_counted("Compute", nanoseconds / 1e9, counts)
    row = stats.rows["Compute"]
    assert end == 5 and row[COMPLETED] == 5 and row[FAILED] == 0
    assert sum(row[FIRST_BUCKET:]) == 5 and list(counts) == [0] * len(counts)
    # The bucket rule is `record`'s (bisect_left): a time up to a bound counts below it.
    for bounds, expected in [([10**12], [5, 0]), ([0], [0, 5]), ([0, 10**12], [0, 5, 0])]:
        counts = array("q", [0] * (len(bounds) + 1))
        fastpath.plain_batch(
            payloads, 0, 9, 10**12, _slot(), 0, 1 << 20, array("q", bounds), counts
        )
        assert list(counts) == expected


def test_plain_batch_out_of_memory_leaves_no_trace() -> None:
    """Each allocation in turn fails (alone, or with every later one): the call either answers a
    run (recorded in the slot and the counts) or raises MemoryError with the slot and the counts
    as they were, also after tasks ran (the worker's loop then runs them in Python, with the
    same sequence numbers)."""
    testcapi = pytest.importorskip("_testcapi")
    payloads = [
        codec.encode_payload(m.AssignTask(f"t{i}", m.Compute(f"{i}+0.5"))) for i in range(6)
    ]
    for alone, expected in [(True, {"raised", "answered some", "answered all"}),
                            (False, {"raised", "answered all"})]:  # fmt: skip
        outcomes = set()
        for failing in range(40):
            slot, counts = _slot(), _counts()
            slot[worker.STARTED] = slot[worker.FINISHED] = 7
            testcapi.set_nomemory(failing, failing + 1 if alone else 0)
            try:
                answer = fastpath.plain_batch(
                    payloads, 0, 99, 10**12, slot, 7, 1 << 20, BUCKETS_NS, counts
                )
            except MemoryError:
                answer = None
            finally:
                testcapi.remove_mem_hooks()
            if answer is None:
                outcomes.add("raised")
                assert (slot[worker.STARTED], slot[worker.FINISHED], sum(counts)) == (7, 7, 0)
            else:
                end, frames, _ = answer
                outcomes.add("answered all" if end == len(payloads) else "answered some")
                assert slot[worker.STARTED] == slot[worker.FINISHED] == 7 + end
                assert sum(counts) == end and len(FrameDecoder().feed(frames)) == end
        assert outcomes == expected, alone


def test_a_task_taken_back_is_not_claimed() -> None:
    """The supervisor takes back tasks 5-9 (`STARTED` 4 -> 9) while task 4 runs: the worker's
    claim of task 5 (4 -> 5) fails, in `plain_batch` too, which then runs nothing and records
    nothing; task 10 is claimed (9 -> 10)."""
    cas = fastpath.compare_and_swap
    payloads = [codec.encode_payload(m.AssignTask(f"t{i}", m.Compute(f"{i}+1"))) for i in range(3)]
    slot = _slot(seq=4)
    assert cas(slot, worker.STARTED, 4, 9)
    assert not cas(slot, worker.STARTED, 4, 5) and slot[worker.STARTED] == 9
    counts = _counts()
    end, frames, _ = fastpath.plain_batch(
        payloads, 0, 9, 10**12, slot, 4, 1 << 20, BUCKETS_NS, counts
    )
    assert (end, frames, sum(counts)) == (0, b"", 0)
    assert (slot[worker.STARTED], slot[worker.FINISHED]) == (9, 4)
    slot[worker.FINISHED] = 9  # the worker's loop skips 5-9
    end, frames, _ = fastpath.plain_batch(
        payloads, 0, 9, 10**12, slot, 9, 1 << 20, BUCKETS_NS, counts
    )
    assert end == 3 and slot[worker.STARTED] == slot[worker.FINISHED] == 12
    with pytest.raises(ValueError):
        cas(slot, worker.PROGRESS_FIELDS, 0, 1)
    with pytest.raises(ValueError):
        cas(slot, -1, 0, 1)
    for huge in (2**60, 2**61, 2**61 + 2):  # (index + 1) * 8 would wrap around
        with pytest.raises(ValueError):
            cas(slot, huge, 0, 1)
    with pytest.raises(BufferError):
        cas(bytes(32), 0, 0, 1)


def test_plain_batch_refuses_bad_buffers() -> None:
    payloads = [codec.encode_payload(m.AssignTask("a", m.Compute("1")))]
    run = fastpath.plain_batch
    with pytest.raises(ValueError):  # a slot too short
        run(
            payloads, 0, 9, 10**9, memoryview(bytearray(16)).cast("q"), 0, 99, BUCKETS_NS, _counts()
        )
    with pytest.raises(ValueError):  # counts too short
        run(payloads, 0, 9, 10**9, _slot(), 0, 99, BUCKETS_NS, array("q", [0]))
    with pytest.raises(BufferError):  # a read-only slot
        run(payloads, 0, 9, 10**9, memoryview(bytes(64)), 0, 99, BUCKETS_NS, _counts())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        run(payloads, 2, 9, 10**9, _slot(), 0, 99, BUCKETS_NS, _counts())
    assert run([b"x", *payloads], 0, 9, 10**9, _slot(), 0, 99, BUCKETS_NS, _counts())[0] == 0
    with pytest.raises(ValueError):  # a negative seq
        run(payloads, 0, 9, 10**9, _slot(), -1, 99, BUCKETS_NS, _counts())
    with pytest.raises(OverflowError):
        run(payloads, 0, 9, 1 << 70, _slot(), 0, 99, BUCKETS_NS, _counts())
