"""shm.bytesjson against the orjson baseline, for 1 MiB and 16 MiB of random bytes.

    pytest bench/bench_bytesjson.py --benchmark-enable      (pytest-benchmark table, per group)
    python bench/bench_bytesjson.py [--sizes 1MiB 16MiB] [--rounds N]
                                                             (MB/s of the blob, and the speed-up)

The baseline is what the node would do without shm.bytesjson: ``bytes(orjson.loads(text))`` to
decode, ``orjson.dumps(list(data))`` to encode. MB/s counts blob bytes (the JSON text is about
3.6 times longer for random bytes). "decode numpy" and "encode numpy" are ours without the
compiled part (``shm._bytesjson``), as an install without a C compiler runs them.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from shm import bytesjson
from shm.bytesjson import decode_byte_array, encode_byte_array

SIZES = {"1MiB": 1 << 20, "16MiB": 16 << 20}


def orjson_decode(text: bytes) -> bytes:
    return bytes(orjson.loads(text))


def without_compiled(function: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    """`function` as an install without a C compiler runs it: numpy decodes, orjson's numpy
    serializer encodes."""

    def fallback(arg: bytes) -> bytes:
        saved, bytesjson._compiled = bytesjson._compiled, None
        try:
            return function(arg)
        finally:
            bytesjson._compiled = saved

    return fallback


numpy_decode = without_compiled(decode_byte_array)
numpy_encode = without_compiled(encode_byte_array)


def orjson_encode(data: bytes) -> bytes:
    return orjson.dumps(list(data))


@pytest.fixture(scope="module", params=list(SIZES))
def blob(request: pytest.FixtureRequest) -> tuple[str, bytes, bytes]:
    data = os.urandom(SIZES[request.param])
    return request.param, data, orjson.dumps(list(data))


def _run(
    benchmark: Any, group: str, size: int, function: Callable[[bytes], bytes], arg: bytes
) -> bytes:
    benchmark.group = group
    result: bytes = benchmark.pedantic(function, args=(arg,), rounds=5, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["MB/s"] = round(size / 1e6 / benchmark.stats.stats.mean, 1)
    return result


def test_decode_ours(benchmark: Any, blob: tuple[str, bytes, bytes]) -> None:
    name, data, text = blob
    assert _run(benchmark, f"decode {name}", len(data), decode_byte_array, text) == data


def test_decode_numpy(benchmark: Any, blob: tuple[str, bytes, bytes]) -> None:
    name, data, text = blob
    assert _run(benchmark, f"decode {name}", len(data), numpy_decode, text) == data


def test_decode_orjson(benchmark: Any, blob: tuple[str, bytes, bytes]) -> None:
    name, data, text = blob
    assert _run(benchmark, f"decode {name}", len(data), orjson_decode, text) == data


def test_encode_ours(benchmark: Any, blob: tuple[str, bytes, bytes]) -> None:
    name, data, text = blob
    assert _run(benchmark, f"encode {name}", len(data), encode_byte_array, data) == text


def test_encode_orjson(benchmark: Any, blob: tuple[str, bytes, bytes]) -> None:
    name, data, text = blob
    assert _run(benchmark, f"encode {name}", len(data), orjson_encode, data) == text


def _best(function: Callable[[bytes], bytes], arg: bytes, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function(arg)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description="shm.bytesjson against the orjson baseline: MB/s of decoding and encoding "
        "a JSON byte array of random bytes, and the speed-up (best of interleaved rounds).",
    )
    parser.add_argument(
        "--sizes", nargs="+", choices=list(SIZES), default=list(SIZES),
        help=f"blob sizes to measure (default: {' '.join(SIZES)})",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds per function, best kept (default 5)"
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print(f"{'':20}{'ours MB/s':>12}{'orjson MB/s':>13}{'speed-up':>10}")
    for name in args.sizes:
        size = SIZES[name]
        data = os.urandom(size)
        text = orjson.dumps(list(data))
        pairs = {
            "decode": (decode_byte_array, orjson_decode, text),
            "decode numpy": (numpy_decode, orjson_decode, text),
            "encode": (encode_byte_array, orjson_encode, data),
            "encode numpy": (numpy_encode, orjson_encode, data),
        }
        if bytesjson._compiled is None:  # "decode" and "encode" are the fallbacks already
            del pairs["decode numpy"], pairs["encode numpy"]
        for operation, (ours, baseline, arg) in pairs.items():
            # Interleaved rounds, best of each: fair on a machine that is busy with other work.
            ours_best = baseline_best = float("inf")
            for _ in range(args.rounds):
                ours_best = min(ours_best, _best(ours, arg, 1))
                baseline_best = min(baseline_best, _best(baseline, arg, 1))
            print(
                f"{operation + ' ' + name:20}{size / 1e6 / ours_best:12.0f}"
                f"{size / 1e6 / baseline_best:13.0f}{baseline_best / ours_best:9.1f}x"
            )


if __name__ == "__main__":
    main()
