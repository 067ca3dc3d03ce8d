"""Log output of every cpnode process: human-readable text, or one JSON object per line.

    logging record ──TextFormatter──▶ 2024-05-01 12:00:00,123 INFO cpnode.link: connected ...
                   ──JsonFormatter──▶ {"ts":"2024-05-01T12:00:00.123Z","level":"info",
                                       "logger":"cpnode.link","message":"connected ...", ...}

The supervisor and its workers write to the same stderr, so both configure logging here (it
lives in `workers` because workers may not import `node`). Level names are upstream's: `error`,
`warn`, `info`, `debug`, `trace` (5, below DEBUG) and `off`. A JSON line carries the record's
`extra=` fields and the process's static fields (a worker's index) beside the four standard
ones, and `exc` with the traceback when there is one. What a process logs before it knows how
(a config file's warnings, read before the config gives the format and level) is held by
`HeldRecords` until `configure_logging` has run.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Final, TextIO

import orjson

TRACE: Final = 5
LEVELS: Final[Mapping[str, int]] = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logging.addLevelName(TRACE, "TRACE")

_HANDLER_NAME: Final = "cpnode-stderr"

_UPSTREAM_NAMES: Final = {
    logging.CRITICAL: "error",
    logging.ERROR: "error",
    logging.WARNING: "warn",
    logging.INFO: "info",
    logging.DEBUG: "debug",
    TRACE: "trace",
}
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def level_name(levelno: int) -> str:
    """The upstream name of a level number (`warn` for WARNING); other numbers as digits."""
    return _UPSTREAM_NAMES.get(levelno) or logging.getLevelName(levelno).lower()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ms), level, logger, message, then extra fields."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _utc(record.created),
            "level": level_name(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        line.update(self.static)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=repr).decode()


def _utc(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure_logging(
    level: str,
    log_format: str,
    *,
    text_format: str = TEXT_FORMAT,
    static: Mapping[str, object] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Send this process's log records to stderr at `level` (an upstream name) in `log_format`.

    Replaces the handler an earlier call installed, so calling it again (a worker forked from a
    configured process) does not print every line twice; other handlers stay.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(static))
    else:
        handler.setFormatter(logging.Formatter(text_format))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in root.handlers[:]:
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level])


_HOLD_EVERY_LEVEL: Final = 1  # below TRACE (5): no level `configure_logging` sets


class HeldRecords(logging.Handler):
    """`with HeldRecords():` holds what is logged in the block (a config file's warnings, say,
    logged before that config gives the log's format and level) and logs it at the block's end,
    once, through the handlers configured meanwhile and at their level (with none, Python's last
    resort prints warnings and errors as they are). Until logging is configured, the block
    holds records of every level (the root logger's WARNING would drop an INFO one before the
    configured level could take it); configure logging last in the block."""

    def __init__(self) -> None:
        super().__init__()
        self._records: list[logging.LogRecord] = []
        self._level = logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)

    def __enter__(self) -> HeldRecords:
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(_HOLD_EVERY_LEVEL)
        root.addHandler(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        if root.level == _HOLD_EVERY_LEVEL:  # not configured in the block (it failed)
            root.setLevel(self._level)
        records, self._records = self._records, []
        for record in records:
            logger = logging.getLogger(record.name)
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
