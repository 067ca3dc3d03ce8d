"""A soak under faults: every task's result checked while workers, the master and nodes die.

    python bench/soak.py                                   # 120 s, 2 workers
    python bench/soak.py --duration 1800 --workers 8       # a longer run
    python bench/soak.py --tls --direct                    # TLS only; a direct link too

A `cpnode-master` (plain TCP on a loopback port, a state file) and three `cpnode-supervisor`s,
a Worker, a Disk and an Internet node, run as an operator runs them; this process submits tasks
through the client library and polls their results for `--duration` seconds, while, each on its
own clock:
- a random worker is killed (SIGKILL) every `--kill-every` seconds;
- the master is stopped and started again on the same port and state file every
  `--master-every` seconds, by SIGTERM and by SIGKILL in turn, between two submissions (a
  submission the master never acknowledged would leave its tasks in doubt), the SIGKILL as soon
  as the last one was acknowledged: cpnode-master acknowledges only what its journal holds;
- a node is stopped and a new one started every `--node-every` seconds, the nodes in turn,
  each by SIGTERM (it drains, handing back what it has not started) and by SIGKILL in turn.

`--tls`: the master listens with `--tls always` (its self-signed certificate, made at its first
start in the run's directory, is kept across its restarts), the nodes speak `tls = "always"`
and trust a file of the master's certificate (and the peer's), and this process's client checks
the master's certificate too. `--direct`: a fourth node, a second Worker (the "Peer"), accepts
direct links on a loopback `direct_port` (with `--tls`, presenting a self-signed certificate
made here); the first Worker dials it (`connect_to`) with a prefetch of 2 tasks per worker, so
most of the `Compute` and `ComplexMath` the master sends it (what a node lends) overflows to
the peer over the link. The peer's workers are
among those killed and the peer among the nodes restarted, so links break with tasks in flight
(the dialer runs those again itself). The nodes' logs must show that TLS was used for every
connection to the master and that tasks crossed the link, else the run fails. (The master's
`RequestConnection`/`ConnectionInfo` links are not used: they carry tasks only from a client
or a peer that sends them, not the master's overflow, so a soak of master work leaves them
idle.)

Tasks: `Compute` tasks whose values are known by construction (`a*b+c`), slower ones that a kill
is likely to find running, and `ComplexMath` sums, all different, so no cache answers them;
`DiskWrite`s of random bytes to new files in new directories (and a few in `storage_dir`
itself), each read back (`DiskRead`) once its write is answered; `Tcp` and `Udp` tasks to echo
servers this process runs on loopback; on the Worker node, `StoreData` of new keys (short,
path-like and over 150 bytes long) with random blobs from 0 bytes to 4 MiB, each read back
(`RetrieveData`) once its write is answered (the large ones, those of 1 MiB or more as frames,
travel through payload segments both ways; they are bounded to 256 KiB/s and 16 MiB stored and
not yet read back, since the master journals them as JSON); `HttpRequest`s to an HTTP server
this process runs on loopback, bodies of known text of up to 4 Mi characters in UTF-8 (with or
without a charset or a byte-order mark) and ISO-8859-1; and `GetGlobalRam` and `GetStorage`, whose
listings must be `name: N bytes` lines sorted by name (after `free: N bytes`, N at most the
quota), each a key or top-level file the soak wrote with exactly its size, or `No entries found`.

The memory store is volatile: a Worker node restart empties it. So the soak numbers the Worker
node's incarnations (odd while one stops and the next starts): a `RetrieveData` must give the
data when it was submitted and answered in the incarnation that stored the key, and `Key not
found` when another one ran it (or the data, if a master restart since the write may have run
the write again); either when a restart falls in one of those spans, so which one ran the task
is not known. With `--direct` there are two Worker nodes, each with its own store, and the
master gives a Worker's task to either: a read gets the data or `Key not found`, never other
bytes.

At the end every task must have its exact value; an `Error` is allowed only where a kill
explains it (a task safe to repeat is retried once, so it gets one only when kills find it
running twice; a `DiskWrite` is not retried), and the Errors' texts are printed (a `Key not
found` where the store must hold the key is wrong, not an Error). `Tcp`, `Udp` and
`HttpRequest` run in a node's event loop, where no worker kill reaches them: none may get an
Error. Exit status 1 when a result is wrong or missing, there are more Errors than kills, a
network task got one, a log holds a traceback, a process
exited unbidden (it is started again) or did not stop cleanly on SIGTERM, or the nodes left
files in /dev/shm after the last stop; the logs' directory is kept then. Nothing leaves
loopback; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import orjson
import psutil
from aiohttp import web

from node.client import Client, ClientError
from node.errors import ConfigError
from node.protocol import messages as m
from node.tls import ensure_certificate
from workers.channel import RESULT_SEGMENT_BYTES

_SLOW_TERMS = 100  # terms of a slow task: about a millisecond of work, a kill's likely target
_DIRECTORIES = 97
_ROLES = ("Worker", "Disk", "Internet")
_PEER = "Peer"  # --direct: a second Worker node; the first one dials its direct port
_DIALER_PREFETCH = 2  # --direct: the first Worker's room per worker, so most of its tasks overflow
_MASTER_CERT = "master_cert.pem"  # --tls: made by cpnode-master at its first start, kept after
_PEER_CERT, _PEER_KEY = "peer_cert.pem", "peer_key.pem"  # --tls --direct: the peer's, made here
_TRUST = "trust.pem"  # --tls: what the nodes trust: the master's certificate (and the peer's)
SHM_DIR = "/dev/shm"  # the nodes' default shm_dir
_MASTER_START_S = 120  # a restart replays the journal: seconds for a few hundred MB
_RESULT_TTL_S = 120  # the master's result_ttl_s: the soak polls each result within seconds
_QUOTA_BYTES = 1024 << 20  # the Disk node's disk_space_mb, its default
# Blobs (StoreData, HttpRequest bodies) of up to _LARGEST_BLOB bytes. The large ones are bounded
# twice: _BLOB_BYTES_PER_S on average (the master journals each task and result, as JSON arrays
# about 3.6 times as long, and keeps results _RESULT_TTL_S), and at most _BLOB_BYTES_IN_FLIGHT
# stored and not yet read back.
_LARGEST_BLOB = 4 << 20
_BLOB_BYTES_PER_S = 256 << 10
_BLOB_BYTES_IN_FLIGHT = 16 << 20
_KEY_NOT_FOUND = m.Error("Key not found")
# Texts HttpRequest bodies are made of: ASCII, and characters of 2, 3 and 4 bytes in UTF-8; in
# ISO-8859-1 (which the node reads as windows-1252, as WHATWG says) the characters it shares
# with Latin-1.
_UTF8_LETTERS = "soak 0123456789 é ж € ✓ 𝄞 ü 日本 \n"
_LATIN1_LETTERS = "soak 0123456789 é ö ß ÿ « » \n"
_HTTP_VARIANTS = ("utf-8", "no charset", "iso-8859-1", "utf-8 bom")


@dataclass
class Soak:
    """What the run has submitted, received and done to the processes."""

    expected: dict[str, m.Result] = field(default_factory=dict)
    outstanding: dict[str, None] = field(default_factory=dict)  # ids without a result, in order
    results: dict[str, m.Result] = field(default_factory=dict)
    kills: int = 0
    master_restarts: int = 0
    node_restarts: int = 0
    in_doubt: int = 0  # tasks of a submission that failed: maybe on the master, maybe not
    exits: list[str] = field(default_factory=list)  # processes that exited unbidden or uncleanly
    written: dict[str, m.DiskWrite] = field(default_factory=dict)  # by id, until answered
    reads_due: list[tuple[m.Task, m.Result]] = field(default_factory=list)  # their reads
    stores: dict[str, Blob] = field(default_factory=dict)  # StoreData by id, until answered
    read_plans: dict[str, Blob] = field(default_factory=dict)  # the reads due, by key
    store_reads: dict[str, Blob] = field(default_factory=dict)  # RetrieveData by id
    also: dict[str, m.Result] = field(default_factory=dict)  # a second right result, by id
    listings: dict[str, type[m.Task]] = field(default_factory=dict)  # GetGlobalRam, GetStorage
    faults: dict[str, str] = field(default_factory=dict)  # what is wrong with a listing
    key_sizes: dict[str, int] = field(default_factory=dict)  # every key submitted, its size
    top_files: dict[str, int] = field(default_factory=dict)  # DiskWrites in storage_dir itself
    # The Worker node's incarnations: +1 when one is stopped (odd: one stops or starts), +1 when
    # the next is started; so a task submitted and answered in one even epoch ran in that one.
    worker_epoch: int = 0
    master_stops: int = 0  # a master restart may run a task again (its result was lost)
    # With --direct: a key may be stored by one Worker node and read on the other (each has
    # its own memory store), so a read gets the data or "Key not found"; never other bytes.
    two_worker_nodes: bool = False
    # Tcp, Udp and HttpRequest: they run in a node's event loop, where no worker kill reaches
    # them, and a node's stop hands back what it had not answered: no Error is excused.
    network: set[str] = field(default_factory=set)
    blob_bytes: int = 0  # of the large blobs submitted
    blob_bytes_in_flight: int = 0  # stored and not read back yet
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)  # submitted
    submitting: asyncio.Lock = field(default_factory=asyncio.Lock)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Blob:
    """A StoreData's key and data, where and when it was stored, and when its read was sent."""

    key: str
    data: bytes
    epoch: int  # the Worker epoch when the write was submitted
    master_stops: int  # soak.master_stops then
    stored_in: int | None = None  # the epoch that ran the write, when known
    read_epoch: int = 0  # the Worker epoch when the read was submitted


@dataclass
class Targets:
    """This process's servers on loopback: TCP and UDP echoes (`host:port`), HTTP (a URL)."""

    tcp: str
    udp: str
    http: str


_DIGITS = bytes(1 if byte < 10 else 2 if byte < 100 else 3 for byte in range(256))


def array_length(data: bytes) -> int:
    """The length of `data` as a JSON array of integers, the form it travels in."""
    digits = data.translate(_DIGITS)
    widths = sum(width * digits.count(width) for width in (1, 2, 3))
    return 2 + max(len(data) - 1, 0) + widths


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """A size from `low` to `high`, as often between 10 and 100 as between 1 MiB and 10 MiB."""
    return min(high, int(math.exp(rng.uniform(math.log(low), math.log(high + 1)))))


def blob_key(number: int) -> str:
    """Keys of every form the memory store has: short ones, ones that look like paths, and
    ones longer than 150 bytes of UTF-8 (stored under a hash, the key in the file)."""
    if number % 7 == 0:
        return f"soak/{number}/" + "ключ" * 20
    if number % 7 == 1:
        return f"../soak {number} ✓"
    return f"soak-{number}"


def http_text(number: int, size: int, variant: str) -> str:
    """The text of HttpRequest `number`'s body: `size` characters (a repeated piece, so that
    a few MiB take no time; of characters of 1 to 4 bytes, so that the node's slices of
    256 KiB cut some)."""
    rng = random.Random(number)
    letters = _LATIN1_LETTERS if variant == "iso-8859-1" else _UTF8_LETTERS
    piece = f"{number}:" + "".join(rng.choices(letters, k=997))
    return (piece * (size // len(piece) + 1))[:size]


def http_body(number: int, size: int, variant: str) -> tuple[bytes, str]:
    """The body the HTTP server sends for `number`, and its Content-Type."""
    text = http_text(number, size, variant)
    match variant:
        case "utf-8":
            return text.encode(), "text/plain; charset=utf-8"
        case "no charset":  # the node reads UTF-8
            return text.encode(), "text/plain"
        case "iso-8859-1":
            return text.encode("latin-1"), "text/plain; charset=iso-8859-1"
        case _:  # a byte-order mark wins over the charset
            return b"\xef\xbb\xbf" + text.encode(), "text/plain; charset=iso-8859-1"


def http_task(number: int, size: int, url: str) -> tuple[m.Task, m.Result]:
    variant = _HTTP_VARIANTS[number % len(_HTTP_VARIANTS)]
    task = m.HttpRequest(f"{url}/{number}/{size}/{_HTTP_VARIANTS.index(variant)}")
    return task, m.Response(http_text(number, size, variant))


@dataclass
class BlobBudget:
    """The sizes of the large blobs, from 4 KiB to _LARGEST_BLOB, as many of each order of
    magnitude, and the bytes they may take now: a size that does not fit waits until it does
    (drawing another would favour the small ones)."""

    rng: random.Random
    room: int = 0
    taken: int = 0
    _next: int = 0

    def take(self) -> int | None:
        """The next size, or None when it does not fit in `room` yet."""
        self._next = self._next or log_uniform(self.rng, 4096, _LARGEST_BLOB)
        if self._next > self.room:
            return None
        size, self._next = self._next, 0
        self.room -= size
        self.taken += size
        return size


def make_batch(
    first: int, count: int, rng: random.Random, targets: Targets, blobs: BlobBudget
) -> list[tuple[m.Task, m.Result]]:
    """`count` different tasks numbered from `first`, with their exact results (a placeholder
    for the listings, which `listing_fault` checks), then the large blobs `blobs` has room
    for; `targets` are this process's servers."""
    batch: list[tuple[m.Task, m.Result]] = []
    for number in range(first, first + count):
        kind = rng.random()
        a, b = rng.randrange(1, 1000), rng.randrange(1, 1000)
        if kind < 0.03:  # a new file, in one of _DIRECTORIES new directories
            data = rng.randbytes(rng.randrange(0, 2048))
            path = f"soak/{number % _DIRECTORIES}/{number}.bin"
            if number % 50 == 0:  # or in storage_dir itself, for GetStorage to list
                path = f"top-{number}.bin"
            batch.append((m.DiskWrite(path, data), m.Written()))
        elif kind < 0.035:  # a new key, read back once its write is answered
            data = rng.randbytes(log_uniform(rng, 1, 4096) - 1)
            batch.append((m.StoreData(blob_key(number), data), m.Stored()))
        elif kind < 0.04:
            batch.append(http_task(number, rng.randrange(0, 4096), targets.http))
        elif kind < 0.0402:
            batch.append((m.GetGlobalRam(), m.Response("a listing of the keys stored")))
        elif kind < 0.0404:
            batch.append((m.GetStorage(), m.Response("a listing of storage_dir")))
        elif kind < 0.05:  # echoed: one small write, one read
            data = rng.randbytes(rng.randrange(1, 512))
            batch.append((m.Tcp(targets.tcp, data), m.Bytes(data)))
        elif kind < 0.06:
            data = rng.randbytes(rng.randrange(1, 512))
            batch.append((m.Udp(targets.udp, data), m.Bytes(data)))
        elif kind < 0.11:  # slow: the sum of many zero terms, exact in floats
            body = "+".join(["sin(1)*0"] * _SLOW_TERMS)
            batch.append((m.Compute(f"{number}+{body}"), m.Number(float(number))))
        elif kind < 0.18:
            task = m.ComplexMath(f"({number}+{a}*i)+({b}+{a}*i)")
            batch.append((task, m.Response(f"{number + b}+{2 * a}i")))
        else:
            batch.append((m.Compute(f"{a}*{b}+{number}"), m.Number(float(a * b + number))))
    # Large blobs, numbered from -first - 1 down (at most `count`, so that batches never share
    # a number): stored and read back, or (one in 4) an HTTP body of as many characters.
    for number in range(-first - 1, -first - 1 - count, -1):
        size = blobs.take()
        if size is None:
            break
        if rng.random() < 0.25:
            batch.append(http_task(number, size, targets.http))
        else:
            batch.append((m.StoreData(blob_key(number), rng.randbytes(size)), m.Stored()))
    return batch


class _TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def http_server() -> tuple[web.AppRunner, str]:
    """An HTTP server on a loopback port that answers `GET /number/size/variant` with
    `http_body`; the runner (cleanup() stops it) and the server's URL."""

    async def body(request: web.Request) -> web.Response:
        info = request.match_info
        data, content_type = http_body(
            int(info["number"]), int(info["size"]), _HTTP_VARIANTS[int(info["variant"])]
        )
        return web.Response(body=data, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/{number}/{size}/{variant}", body)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def udp_echo_socket() -> socket.socket:
    """The UDP echo's socket on a loopback port, with as large a receive buffer as the host
    allows (net.core.rmem_max): a node that starts with a few hundred Udp tasks waiting sends
    them at once, and the default buffer, about 200 small datagrams, drops the rest while this
    process's loop is busy (decoding a large result), so they time out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 20)  # the kernel caps it
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    """The master and the nodes, started and stopped as an operator would, logs in
    `directory`."""

    def __init__(
        self, directory: Path, port: int, workers: int, tls: bool = False, direct: bool = False
    ) -> None:
        self.directory = directory
        self.port = port
        self.workers = workers
        self.tls = tls
        self.env = {**os.environ, "CPCLUSTER_JOIN": str(directory / "join.json")}
        self.master: subprocess.Popen[bytes] | None = None
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.log_starts: dict[str, int] = {}  # where each node's last start begins in its log
        # The nodes by name (their files' names, lower case) and role, in the restarts' order.
        self.roles = {role: role for role in _ROLES} | ({_PEER: "Worker"} if direct else {})
        (directory / "master.json").write_bytes(orjson.dumps({"result_ttl_s": _RESULT_TTL_S}))
        direct_port = free_port() if direct else None
        for name, role in self.roles.items():
            settings: dict[str, object] = {
                "master_addresses": [f"127.0.0.1:{port}"],
                "failover_timeout_ms": 3000,
                "retry_interval_ms": 200,
                "max_retries": 50,
                "role": role,
                "storage_dir": f"storage-{name.lower()}",
                "node_id": f"soak-{port}-{name.lower()}",
            }
            if tls:  # TLS to the master and on the direct link; the nodes trust _TRUST only
                settings |= {"tls": "always", "ca_cert_path": _TRUST}
            if name == _PEER:
                settings |= {"direct_port": direct_port, "direct_host": "127.0.0.1"}
                if tls:
                    settings |= {"cert_path": _PEER_CERT, "key_path": _PEER_KEY}
            elif name == "Worker" and direct:  # little room: the rest goes over the link
                settings |= {
                    "connect_to": [f"127.0.0.1:{direct_port}"],
                    "prefetch": _DIALER_PREFETCH,
                }
            (directory / f"node-{name.lower()}.json").write_bytes(orjson.dumps(settings))
        if tls and direct:
            ensure_certificate(
                str(directory / _PEER_CERT), str(directory / _PEER_KEY), ["127.0.0.1"]
            )

    def trust(self) -> None:
        """--tls: write what the nodes trust, once the master has made its certificate."""
        names = [_MASTER_CERT] + ([_PEER_CERT] if _PEER in self.roles else [])
        pems = [(self.directory / name).read_bytes() for name in names]
        (self.directory / _TRUST).write_bytes(b"".join(pems))

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (the child holds it)
        with log:
            return subprocess.Popen(
                command, cwd=self.directory, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    def start_master(self) -> None:
        # A restart keeps join.json's token (the nodes hold it). Results are kept _RESULT_TTL_S
        # rather than an hour, so that the journal (and a restart's replay) stays small.
        self.master = self._start(
            "master",
            [
                sys.executable, "-m", "node.master.cli", "master.json", "--tls",
                "always" if self.tls else "never",
                "--listen", f"127.0.0.1:{self.port}", "--state-file", "master-state.jsonl",
                "--log-level", "warn",
            ],
        )  # fmt: skip

    def start_node(self, node: str) -> None:
        """Start the node named `node` (a role, or _PEER)."""
        name = f"node-{node.lower()}"
        log = self.directory / f"{name}.log"
        self.log_starts[node] = log.stat().st_size if log.exists() else 0
        self.nodes[node] = self._start(
            name,
            [
                sys.executable, "-m", "node.cli", f"{name}.json", "--workers",
                str(self.workers), "--log-level", "info",
            ],
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until each running node has logged, since its last start, that it is ready."""
        deadline = time.monotonic() + timeout
        for node, process in self.nodes.items():
            log = self.directory / f"node-{node.lower()}.log"
            while process.poll() is None and time.monotonic() < deadline:
                with log.open("rb") as file:
                    file.seek(self.log_starts[node])
                    if b"node ready" in file.read():
                        break
                time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        """Workers are children of a forkserver, a child of a supervisor."""
        pids = []
        for node in self.nodes.values():
            try:
                children = psutil.Process(node.pid).children()
                pids += [g.pid for c in children for g in c.children() if g.is_running()]
            except psutil.NoSuchProcess:
                continue
        return pids

    @staticmethod
    def stop(
        process: subprocess.Popen[bytes] | None, what: str, hard: bool = False, timeout: float = 60
    ) -> None:
        """SIGTERM `process` (SIGKILL when `hard`) and wait for it."""
        if process is None or process.poll() is not None:
            return
        if hard:
            process.kill()
            process.wait(timeout)
            return
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
            raise RuntimeError(f"the {what} did not stop within {timeout:g} s of SIGTERM") from None
        if code != 0:
            raise RuntimeError(f"the {what} exited {code} after SIGTERM")

    def shm_leftovers(self) -> list[Path]:
        """What the nodes have in /dev/shm (their node_ids are this run's)."""
        return sorted(Path(SHM_DIR).glob(f"cpnode-soak-{self.port}-*"))

    def close(self) -> None:
        """Kill what still runs (the soak itself failed), and remove the files in /dev/shm of
        the nodes it killed: their node_ids are never used again to clear them."""
        killed = False
        for process in [*self.nodes.values(), self.master]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
                killed = True
        if killed:
            time.sleep(1)  # their workers exit with them
            for path in self.shm_leftovers():
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


@dataclass
class ClientTls:
    """How this process speaks to the master: set once, by --tls."""

    mode: str = "auto"  # plain TCP on loopback
    ca_cert_path: str | None = None


_client_tls = ClientTls()


def connect(join: Path, timeout: float) -> contextlib.AbstractAsyncContextManager[Client]:
    """The client library's connection to the master: TLS, checked against the master's
    certificate, when the run is --tls."""
    return Client.connect(
        join, timeout=timeout, tls=_client_tls.mode, ca_cert_path=_client_tls.ca_cert_path
    )


async def wait_for_master(join: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with connect(join, timeout=5):
                return
        except (ClientError, ConfigError, OSError):  # ConfigError: no join.json yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def submitter(
    soak: Soak, join: Path, batch: int, most_outstanding: int, targets: Targets
) -> None:
    """New tasks while the run lasts, each written file's and stored key's read as soon as its
    write is answered; after the run, the reads of the writes still running."""
    rng = random.Random(1)
    blobs = BlobBudget(random.Random(3))
    started = time.monotonic()
    number = 0
    while not soak.stop.is_set() or soak.written or soak.stores or soak.reads_due:
        if soak.stop.is_set() or len(soak.outstanding) >= most_outstanding:
            tasks = []
        else:
            blobs.room = min(
                _BLOB_BYTES_IN_FLIGHT - soak.blob_bytes_in_flight,
                int(_BLOB_BYTES_PER_S * (time.monotonic() - started)) - blobs.taken,
            )
            tasks = make_batch(number, batch, rng, targets, blobs)
            soak.blob_bytes = blobs.taken
            number += batch
        tasks += soak.reads_due
        soak.reads_due = []
        if tasks:
            await submit(soak, join, tasks)
        else:
            await asyncio.sleep(0.02)


async def submit(soak: Soak, join: Path, tasks: list[tuple[m.Task, m.Result]]) -> None:
    for task, _ in tasks:  # before: the master may have them even if the submission fails
        if isinstance(task, m.StoreData):
            soak.key_sizes[task.key] = len(task.data)
        elif isinstance(task, m.DiskWrite) and "/" not in task.path:
            soak.top_files[task.path] = len(task.data)
    async with soak.submitting:
        epoch, master_stops = soak.worker_epoch, soak.master_stops  # before it is sent
        try:
            async with connect(join, timeout=10) as client:
                ids = await client.submit_many([task for task, _ in tasks])
        except ClientError as error:
            soak.in_doubt += len(tasks)
            print(f"submission of {len(tasks)} tasks failed: {error}", file=sys.stderr)
            for task, _ in tasks:  # their keys are not read: no longer in flight
                if isinstance(task, m.RetrieveData):
                    soak.blob_bytes_in_flight -= len(soak.read_plans.pop(task.key).data)
            return
    for ident, (task, result) in zip(ids, tasks, strict=True):
        soak.kinds[type(task).__name__] += 1
        if isinstance(task, m.Tcp | m.Udp | m.HttpRequest):
            soak.network.add(ident)
        soak.expected[ident] = result
        soak.outstanding[ident] = None
        match task:
            case m.DiskWrite():
                soak.written[ident] = task
            case m.StoreData(key, data):
                soak.stores[ident] = Blob(key, data, epoch, master_stops)
                soak.blob_bytes_in_flight += len(data)
                soak.kinds["segment-sized"] += array_length(data) >= RESULT_SEGMENT_BYTES
            case m.RetrieveData(key):
                soak.store_reads[ident] = blob = soak.read_plans.pop(key)
                blob.read_epoch = epoch
            case m.GetGlobalRam() | m.GetStorage():
                soak.listings[ident] = type(task)
            case m.HttpRequest() if len(cast(m.Response, result).text) > 4096:
                soak.kinds["large HttpRequest"] += 1


async def collector(soak: Soak, join: Path, submitter_done: asyncio.Event) -> None:
    while soak.outstanding or not submitter_done.is_set():
        wanted = list(soak.outstanding)[:20_000]
        if not wanted:
            await asyncio.sleep(0.02)
            continue
        done: dict[str, m.Result] = {}
        try:
            async with connect(join, timeout=10) as client:
                done = await client.results(wanted, timeout=1.0, poll_interval=0.05)
        except ClientError as error:  # a timeout, or the master restarting: keep what came
            done = error.done or {}
            if not isinstance(error, TimeoutError):
                await asyncio.sleep(0.1)
        epoch = soak.worker_epoch  # after the results came
        for ident, result in done.items():
            soak.results[ident] = result
            soak.outstanding.pop(ident, None)
            write = soak.written.pop(ident, None)
            if write is not None and result == m.Written():  # read it back
                soak.reads_due.append((m.DiskRead(write.path), m.Bytes(write.data)))
            if (blob := soak.stores.pop(ident, None)) is not None:
                if result == m.Stored():
                    stable = blob.epoch == epoch and epoch % 2 == 0
                    blob.stored_in = epoch if stable else None
                    soak.read_plans[blob.key] = blob
                    soak.reads_due.append((m.RetrieveData(blob.key), m.Bytes(blob.data)))
                else:
                    soak.blob_bytes_in_flight -= len(blob.data)
            if (blob := soak.store_reads.pop(ident, None)) is not None:
                soak.blob_bytes_in_flight -= len(blob.data)
                expect_read(soak, ident, blob, epoch)
            if (kind := soak.listings.pop(ident, None)) is not None and isinstance(
                result, m.Response
            ):
                fault = listing_fault(soak, kind, result.text)
                if fault is None:
                    soak.results[ident] = soak.expected[ident]
                else:
                    soak.faults[ident] = fault
            compact(soak, ident)


_LISTED = re.compile(r"(.*): ([0-9]+) bytes")


def listing_fault(soak: Soak, kind: type[m.Task], text: str) -> str | None:
    """What is wrong with a GetGlobalRam or GetStorage response, or None: it must be lines
    `name: N bytes` (after `free: N bytes` for GetStorage, N at most the quota), sorted by
    name, each a key or top-level file this soak wrote with exactly its size, or
    `No entries found`."""
    if not text.endswith("\n"):
        return "the last line does not end with a newline"
    lines = text[:-1].split("\n")
    known = soak.key_sizes
    if kind is m.GetStorage:
        known = soak.top_files
        free = _LISTED.fullmatch(lines.pop(0))
        if free is None or free[1] != "free" or int(free[2]) > _QUOTA_BYTES:
            return f"the first line is not `free: N bytes` with N at most {_QUOTA_BYTES}"
    if lines == ["No entries found"]:
        return None
    names = []
    for line in lines:
        listed = _LISTED.fullmatch(line)
        if listed is None:
            return f"{line!r} is not `name: N bytes`"
        wrote = known.get(listed[1])
        if wrote != int(listed[2]):
            what = "nothing there" if wrote is None else f"{wrote} bytes"
            return f"{line!r}: the soak wrote {what}"
        names.append(listed[1])
    if names != sorted(set(names)):
        return "the names are not sorted, or one is listed twice"
    return None


def compact(soak: Soak, ident: str) -> None:
    """Keep a line in place of a large result that is right (the run would hold gigabytes)."""
    result, expected = soak.results[ident], soak.expected[ident]
    size = len(result.data) if isinstance(result, m.Bytes) else 0
    size = len(result.text) if isinstance(result, m.Response) else size
    if size > 4096 and result in (expected, soak.also.get(ident)):
        soak.results[ident] = soak.expected[ident] = m.Response(f"{size:,} right, not kept")


def expect_read(soak: Soak, ident: str, blob: Blob, epoch: int) -> None:
    """What RetrieveData `ident` of `blob` must give, now that it was answered in Worker epoch
    `epoch`: the data when the node that stored it answered; "Key not found" when another one
    did (it starts with an empty store), or the data again if a master restart since the write
    lost its result and ran it again; either when it is not known which node ran one of them."""
    read_in = blob.read_epoch if blob.read_epoch == epoch and epoch % 2 == 0 else None
    if soak.two_worker_nodes:  # --direct: the master gives a Worker's tasks to either node
        soak.outcomes["read with two Worker nodes (the data, or not found)"] += 1
        soak.also[ident] = _KEY_NOT_FOUND
    elif blob.stored_in is not None and blob.stored_in == read_in:
        soak.outcomes["read where it was stored"] += 1
    elif blob.stored_in is not None and read_in is not None:
        soak.outcomes["read by a later Worker node"] += 1
        soak.expected[ident] = _KEY_NOT_FOUND
        if soak.master_stops > blob.master_stops:
            soak.also[ident] = m.Bytes(blob.data)
    else:
        soak.outcomes["read across a Worker node restart"] += 1
        soak.also[ident] = _KEY_NOT_FOUND


async def stop(
    soak: Soak, process: subprocess.Popen[bytes] | None, what: str, hard: bool = False
) -> None:
    """SIGTERM (SIGKILL when `hard`) `process` and wait for its exit; one that does not stop
    cleanly after SIGTERM is a finding."""
    try:
        await asyncio.to_thread(Processes.stop, process, what, hard)
    except RuntimeError as error:
        soak.exits.append(str(error))


async def chaos(soak: Soak, processes: Processes, join: Path, args: argparse.Namespace) -> None:
    start = time.monotonic()
    due = {
        "kill": start + args.kill_every,
        "master": start + args.master_every,
        "node": start + args.node_every,
    }
    rng = random.Random(2)
    while not soak.stop.is_set():
        now = time.monotonic()
        for role, node in list(processes.nodes.items()):
            if node.poll() is not None:
                soak.exits.append(f"the {role} node exited by itself with status {node.returncode}")
                soak.worker_epoch += 2 if role == "Worker" else 0  # it died when? not known
                processes.start_node(role)
        if processes.master is not None and processes.master.poll() is not None:
            soak.exits.append(f"the master exited by itself with status {processes.master.poll()}")
            processes.start_master()
        if args.kill_every and now >= due["kill"]:
            due["kill"] = now + args.kill_every
            if pids := processes.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    soak.kills += 1
        if args.master_every and now >= due["master"]:
            async with soak.submitting:
                hard = soak.master_restarts % 2 == 1  # every other one by SIGKILL
                soak.master_stops += 1
                await stop(soak, processes.master, "master", hard)
                processes.start_master()
                try:
                    await wait_for_master(join, _MASTER_START_S)
                except (ClientError, ConfigError, OSError) as error:
                    soak.exits.append(
                        f"the master did not answer within {_MASTER_START_S} s: {error}"
                    )
            soak.master_restarts += 1
            due["master"] = time.monotonic() + args.master_every
        if args.node_every and now >= due["node"]:
            names = list(processes.roles)
            name = names[soak.node_restarts % len(names)]
            hard = soak.node_restarts // len(names) % 2 == 1  # each node's other one by SIGKILL
            epochs = 1 if name == "Worker" else 0  # odd: its tasks may run on either node
            soak.worker_epoch += epochs
            await stop(soak, processes.nodes[name], f"{name} node", hard)
            processes.start_node(name)
            soak.worker_epoch += epochs
            soak.node_restarts += 1
            due["node"] = time.monotonic() + args.node_every
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, directory: Path) -> int:
    processes = Processes(directory, free_port(), args.workers, args.tls, args.direct)
    join = directory / "join.json"
    if args.tls:
        _client_tls.mode, _client_tls.ca_cert_path = "always", str(directory / _MASTER_CERT)
    soak = Soak(two_worker_nodes=args.direct)
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(_TcpEcho, "127.0.0.1", 0)
    udp, _ = await loop.create_datagram_endpoint(_UdpEcho, sock=udp_echo_socket())
    tcp_port = tcp.sockets[0].getsockname()[1]
    http, url = await http_server()
    targets = Targets(
        f"127.0.0.1:{tcp_port}", f"127.0.0.1:{udp.get_extra_info('sockname')[1]}", url
    )
    jobs: list[asyncio.Future[None]] = []
    try:
        processes.start_master()
        await wait_for_master(join)
        if args.tls:
            processes.trust()
        for name in processes.roles:
            processes.start_node(name)
        # The kills start once the nodes are ready: before, a node's one starting worker can
        # be the only one there is to kill, three times, and the node gives up starting.
        await asyncio.to_thread(processes.wait_ready)
        started = time.monotonic()
        submitter_done = asyncio.Event()

        async def submit_then_mark() -> None:
            try:
                await submitter(soak, join, args.batch, args.batch * 5, targets)
            finally:
                submitter_done.set()

        jobs += [
            asyncio.ensure_future(submit_then_mark()),
            asyncio.ensure_future(collector(soak, join, submitter_done)),
            asyncio.ensure_future(chaos(soak, processes, join, args)),
        ]
        await asyncio.sleep(args.duration)
        soak.stop.set()
        ran = time.monotonic() - started
        await asyncio.wait_for(jobs[2], 120)
        with contextlib.suppress(TimeoutError):  # what is still missing is reported
            await asyncio.wait_for(asyncio.gather(jobs[0], jobs[1]), args.settle)
        # A SIGTERM in a node's first second, before it has its handler, ends it with -15.
        await asyncio.to_thread(processes.wait_ready)
        for role, node in processes.nodes.items():
            await stop(soak, node, f"{role} node")
        await stop(soak, processes.master, "master")
    finally:
        # On Ctrl-C the loop runs on until this returns: chaos, unless cancelled, would start
        # again the processes that close() kills, and leave them running.
        for job in jobs:
            job.cancel()
        processes.close()
        tcp.close()
        udp.close()
        await http.cleanup()
    leftovers = [path.name for path in processes.shm_leftovers()]
    code = report(soak, ran, directory, leftovers)
    if not evidence(directory, processes, args):
        code = 1
    return code


def evidence(directory: Path, processes: Processes, args: argparse.Namespace) -> bool:
    """--tls, --direct: what the nodes' logs say was used; False when it was not (a soak that
    never crossed the link, or spoke plain TCP, proves nothing about it)."""
    ok = True
    if args.tls:
        connects = tls = 0
        for name in processes.roles:
            log = (directory / f"node-{name.lower()}.log").read_text(errors="replace")
            for line in re.findall(r"connecting to master \S+( \(TLS\))?", log):
                connects += 1
                tls += line != ""
        print(f"  TLS: {tls} of the nodes' {connects} attempts to connect to the master")
        ok = ok and tls == connects > 0
    if args.direct:
        dialer = (directory / "node-worker.log").read_text(errors="replace")
        peer = (directory / f"node-{_PEER.lower()}.log").read_text(errors="replace")
        offloaded = sum(map(int, re.findall(r"direct peer \S+ ran (\d+) tasks", dialer)))
        received = sum(map(int, re.findall(r"direct link from \S+ closed; it sent (\d+)", peer)))
        opened = len(re.findall(r"direct link to \S+ open", dialer))
        broken = re.findall(r"direct link to \S+ lost with (\d+) tasks in flight", dialer)
        draining = dialer.count("is stopping: what it did not start runs here")
        print(
            f"  direct link: opened {opened} times; {offloaded:,} tasks offloaded (the Worker's "
            f"logs of its clean stops), {received:,} received (the peer's logs of the links "
            f"closed); {len(broken)} broken with tasks in flight ({sum(map(int, broken)):,}), "
            f"{draining} drains of the peer with tasks it did not start"
        )
        ok = ok and offloaded > 0 and received > 0
    return ok


def short(result: m.Result) -> str:
    text = repr(result)
    return text if len(text) <= 200 else f"{text[:160]}... ({len(text):,} characters)"


def report(soak: Soak, ran: float, directory: Path, leftovers: list[str]) -> int:
    wrong: dict[str, m.Result] = {}
    errors: collections.Counter[str] = collections.Counter()
    network_errors = 0
    for ident, result in soak.results.items():
        if result in (soak.expected[ident], soak.also.get(ident)):
            continue
        if isinstance(result, m.Error) and result != _KEY_NOT_FOUND:  # a kill may explain it
            errors[result.message] += 1
            network_errors += ident in soak.network  # but not these
        else:  # "Key not found" where the node that stored the key answered, too
            wrong[ident] = result
    missing = len(soak.outstanding)
    total = len(soak.expected)
    print("| tasks | answered | tasks/s | worker kills | master restarts | node restarts "
          "| wrong | missing | errors | in doubt |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {total:,} | {len(soak.results):,} | {len(soak.results) / ran:,.0f} | {soak.kills} "
        f"| {soak.master_restarts} | {soak.node_restarts} | {len(wrong)} | {missing} "
        f"| {sum(errors.values())} | {soak.in_doubt} |"
    )
    kinds = soak.kinds
    print(
        f"  of them: {kinds['DiskWrite']:,} DiskWrites, {kinds['DiskRead']:,} DiskReads of what "
        f"they wrote, {kinds['Tcp']:,} Tcp and {kinds['Udp']:,} Udp tasks to echo servers"
    )
    print(
        f"  {kinds['StoreData']:,} StoreData ({kinds['segment-sized']:,} of them as frames of "
        f"{RESULT_SEGMENT_BYTES >> 20} MiB or more, which travel through payload segments; "
        f"{soak.blob_bytes / 2**20:,.0f} MiB in all), {kinds['RetrieveData']:,} RetrieveData of "
        f"what they stored: {', '.join(f'{n:,} {what}' for what, n in soak.outcomes.items())}"
    )
    print(
        f"  {kinds['HttpRequest']:,} HttpRequests ({kinds['large HttpRequest']:,} of more than "
        f"4,096 characters), {kinds['GetGlobalRam']:,} GetGlobalRam and {kinds['GetStorage']:,} "
        "GetStorage listings"
    )
    for message, count in errors.most_common():
        print(f"  Error x{count}: {message}")
    if network_errors:
        print(f"  {network_errors} of the Errors answered Tcp, Udp or HttpRequest tasks")
    if missing:
        print(f"  missing: {', '.join(list(soak.outstanding)[:5])}")
    for ident, result in list(wrong.items())[:10]:
        expected = soak.faults.get(ident) or f"expected {short(soak.expected[ident])}"
        print(f"  wrong: {ident}: {short(result)} ({expected})")
    tracebacks = {
        log.name: log.read_text(errors="replace").count("Traceback")
        for log in sorted(directory.glob("*.log"))
    }
    for exit in soak.exits:
        print(f"  {exit}")
    if leftovers:
        print(f"  left in {SHM_DIR} after the last stop: {', '.join(leftovers[:5])}")
    for name, count in tracebacks.items():
        if count:
            print(f"  {name}: {count} traceback(s)")
    print(f"logs: {directory}")
    failed = (
        bool(wrong)
        or missing > 0
        or sum(errors.values()) > soak.kills
        or network_errors > 0
        or any(tracebacks.values())
        or bool(soak.exits)
        or bool(leftovers)
    )
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120, help="seconds of submitting")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2000, help="tasks per submission")
    parser.add_argument("--kill-every", type=float, default=3, help="0: no worker kills")
    parser.add_argument("--master-every", type=float, default=20, help="0: no master restarts")
    parser.add_argument("--node-every", type=float, default=30, help="0: no node restarts")
    parser.add_argument(
        "--settle", type=float, default=120, help="seconds to wait for the last results"
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs' directory")
    parser.add_argument(
        "--tls", action="store_true", help="TLS only: the master, the nodes and the client"
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="a second Worker node that the first one lends its overflow over a direct link",
    )
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="cpnode-soak-"))
    code = asyncio.run(run(args, directory))
    if not args.keep and code == 0:
        shutil.rmtree(directory)
    sys.exit(code)


if __name__ == "__main__":
    main()
