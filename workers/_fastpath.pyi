"""Type stub of the worker's compiled hot path (workers/_fastpath.c)."""

from array import array

def plain_result(payload: object, /) -> bytes | None: ...
def plain_batch(
    payloads: list[bytes],
    start: int,
    most: int,
    budget_ns: int,
    progress: memoryview,
    seq: int,
    max_result_bytes: int,
    bounds_ns: array[int],
    counts: array[int],
    /,
) -> tuple[int, bytes, int]: ...
def set_max_expression_bytes(limit: int, /) -> None: ...
