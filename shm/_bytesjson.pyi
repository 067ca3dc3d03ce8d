"""Type stub of the compiled decoder (shm/_bytesjson.c)."""

from typing_extensions import Buffer

def decode(text: Buffer, start: int, stop: int, /) -> tuple[bytes | None, int, int]: ...
