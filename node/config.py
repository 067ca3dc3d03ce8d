"""Config file and `join.json` loading, checked before the node starts anything.

    config.json ──json──▶ object ──per-field checks──▶ Config (frozen)   ◀── overrides (CLI)
    join.json + CPCLUSTER_JOIN / CPCLUSTER_TOKEN ──▶ JoinInfo             ──▶ write_join (master)

The config file is the upstream one, field for field, plus the settings only cpnode has. Every
field is declared once, in `Config`, with its default, its check and a one-line meaning; the
validation, `CONFIG_FIELDS` and the Markdown reference (`config_reference_markdown`) all read that
one declaration. Unlike upstream, a config that cannot be read or checked is never replaced by the
defaults: it raises `ConfigError` naming the file, the field, the bad value and what is expected.
Fields this node does not know (an upstream master's or a newer upstream's) are logged and ignored
so one file can serve the upstream node, the upstream master and cpnode alike.

Relative paths in the config (`storage_dir`, `state_file`, ...) are relative to the working
directory, as upstream reads them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import ipaddress
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

from node.errors import ConfigError
from node.files import replace_atomically
from node.protocol.messages import Role
from workers.logformat import FORMATS as LOG_FORMATS
from workers.logformat import LEVELS as LOG_LEVELS

__all__ = [
    "CONFIG_FIELDS",
    "DEFAULT_JOIN_PATH",
    "MIN_TASK_TIMEOUT_MS",
    "Config",
    "FieldSpec",
    "JoinInfo",
    "Role",
    "config_reference_markdown",
    "default_join_path",
    "format_address",
    "is_local_ip",
    "load_config",
    "load_join",
    "parse_address",
    "parse_role",
    "plain_peer_refusal",
    "write_join",
]

_log = logging.getLogger("cpnode.config")

DEFAULT_JOIN_PATH: Final = "join.json"
_DEFAULT_MASTER_IP: Final = "127.0.0.1"
_DEFAULT_MASTER_PORT: Final = 55000
# A config or join file is a few KiB; the cap keeps a path such as /dev/zero from hanging start-up.
_MAX_FILE_BYTES: Final = 1 << 20
# Well above the 20 ms after which a worker's flusher thread sends the results held back by a
# long task (workers/worker.py, SLOW_TASK_FLUSH_S) plus the GIL's 5 ms switch interval, and the
# pool's 10 ms watchdog period (workers/pool.py, `_watch`): a worker killed for the limit then
# has sent the results of the tasks it finished before the overdue one.
MIN_TASK_TIMEOUT_MS: Final = 100


def parse_role(text: str) -> Role:
    """Read a role typed on a command line, in any case (`disk`, `Disk`, `DISK`)."""
    wanted = text.strip().lower()
    for role in Role:
        if role.value.lower() == wanted:
            return role
    names = ", ".join(role.value for role in Role)
    raise ConfigError(f"unknown role {text!r}: expected one of {names} (any case)")


# --- addresses -------------------------------------------------------------------------------

# Underscores are outside RFC 1123, but container and compose service names use them and resolve.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT_DIGITS = re.compile(r"[0-9]{1,5}")

# The upstream rule (cpcluster_common::is_local_ip): these talk plain TCP, everything else TLS.
_LOCAL_NETWORKS: Final = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "::1/128",
        "fc00::/7",
    )
)


class _BadAddress(ValueError):
    """An address failed to parse; `reason` is the short why, for config messages."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid address {text!r}: {reason}")
        self.reason = reason


def _host_problem(host: str) -> str | None:
    """Why `host` is neither an IP address nor a host name, or None when it is fine."""
    if not host:
        return "missing host"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f'"{host}" is not an IPv6 address'
        return None
    if re.fullmatch(r"[0-9.]+", host):
        # All digits and dots cannot be a host name, so it must be a well-formed IPv4 address.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f'"{host}" is not an IPv4 address'
        return None
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        return f'"{host}" is not a host name'
    return None


def _split_address(text: str) -> tuple[str, int]:
    if not text or any(ch.isspace() for ch in text):
        raise _BadAddress(text, "empty" if not text else "contains whitespace")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise _BadAddress(text, 'missing "]"')
        if not rest.startswith(":"):
            raise _BadAddress(text, 'missing ":port" after "]"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _BadAddress(text, f'"{host}" is not an IPv6 address') from None
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise _BadAddress(text, 'missing ":port"')
        if ":" in host:
            raise _BadAddress(text, 'an IPv6 address needs brackets, as in "[::1]:55000"')
        problem = _host_problem(host)
        if problem is not None:
            raise _BadAddress(text, problem)
    if not port_text:
        raise _BadAddress(text, "missing port number")
    if not _PORT_DIGITS.fullmatch(port_text):
        raise _BadAddress(text, f'port "{port_text}" is not a number from 1 to 65535')
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _BadAddress(text, f"port {port} is out of range 1-65535")
    return host, port


def port_argument(text: str) -> int:
    """argparse type of a TCP port number on a command line (1-65535)."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def seconds_argument(*, allow_zero: bool = False) -> Callable[[str], float]:
    """argparse type of a finite number of seconds on a command line: above 0, or at least 0
    with `allow_zero`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number of seconds, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            wanted = "0 or more seconds" if allow_zero else "a positive number of seconds"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def host_argument(text: str) -> str:
    """argparse type of a master's host on a command line (an IP address or host name)."""
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    problem = _host_problem(host)
    if problem is not None:
        raise argparse.ArgumentTypeError(
            f"expected an IP address or host name, got {text!r} ({problem})"
        )
    return host


def parse_address(text: str) -> tuple[str, int]:
    """Split `"host:port"` or `"[v6]:port"` into (host, port); IPv6 hosts come back unbracketed.

    Raises ValueError naming the address and what is wrong with it.
    """
    return _split_address(text)


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`: brackets an IPv6 host so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local_ip(host: str) -> bool:
    """True when the master at `host` is spoken to over plain TCP, False when over TLS.

    Upstream's rule: loopback and private ranges (10/8, 172.16/12, 192.168/16, 127/8, ::1,
    fc00::/7) are local. Unlike upstream, `localhost` (and `*.localhost`, which RFC 6761 reserves
    for loopback) counts as local too; any other host name is not, since it may resolve anywhere.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    name = text.lower().removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(ip in net for net in _LOCAL_NETWORKS)


def plain_peer_refusal(host: str, mode: str, peer: object) -> str | None:
    """Why the token must not go over plain TCP to `peer` (a socket's `getpeername()`), dialed
    as `host` under `tls = mode`; None when it may.

    Under `auto`, plain TCP is chosen by the name before it is resolved: `localhost` and
    `*.localhost` count as local (`is_local_ip`). A resolver may map such a name anywhere (glibc
    asks DNS for `*.localhost`), so the address actually reached must be local too, or the
    token would travel in the clear to whoever answers there. `never` is the operator's
    explicit choice, and an address given as an IP was judged as such.
    """
    if mode != "auto" or _is_ip_literal(host):
        return None
    address = peer[0] if isinstance(peer, tuple) and peer else None
    if isinstance(address, str):
        with contextlib.suppress(ValueError):  # ::ffff:127.0.0.1 from a dual-stack socket
            mapped = ipaddress.IPv6Address(address.partition("%")[0]).ipv4_mapped
            address = str(mapped) if mapped is not None else address
        if is_local_ip(address):
            return None
    return (
        f"{host} resolved to {address or 'an unknown address'}, which is not a loopback or "
        "private address: the token is not sent there over plain TCP (name the address, or set "
        'tls to "always")'
    )


def _is_ip_literal(host: str) -> bool:
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --- field checks ----------------------------------------------------------------------------


class _Invalid(Exception):
    """A value failed a check; the loader turns it into a ConfigError naming file and field."""

    def __init__(self, expected: str, value: object, *, where: str = "", note: str = "") -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value
        self.where = where
        self.note = note


def _show(value: object) -> str:
    """Render a bad value as the JSON the operator wrote (`true`, not `True`), kept short."""
    if isinstance(value, _Hidden):
        return f"{value} (not shown)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: object) -> str:
    """Name a JSON value's kind, for messages about the shape of a whole file."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _explain(source: str, name: str, bad: _Invalid) -> str:
    """The one shape of every field message: source, field, what it must be, what it was."""
    line = f"{source}: `{name}{bad.where}` must be {bad.expected}, got {_show(bad.value)}"
    return f"{line} ({bad.note})" if bad.note else line


class _Check:
    """Validate one value and return it in canonical form; raise `_Invalid` otherwise."""

    expected: str

    def __call__(self, value: object) -> object:
        raise NotImplementedError

    def fail(self, value: object, *, note: str = "") -> NoReturn:
        raise _Invalid(self.expected, value, note=note)


class _Integer(_Check):
    def __init__(self, low: int, high: int | None = None) -> None:
        self.low = low
        self.high = high
        if high is not None:
            self.expected = f"an integer from {low} to {high}"
        elif low == 0:
            self.expected = "a non-negative integer"
        elif low == 1:
            self.expected = "a positive integer"
        else:
            self.expected = f"an integer of at least {low}"

    def __call__(self, value: object) -> int:
        # JSON has one number type and Python's bool is an int: both would slip through an
        # isinstance check, and upstream (serde, u64) refuses `true` and `5.0` alike.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(value)
        if value < self.low or (self.high is not None and value > self.high):
            self.fail(value)
        return value


class _OffOrAtLeast(_Check):
    """0 (off), or an integer of at least `low`; `why` explains the bound to whoever set less."""

    def __init__(self, low: int, why: str) -> None:
        self.low = low
        self.why = why
        self.expected = f"0 (off) or an integer of at least {low}"

    def __call__(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(value)
        if 0 < value < self.low:
            self.fail(value, note=self.why)
        return value


class _Text(_Check):
    expected = "a non-empty string"

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(value)
        return value


class _Secret(_Text):
    """A token: a bad one is described by its kind, not shown (error messages reach logs),
    unless it is blank."""

    def fail(self, value: object, *, note: str = "") -> NoReturn:
        blank = isinstance(value, str) and not value.strip()
        raise _Invalid(self.expected, value if blank else _Hidden(_describe(value)), note=note)


class _Hidden(str):
    """What `_show` prints instead of a secret value."""


class _Path(_Text):
    # The OS takes no NUL in a path: a storage_dir holding one failed only when first used.
    expected = "a path (a non-empty string without NUL characters)"

    def __call__(self, value: object) -> str:
        if super().__call__(value).find("\0") >= 0:
            self.fail(value)
        return str(value)


class _NodeId(_Check):
    # It names files in shm_dir and the lock beside them, so nothing that could leave that
    # directory or hide a file (no "/", no "..", no leading dot).
    expected = 'a name of 1-64 letters, digits, ".", "_" or "-", starting with a letter or digit'
    _pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not self._pattern.fullmatch(value):
            self.fail(value)
        return value


class _Address(_Check):
    expected = 'a "host:port" address (IPv6 as "[::1]:55000")'

    def __call__(self, value: object) -> str:
        if not isinstance(value, str):
            self.fail(value)
        try:
            _split_address(value)
        except _BadAddress as bad:
            self.fail(value, note=bad.reason)
        return value


class _Network(_Check):
    expected = 'a CIDR network such as "10.0.0.0/8" or "fe80::/10"'

    def __call__(self, value: object) -> str:
        if not isinstance(value, str):
            self.fail(value)
        try:
            return str(ipaddress.ip_network(value.strip()))
        except ValueError as error:
            try:
                loose = ipaddress.ip_network(value.strip(), strict=False)
            except ValueError:
                self.fail(value, note=str(error))
            self.fail(value, note=f"host bits set; did you mean {str(loose)!r}?")


class _RoleName(_Check):
    expected = "one of " + ", ".join(f'"{role.value}"' for role in Role)

    def __call__(self, value: object) -> Role:
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            for role in Role:
                if role.value == value:
                    return role
            for role in Role:
                if role.value.lower() == value.strip().lower():
                    # Upstream reads the role case-sensitively; a file that loads here must
                    # load there too, so only the command line accepts other spellings.
                    self.fail(value, note=f'role names are case-sensitive: "{role.value}"')
        self.fail(value)


# Upstream's levels; `off` because the `log` crate upstream parses it too. trace sits below DEBUG.
# Workers configure their logging from the same table.
_LOG_LEVELS: Final = LOG_LEVELS


class _LogLevel(_Check):
    expected = 'one of "error", "warn", "info", "debug", "trace" or "off"'

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in _LOG_LEVELS:
            self.fail(value)
        return value.strip().lower()


class _Choice(_Check):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.expected = "one of " + ", ".join(f'"{choice}"' for choice in choices)

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or value not in self.choices:
            self.fail(value)
        return value


class _Optional(_Check):
    def __init__(self, inner: _Check) -> None:
        self.inner = inner
        self.expected = f"null or {inner.expected}"

    def __call__(self, value: object) -> object:
        return None if value is None else self.inner(value)


class _ListOf(_Check):
    def __init__(self, item: _Check, expected: str, *, non_empty: bool, distinct: bool) -> None:
        self.item = item
        self.expected = expected
        self.non_empty = non_empty
        self.distinct = distinct

    def __call__(self, value: object) -> tuple[object, ...]:
        if not isinstance(value, list | tuple) or (self.non_empty and not value):
            self.fail(value)
        items = []
        for index, element in enumerate(value):
            try:
                items.append(self.item(element))
            except _Invalid as bad:
                bad.where = f"[{index}]{bad.where}"
                raise
        if self.distinct:
            seen: set[object] = set()
            for element in items:
                if element in seen:
                    self.fail(value, note=f"{_show(element)} is listed twice")
                seen.add(element)
        return tuple(items)


_PORT = _Integer(1, 65535)


# --- the config ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    check: _Check
    doc: str
    origin: str


_RULE = "cpnode.rule"


def _setting(default: object, check: _Check, doc: str, *, origin: str = "cpnode") -> Any:
    """Declare a Config field: its default, its check and its line in the reference table."""
    return field(default=default, metadata={_RULE: _Rule(check, doc, origin)})


def _upstream(default: object, check: _Check, doc: str) -> Any:
    """Declare a field of upstream's config file, with upstream's default."""
    return _setting(default, check, doc, origin="upstream")


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the node (and of the local master), checked on construction.

    List fields are tuples so a Config can be shared between tasks without copying.
    """

    min_port: int = _upstream(
        55001, _PORT, "Lowest port the master hands out in `ConnectionInfo` for direct links."
    )
    max_port: int = _upstream(
        55999, _PORT, "Highest port of that range (inclusive); at least `min_port`."
    )
    failover_timeout_ms: int = _upstream(
        5000,
        _Integer(1),
        "Heartbeat period is half of this; the master evicts a node silent for twice this.",
    )
    master_addresses: tuple[str, ...] = _upstream(
        ("127.0.0.1:55000",),
        _ListOf(
            _Address(), 'a non-empty list of "host:port" addresses', non_empty=True, distinct=False
        ),
        "Masters to connect to, in failover order.",
    )
    peer_masters: tuple[str, ...] | None = _upstream(
        None,
        _Optional(
            _ListOf(_Address(), 'a list of "host:port" addresses', non_empty=False, distinct=False)
        ),
        "Upstream master: addresses of its peer masters (`null` = none); cpnode-master ignores it.",
    )
    ca_cert_path: str | None = _upstream(
        None,
        _Optional(_Path()),
        "PEM file of the CA that signs a non-local master's certificate (after `ca_cert`).",
    )
    ca_cert: str | None = _upstream(
        None,
        _Optional(_Text()),
        "That CA as PEM text; checked first (`null` for both = the system roots).",
    )
    cert_path: str | None = _upstream(
        None,
        _Optional(_Path()),
        "PEM certificate the master (and a node's `direct_port`) presents over TLS; created "
        "self-signed when missing.",
    )
    key_path: str | None = _upstream(
        None, _Optional(_Path()), "PEM private key of `cert_path` (created with it)."
    )
    internet_ports: tuple[int, ...] | None = _upstream(
        None,
        _Optional(
            _ListOf(_PORT, "a list of distinct ports (1-65535)", non_empty=False, distinct=True)
        ),
        "Internet nodes: local ports `Tcp`/`Udp` tasks bind to (`null` = any free port).",
    )
    storage_dir: str = _upstream(
        "storage",
        _Path(),
        "Directory of `DiskWrite` files (and, on Disk nodes, `StoreData` keys); may not hold "
        "`shm_dir`.",
    )
    state_file: str = _upstream(
        "master_state.json", _Path(), "Master: file where it persists its state."
    )
    disk_space_mb: int = _upstream(
        1024,
        _Integer(0),
        "Disk nodes: quota of everything written to `storage_dir`, in MiB: file bytes, and 4 KiB "
        "for each directory.",
    )
    # _upstream returns a dataclasses.Field, like field(); ruff only trusts immutable annotations.
    role: Role = _upstream(  # noqa: RUF009
        Role.Worker,
        _RoleName(),
        "Which tasks the master sends this node (case-sensitive, as upstream reads it).",
    )
    max_retries: int = _upstream(
        5,
        _Integer(0),
        "Rounds over every master address with exponential backoff and jitter (from 0.1 s) "
        "before retrying every `retry_interval_ms`; the node never gives up.",
    )
    retry_interval_ms: int = _setting(
        5000,
        _Integer(1),
        "Pause between connection rounds once `max_retries` rounds failed (and the longest "
        "backoff before that).",
    )
    log_level: str = _upstream(
        "info", _LogLevel(), "How much the node logs (upstream's level names, any case)."
    )
    workers: int | None = _setting(
        None,
        _Optional(_Integer(1)),
        "Worker processes (`null` = the CPUs this process may run on).",
    )
    task_timeout_ms: int = _setting(
        60000,
        _OffOrAtLeast(
            MIN_TASK_TIMEOUT_MS,
            "a worker sends the results it finished every 20 ms while a long task runs: a "
            "shorter limit would kill workers still holding them",
        ),
        "Time limit per task; its worker is killed and replaced and it gets an `Error` (0 = no "
        f"limit). At least {MIN_TASK_TIMEOUT_MS}: while a task runs, its worker sends the "
        "results of the tasks it finished before it every 20 ms (plus up to 5 ms to get the "
        "GIL), and the limit is checked every 10 ms or more; a shorter limit would kill workers "
        "still holding finished results.",
    )
    max_tasks_per_child: int = _setting(
        0,
        _Integer(0),
        "Recycle a worker process after this many tasks: it finishes what it holds and a "
        "fresh one takes its place (0 = never).",
    )
    worker_memory_limit_mb: int = _setting(
        0,
        _Integer(0),
        "Recycle a worker whose unique memory (USS, checked every second) is above this many "
        "MiB, between tasks (0 = no limit).",
    )
    max_frame_bytes: int = _setting(
        1 << 30,
        _Integer(1024, (1 << 32) - 1),
        "Largest frame accepted; a connection announcing a bigger one is dropped.",
    )
    poll_interval_ms: int = _setting(
        50,
        _Integer(1),
        "How often an idle node with free capacity sends `Heartbeat`: the upstream master "
        "pushes tasks only after a frame from the node.",
    )
    prefetch: int = _setting(
        1024,
        _Integer(1),
        "Tasks in flight per worker (queued to it plus running), with at most 8 MiB of their "
        "payloads (at least one task); waiting tasks are shared out evenly. A worker whose task "
        "has run 50 ms is sent no more until it ends, and the tasks queued behind that task "
        "are taken back for a worker that idles (not in an install without the compiled "
        "modules).",
    )
    shm_dir: str = _setting(
        "/dev/shm", _Path(), "Directory (a tmpfs) of shared-memory payloads and the memory store."
    )
    node_id: str | None = _setting(
        None,
        _Optional(_NodeId()),
        "Names this node's files in `shm_dir` and their lock (`null` = derived at start).",
    )
    drain_timeout_ms: int = _setting(
        30000,
        _Integer(0),
        "On SIGTERM/SIGINT, how long to finish running tasks, deliver their results and wait "
        "for the master to take back the rest (3.2 x `failover_timeout_ms`: a shorter value is "
        "warned about at start).",
    )
    health_listen: str | None = _setting(
        None,
        _Optional(_Address()),
        "Where the health endpoint (`/healthz`, `/readyz`, `/metrics`, `/status`) listens, "
        'as "host:port" (`null` = off).',
    )
    log_format: str = _setting(
        "text",
        _Choice(*LOG_FORMATS),
        "Log lines as human-readable `text`, or `json`: one object per line.",
    )
    tls: str = _setting(
        "auto",
        _Choice("auto", "always", "never"),
        "TLS to the master and on direct links: `auto` when the address is not loopback or "
        "private (the upstream rule; `localhost` names count as local, and get the token only "
        "if the address they reach is), `always`, or `never`.",
    )
    io_concurrency: int = _setting(
        256,
        _Integer(1),
        "`HttpRequest`/`Tcp`/`Udp` tasks running at once; the rest wait their turn in the "
        "supervisor (waiting never delays a heartbeat).",
    )
    http_max_body_bytes: int = _setting(
        16 << 20,
        _Integer(0),
        "Largest body an `HttpRequest` returns; a larger one gives an `Error`.",
    )
    tcp_read_bytes: int = _setting(
        1024,
        _Integer(1, 1 << 26),
        "`Tcp` tasks read one reply of at most this many bytes (upstream reads 1024).",
    )
    network_allow: tuple[str, ...] = _setting(
        ("0.0.0.0/0", "::/0"),
        _ListOf(_Network(), "a list of CIDR networks", non_empty=False, distinct=True),
        "Targets `HttpRequest`/`Tcp`/`Udp` (and the peer a `ConnectionInfo` names) may reach, "
        "checked on every resolved address: the most specific matching rule of this list and "
        "`network_deny` decides (deny on a tie); an address no rule matches is refused.",
    )
    network_deny: tuple[str, ...] = _setting(
        ("169.254.0.0/16", "fe80::/10"),
        _ListOf(_Network(), "a list of CIDR networks", non_empty=False, distinct=True),
        "Targets network tasks (and `ConnectionInfo` links) may not reach (default: link-local, "
        "where cloud metadata services live).",
    )
    direct_port: int | None = _setting(
        None, _Optional(_PORT), "Port this node accepts direct links on (`null` = none)."
    )
    direct_host: str = _setting(
        "0.0.0.0",
        _Text(),
        "Address the `direct_port`, and the port a `ConnectionInfo` names, listen on (`::` for "
        "every IPv6 one).",
    )
    connect_to: tuple[str, ...] = _setting(
        (),
        _ListOf(_Address(), 'a list of "host:port" addresses', non_empty=False, distinct=True),
        "Direct ports of peers this node dials (`--connect-to`); `Compute` and `ComplexMath` "
        "tasks its workers have no room for go to them (tasks on its stores and disk stay).",
    )
    direct_window: int = _setting(
        256, _Integer(1), "Tasks in flight per dialed direct link (see `connect_to`)."
    )
    result_ttl_s: int = _setting(
        3600, _Integer(1), "Local master: how long a finished result is kept for its client."
    )
    window: int = _setting(1024, _Integer(1), "Local master: tasks in flight per node.")

    def __post_init__(self) -> None:
        # Direct construction and dataclasses.replace() get the same checks as a file, and
        # lists passed in become tuples, so no Config exists that load_config would refuse.
        checked = _check_fields({spec.name: getattr(self, spec.name) for spec in CONFIG_FIELDS})
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def master_endpoints(self) -> tuple[tuple[str, int], ...]:
        """`master_addresses` as (host, port) pairs, in failover order."""
        return tuple(_split_address(address) for address in self.master_addresses)

    @property
    def worker_count(self) -> int:
        """`workers`, or the CPUs this process may run on (affinity and cpusets respected)."""
        if self.workers is not None:
            return self.workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:
            return os.cpu_count() or 1

    @property
    def logging_level(self) -> int:
        """`log_level` as a `logging` level number (trace = 5, below DEBUG)."""
        return _LOG_LEVELS[self.log_level]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One row of the config reference: a field, its default, what it accepts and means."""

    name: str
    default: object
    accepts: str
    doc: str
    origin: str
    check: _Check = field(repr=False, compare=False)


CONFIG_FIELDS: Final = tuple(
    FieldSpec(
        f.name,
        f.default,
        f.metadata[_RULE].check.expected,
        f.metadata[_RULE].doc,
        f.metadata[_RULE].origin,
        f.metadata[_RULE].check,
    )
    for f in dataclasses.fields(Config)
)
_SPECS: Final = {spec.name: spec for spec in CONFIG_FIELDS}


def _check_fields(
    values: Mapping[str, object], source_of: Callable[[str], str] = lambda _: "Config"
) -> dict[str, Any]:
    """Check every value (and the ranges between them); one ConfigError lists every problem."""
    problems: list[str] = []
    checked: dict[str, Any] = {}
    for name, value in values.items():
        try:
            checked[name] = _SPECS[name].check(value)
        except _Invalid as bad:
            problems.append(_explain(source_of(name), name, bad))
    low = checked.get("min_port", _SPECS["min_port"].default)
    high = checked.get("max_port", _SPECS["max_port"].default)
    if isinstance(low, int) and isinstance(high, int) and low > high:
        sources = dict.fromkeys(
            source_of(name) for name in ("min_port", "max_port") if name in values
        )
        problems.append(
            f"{' and '.join(sources) or source_of('min_port')}: `min_port` ({low}) must not be "
            f"greater than `max_port` ({high})"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    return checked


# --- reading JSON files ----------------------------------------------------------------------


class _DuplicateKey(Exception):
    pass


class _NotJson(Exception):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys and upstream's serde refuses the file; refusing is
    # the only reading both agree on.
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise _DuplicateKey(key)
        document[key] = value
    return document


def _reject_constant(name: str) -> NoReturn:
    raise _NotJson(name)


def _read_json_object(label: str, kind: str) -> dict[str, Any]:
    """Read `label` as a JSON object; ConfigError for every way it can fail to be one."""
    try:
        with open(label, "rb") as file:
            raw = file.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{label}: {kind} not found") from None
    except OSError as error:
        raise ConfigError(f"{label}: cannot read {kind}: {error.strerror or error}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(f"{label}: {kind} is larger than {_MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{label}: not UTF-8 text (bad byte at offset {error.start})") from None
    try:
        document = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{label}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except _DuplicateKey as error:
        raise ConfigError(f"{label}: field `{error}` appears more than once") from None
    except _NotJson as error:
        raise ConfigError(f"{label}: not valid JSON: {error} is not a JSON value") from None
    if not isinstance(document, dict):
        raise ConfigError(
            f"{label}: the top level must be a JSON object, got {_describe(document)}"
        )
    return document


def check_node_paths(config: Config, source: str | None = None) -> None:
    """Refuse a `storage_dir` that storage tasks could use to reach the node's own files in
    `shm_dir` (its memory store, usage ledger, lock and payload segments, and those of other
    nodes): `storage_dir` equal to `shm_dir` or above it, or inside a `cpnode-*` entry of it.
    A directory of its own inside `shm_dir` (`/dev/shm/cpcluster`) is fine. Paths are compared
    after resolving symlinks; neither needs to exist yet. `source` (the config file) heads the
    error."""
    where = f"{source}: " if source else ""
    storage = os.path.realpath(config.storage_dir)
    shm = os.path.realpath(config.shm_dir)
    if shm == storage or shm.startswith(storage.rstrip(os.sep) + os.sep):
        raise ConfigError(
            f"{where}`storage_dir` {config.storage_dir!r} holds `shm_dir` {config.shm_dir!r}:"
            " DiskWrite and DiskRead could reach this node's own files there (memory store,"
            " usage ledger, lock, payload segments); give storage_dir a directory of its own:"
            " on disk for a Disk node ('storage', the default), or"
            f" {os.path.join(config.shm_dir, 'cpcluster')!r} for a Worker node that shares"
            " memory through DiskWrite (a tmpfs: emptied at reboot)"
        )
    inside = os.path.relpath(storage, shm)
    if not inside.startswith(os.pardir) and inside.split(os.sep)[0].startswith("cpnode-"):
        raise ConfigError(
            f"{where}`storage_dir` {config.storage_dir!r} is inside"
            f" {inside.split(os.sep)[0]!r}, a node's own directory in `shm_dir`"
            f" {config.shm_dir!r}; use a directory of its own"
        )


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    overrides: Mapping[str, object] | None = None,
    override_source: str = "override",
) -> Config:
    """Load and check a config file; `None` means every default.

    JSON `null` for a field means its default (the upstream samples write `null`). Unknown fields
    are logged on `cpnode.config` and ignored. `overrides` (e.g. from the command line) replace
    file values field by field and are checked the same way; an override of `None` means "not
    given"; errors name them as `override_source` ("command line" from the CLIs). Raises
    ConfigError, listing every problem found, one per line.
    """
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    if path is not None:
        label = os.fspath(path)
        document = _read_json_object(label, "config file")
        for name, value in document.items():
            if name not in _SPECS:
                _log.warning("%s: ignoring unknown field `%s`", label, name)
            elif value is not None:
                values[name] = value
                sources[name] = label
    for name, value in (overrides or {}).items():
        if name not in _SPECS:
            raise ConfigError(f"{override_source}: unknown field `{name}`")
        if value is not None:
            values[name] = value
            sources[name] = override_source
    return Config(**_check_fields(values, lambda name: sources[name]))


def config_reference_markdown() -> str:
    """The config reference as a Markdown table: every field, its default, what it accepts."""
    lines = [
        "| Field | Default | Accepts | Meaning | From |",
        "|---|---|---|---|---|",
    ]
    for spec in CONFIG_FIELDS:
        cells = (
            f"`{spec.name}`",
            f"`{_show(spec.default)}`",
            spec.accepts,
            spec.doc,
            spec.origin,
        )
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


# --- join.json -------------------------------------------------------------------------------


class _Host(_Check):
    expected = "an IP address or host name"

    def __call__(self, value: object) -> str:
        if not isinstance(value, str):
            self.fail(value)
        host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        problem = _host_problem(host)
        if problem is not None:
            with contextlib.suppress(_BadAddress):
                _split_address(value)
                problem = "the port belongs in `port`"
            self.fail(value, note=problem)
        return host


_JOIN_CHECKS: Final[Mapping[str, _Check]] = {"token": _Secret(), "ip": _Host(), "port": _PORT}


def _check_join(values: Mapping[str, object], label: str) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for name, check in _JOIN_CHECKS.items():
        if name not in values or values[name] is None:
            raise ConfigError(f"{label}: missing field `{name}` ({check.expected})")
        try:
            checked[name] = check(values[name])
        except _Invalid as bad:
            raise ConfigError(_explain(label, name, bad)) from None
    return checked


@dataclass(frozen=True, slots=True)
class JoinInfo:
    """Where the master is and the token it wants; the token stays out of repr and logs."""

    token: str = field(repr=False)
    ip: str
    port: int

    def __post_init__(self) -> None:
        checked = _check_join({"token": self.token, "ip": self.ip, "port": self.port}, "JoinInfo")
        object.__setattr__(self, "ip", checked["ip"])

    @property
    def address(self) -> str:
        """`ip:port`, with an IPv6 ip in brackets."""
        return format_address(self.ip, self.port)

    @property
    def is_local(self) -> bool:
        """Plain TCP when True, TLS when False (see `is_local_ip`)."""
        return is_local_ip(self.ip)


def default_join_path(env: Mapping[str, str] = os.environ) -> str:
    """`$CPCLUSTER_JOIN` when set and not empty, else `./join.json` (upstream's lookup)."""
    return env.get("CPCLUSTER_JOIN") or DEFAULT_JOIN_PATH


def load_join(
    path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] = os.environ
) -> JoinInfo:
    """Load `join.json` from `path`, else `$CPCLUSTER_JOIN`, else `./join.json`.

    `$CPCLUSTER_TOKEN`, when set, replaces the file's token (which may then be absent). With the
    token from the environment and no file at the default `./join.json`, the master is assumed at
    127.0.0.1:55000; a file named explicitly (argument or `$CPCLUSTER_JOIN`) must exist, so a
    mistyped path is reported rather than quietly replaced by localhost.
    """
    named = path is not None or bool(env.get("CPCLUSTER_JOIN"))
    label = os.fspath(path) if path is not None else default_join_path(env)
    env_token = env.get("CPCLUSTER_TOKEN")
    if env_token is not None and not env_token.strip():
        raise ConfigError(
            "CPCLUSTER_TOKEN is set but empty: unset it, or set it to the master's token"
        )
    if env_token is not None and not named and not os.path.lexists(label):
        return JoinInfo(env_token, _DEFAULT_MASTER_IP, _DEFAULT_MASTER_PORT)
    document = _read_json_object(label, "join file")
    for name in document:
        if name not in _JOIN_CHECKS:
            _log.warning("%s: ignoring unknown field `%s`", label, name)
    if env_token is not None:
        document["token"] = env_token
    else:
        _warn_if_others_read(label)
    return JoinInfo(**_check_join(document, label))


def _warn_if_others_read(label: str) -> None:
    """Say so (as ssh does of a key) when users other than the owner may read the token."""
    try:
        mode = os.stat(label).st_mode
    except OSError:
        return
    if mode & 0o077:
        _log.warning(
            "%s holds the cluster's token and other users may read it (mode %03o): "
            "chmod 600 it, or give the token in CPCLUSTER_TOKEN",
            label,
            mode & 0o777,
        )


def write_join(path: str | os.PathLike[str], info: JoinInfo) -> None:
    """Write `info` as `join.json`, atomically and readable by the owner only (mode 0600).

    Readers see the old file or the new one, never half; the token is never on disk with wider
    permissions, not even for a moment. Raises ConfigError when the file cannot be written.
    """
    label = os.fspath(path)
    text = json.dumps({"token": info.token, "ip": info.ip, "port": info.port}, indent=2) + "\n"
    try:
        replace_atomically(label, lambda file: file.write(text.encode()))
    except OSError as error:
        raise ConfigError(f"{label}: cannot write join file: {error.strerror or error}") from None
