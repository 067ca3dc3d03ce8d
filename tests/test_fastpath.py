"""workers._fastpath, the compiled answer to a plain `Compute` task, against the Python path
(`workers.tasks._plain_compute_result`), which stays the reference: byte for byte the same
result wherever the compiled one answers, and it declines only what it must leave to Python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from node.protocol import codec
from node.protocol import messages as m
from shm import native
from workers import tasks
from workers.expr import MAX_EXPRESSION_BYTES

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
    custom = tasks.TaskRunner(tasks.WorkerSettings(executors={"Compute": "json:dumps"}))
    assert custom._compiled_plain is None


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
