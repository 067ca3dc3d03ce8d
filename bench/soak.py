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
most of what the master sends it overflows to the peer over the link. The peer's workers are
among those killed and the peer among the nodes restarted, so links break with tasks in flight
(the dialer runs those again itself). The nodes' logs must show that TLS was used for every
connection to the master and that tasks crossed the link, else the run fails. (The master's
`RequestConnection`/`ConnectionInfo` links are not used: they carry tasks only from a client
or a peer that sends them, not the master's overflow, so a soak of master work leaves them
idle.)

Tasks: `Compute` tasks whose values are known by construction (`a*b+c`), slower ones that a kill
is likely to find running, and `ComplexMath` sums, all different, so no cache answers them; and
`DiskWrite`s of random bytes to new files in new directories, each read back (`DiskRead`) once
its write is answered; and `Tcp` and `Udp` tasks to echo servers this process runs on loopback.

At the end every task must have its exact value; an `Error` is allowed only where a kill
explains it (a task safe to repeat is retried once, so it gets one only when kills find it
running twice; a `DiskWrite` is not retried), and the Errors' texts are printed. Exit status 1
when a result is wrong or missing, there are more Errors than kills, a log holds a traceback,
a process exited unbidden (it is started again) or did not stop cleanly on SIGTERM, or the
nodes left files in /dev/shm after the last stop; the logs' directory is kept then. Nothing
leaves loopback; every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
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

from node.client import Client, ClientError
from node.errors import ConfigError
from node.protocol import messages as m
from node.tls import ensure_certificate

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
    reads_due: list[tuple[m.Task, m.Result]] = field(default_factory=list)  # their DiskReads
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)  # submitted
    submitting: asyncio.Lock = field(default_factory=asyncio.Lock)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def make_batch(
    first: int, count: int, rng: random.Random, echoes: tuple[str, str]
) -> list[tuple[m.Task, m.Result]]:
    """`count` different tasks numbered from `first`, with their exact results; `echoes` are
    the addresses of this process's TCP and UDP echo servers."""
    batch: list[tuple[m.Task, m.Result]] = []
    for number in range(first, first + count):
        kind = rng.random()
        a, b = rng.randrange(1, 1000), rng.randrange(1, 1000)
        if kind < 0.03:  # a new file, in one of _DIRECTORIES new directories
            data = rng.randbytes(rng.randrange(0, 2048))
            path = f"soak/{number % _DIRECTORIES}/{number}.bin"
            batch.append((m.DiskWrite(path, data), m.Written()))
        elif kind < 0.05:  # echoed: one small write, one read
            data = rng.randbytes(rng.randrange(1, 512))
            batch.append((m.Tcp(echoes[0], data), m.Bytes(data)))
        elif kind < 0.06:
            data = rng.randbytes(rng.randrange(1, 512))
            batch.append((m.Udp(echoes[1], data), m.Bytes(data)))
        elif kind < 0.11:  # slow: the sum of many zero terms, exact in floats
            body = "+".join(["sin(1)*0"] * _SLOW_TERMS)
            batch.append((m.Compute(f"{number}+{body}"), m.Number(float(number))))
        elif kind < 0.18:
            task = m.ComplexMath(f"({number}+{a}*i)+({b}+{a}*i)")
            batch.append((task, m.Response(f"{number + b}+{2 * a}i")))
        else:
            batch.append((m.Compute(f"{a}*{b}+{number}"), m.Number(float(a * b + number))))
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
    soak: Soak, join: Path, batch: int, most_outstanding: int, echoes: tuple[str, str]
) -> None:
    """New tasks while the run lasts, each written file's read as soon as its write is
    answered; after the run, the reads of the writes still running."""
    rng = random.Random(1)
    number = 0
    while not soak.stop.is_set() or soak.written or soak.reads_due:
        if soak.stop.is_set() or len(soak.outstanding) >= most_outstanding:
            tasks = []
        else:
            tasks = make_batch(number, batch, rng, echoes)
            number += batch
        tasks += soak.reads_due
        soak.reads_due = []
        if tasks:
            await submit(soak, join, tasks)
        else:
            await asyncio.sleep(0.02)


async def submit(soak: Soak, join: Path, tasks: list[tuple[m.Task, m.Result]]) -> None:
    async with soak.submitting:
        try:
            async with connect(join, timeout=10) as client:
                ids = await client.submit_many([task for task, _ in tasks])
        except ClientError as error:
            soak.in_doubt += len(tasks)
            print(f"submission of {len(tasks)} tasks failed: {error}", file=sys.stderr)
            return
    for ident, (task, result) in zip(ids, tasks, strict=True):
        soak.kinds[type(task).__name__] += 1
        soak.expected[ident] = result
        soak.outstanding[ident] = None
        if isinstance(task, m.DiskWrite):
            soak.written[ident] = task


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
        for ident, result in done.items():
            soak.results[ident] = result
            soak.outstanding.pop(ident, None)
            write = soak.written.pop(ident, None)
            if write is not None and result == m.Written():  # read it back
                soak.reads_due.append((m.DiskRead(write.path), m.Bytes(write.data)))


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
            await stop(soak, processes.nodes[name], f"{name} node", hard)
            processes.start_node(name)
            soak.node_restarts += 1
            due["node"] = time.monotonic() + args.node_every
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, directory: Path) -> int:
    processes = Processes(directory, free_port(), args.workers, args.tls, args.direct)
    join = directory / "join.json"
    if args.tls:
        _client_tls.mode, _client_tls.ca_cert_path = "always", str(directory / _MASTER_CERT)
    soak = Soak()
    loop = asyncio.get_running_loop()
    tcp = await loop.create_server(_TcpEcho, "127.0.0.1", 0)
    udp, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.1", 0))
    tcp_port = tcp.sockets[0].getsockname()[1]
    echoes = (f"127.0.0.1:{tcp_port}", f"127.0.0.1:{udp.get_extra_info('sockname')[1]}")
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
                await submitter(soak, join, args.batch, args.batch * 5, echoes)
            finally:
                submitter_done.set()

        jobs = [
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
        processes.close()
        tcp.close()
        udp.close()
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


def report(soak: Soak, ran: float, directory: Path, leftovers: list[str]) -> int:
    wrong = {
        i: r
        for i, r in soak.results.items()
        if r != soak.expected[i] and not isinstance(r, m.Error)
    }
    errors = collections.Counter(r.message for r in soak.results.values() if isinstance(r, m.Error))
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
    for message, count in errors.most_common():
        print(f"  Error x{count}: {message}")
    if missing:
        print(f"  missing: {', '.join(list(soak.outstanding)[:5])}")
    for ident, result in list(wrong.items())[:10]:
        print(f"  wrong: {ident}: {result} (expected {soak.expected[ident]})")
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
