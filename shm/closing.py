"""`with` support for the shm objects that own a file descriptor, a mapping or a lock."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Leaving a `with` block calls `close()`; subclasses implement it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
