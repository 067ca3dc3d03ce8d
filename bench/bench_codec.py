"""Encode/decode cost per frame of the two hottest frames (pytest-benchmark).

tox -e bench -- bench/bench_codec.py
python -m pytest bench/bench_codec.py -o python_files='bench_*.py' --benchmark-enable
"""

from __future__ import annotations

from typing import Any

from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder

ASSIGN = m.AssignTask("task-000123", m.Compute("3+4*2"))
RESULT = m.TaskResult("task-000123", m.Number(11.0))
ASSIGN_FRAME = codec.encode(ASSIGN)
RESULT_FRAME = codec.encode(RESULT)


def test_encode_assign_compute(benchmark: Any) -> None:
    assert benchmark(codec.encode, ASSIGN) == ASSIGN_FRAME


def test_decode_assign_compute(benchmark: Any) -> None:
    def decode() -> m.Message:
        return codec.decode(FrameDecoder().feed(ASSIGN_FRAME)[0])

    assert benchmark(decode) == ASSIGN


def test_peek_assign_id(benchmark: Any) -> None:
    payload = ASSIGN_FRAME[4:]
    assert benchmark(codec.assign_task_id, payload) == "task-000123"


def test_encode_result_number(benchmark: Any) -> None:
    assert benchmark(codec.encode, RESULT) == RESULT_FRAME


def test_decode_result_number(benchmark: Any) -> None:
    def decode() -> m.Message:
        return codec.decode(FrameDecoder().feed(RESULT_FRAME)[0])

    assert benchmark(decode) == RESULT


def test_split_1000_frames(benchmark: Any) -> None:
    stream = ASSIGN_FRAME * 1000

    def split() -> int:
        return len(FrameDecoder().feed(stream))

    assert benchmark(split) == 1000
