"""Replacing a file atomically and durably (join.json, the master's journal compaction)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


def replace_atomically(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write a new `path` through `fill(file)`: readers see the old file or the new one, never
    half of it, and the new one survives a crash once this returns. The temporary file is
    created mode 0600 (mkstemp), whatever the umask. Raises OSError; leaves nothing behind."""
    directory = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            fill(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is on disk too.
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
