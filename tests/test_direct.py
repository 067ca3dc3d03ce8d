"""Direct links between real node processes and from the client library, on loopback: tasks and
results over the link (not through the master), the token check, a node that gives the
tasks it has no room for to a peer it dialed, and the `ConnectionInfo`s a node acts on (only
answers to its own `RequestConnection`s, only to peers `network_allow`/`network_deny` let it
reach)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client import Client
from node.config import Config
from node.direct import (
    ConnectionRequests,
    DirectClient,
    DirectConnection,
    DirectError,
    DirectLinkRefused,
    _peer_result,
)
from node.iotasks import NetworkPolicy
from node.master import MasterThread
from node.protocol import codec
from node.protocol import messages as m
from node.protocol.framing import FrameDecoder, frame
from tests.idle import IdleConnections
from tests.netservers import TcpEcho, free_port
from tests.nodeproc import NodeProcess
from tests.scripted import ScriptedMaster, stop_node
from tests.scripted import start_node as start_scripted_node
from tests.test_node import run_tasks

FAILOVER_MS = 1000
TIMEOUT = 30.0


@pytest.fixture
def master(tmp_path: Path) -> Iterator[MasterThread]:
    config = Config(failover_timeout_ms=FAILOVER_MS)
    with MasterThread(config, join_path=str(tmp_path / "join.json")) as running:
        yield running


def start_node(
    tmp_path: Path, name: str, master: MasterThread, config: dict[str, object], *args: str
) -> NodeProcess:
    home = tmp_path / name
    home.mkdir()
    settings = {"failover_timeout_ms": FAILOVER_MS, "master_addresses": [master.address]}
    process = NodeProcess(home, tmp_path / "join.json", settings | config, "--workers", "1", *args)
    try:
        process.wait_for_log("node ready")
    except BaseException:
        process.close()
        raise
    return process


def start_lending_node(tmp_path: Path, master: MasterThread, port: int) -> NodeProcess:
    """A node with no room (prefetch 1, one worker) that lends to the direct port `port`,
    its link open."""
    node = start_node(
        tmp_path, "node", master, {"prefetch": 1}, "--connect-to", f"127.0.0.1:{port}"
    )
    try:
        node.wait_for_log("direct link to 127.0.0.1")
    except BaseException:
        node.close()
        raise
    return node


@pytest.fixture
def peer(tmp_path: Path, master: MasterThread) -> Iterator[tuple[NodeProcess, int]]:
    port = free_port()
    # A Disk node: the master routes no Compute to it, so what it computes came over a link.
    process = start_node(
        tmp_path, "peer", master, {"direct_port": port, "direct_host": "127.0.0.1", "role": "Disk"}
    )
    try:
        process.wait_for_log("accepting direct links on")
        yield process, port
    finally:
        process.close()


def test_client_runs_tasks_over_a_direct_link_not_through_the_master(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    process, port = peer

    async def go() -> list[m.Result]:
        async with await DirectClient.connect("127.0.0.1", port, master.token) as client:
            with TcpEcho(lambda data: data.upper()) as echo:
                tasks: list[m.Task] = [m.Compute(f"{i}*3") for i in range(500)]
                tasks.append(m.Tcp(f"127.0.0.1:{echo.port}", b"over the link"))
                tasks.append(m.Compute("nope"))
                return await client.run_many(tasks, timeout=TIMEOUT)

    results = asyncio.run(go())
    assert results[:500] == [m.Number(float(i * 3)) for i in range(500)]
    assert results[500] == m.Bytes(b"OVER THE LINK")
    assert isinstance(results[501], m.Error)
    assert master.stats().completed == 0  # nothing went to the master
    process.wait_for_log("it sent 502 tasks")


def test_a_client_that_stops_waiting_keeps_no_waiter(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    _, port = peer
    with socket.socket() as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()

        async def go() -> int:
            async with await DirectClient.connect("127.0.0.1", port, master.token) as client:
                task = m.Tcp(f"127.0.0.1:{silent.getsockname()[1]}", b"anyone?")
                with pytest.raises(TimeoutError):
                    await client.run_many([task, task], timeout=0.5)
                return client.pending

        assert asyncio.run(go()) == 0


def test_a_wrong_token_is_refused_and_logged(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    process, port = peer

    async def go() -> None:
        await DirectClient.connect("127.0.0.1", port, "not-the-token", timeout=TIMEOUT)

    with pytest.raises(DirectLinkRefused, match="Invalid token"):
        asyncio.run(go())
    process.wait_for_log("invalid token; refused and closed")

    async def many() -> None:
        for _ in range(50):
            with pytest.raises(DirectLinkRefused, match="Invalid token"):
                await go()

    # Anyone who reaches the port can repeat it at will: each is refused, but said at most
    # once per 10 s (with a count), or the log's disk would fill.
    asyncio.run(many())
    assert process.log.count("invalid token") == 1


def test_two_links_may_use_the_same_ids(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    _, port = peer

    async def go() -> list[m.Result]:
        async with (
            await DirectClient.connect("127.0.0.1", port, master.token) as first,
            await DirectClient.connect("127.0.0.1", port, master.token) as second,
        ):
            # Two links, the same id on each: each gets its own result.
            first._prefix = second._prefix = "same"
            return await asyncio.gather(
                first.run(m.Compute("1+1"), TIMEOUT), second.run(m.Compute("2+2"), TIMEOUT)
            )

    assert asyncio.run(go()) == [m.Number(2.0), m.Number(4.0)]


def test_a_node_gives_the_tasks_it_has_no_room_for_to_its_peer(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    peer_process, port = peer
    node = start_lending_node(tmp_path, master, port)
    try:
        body = "+".join(f"sin({k})" for k in range(40))
        tasks: list[m.Task] = [m.Compute(f"{i}+{body}") for i in range(300)]
        results = run_tasks(tmp_path / "join.json", tasks, timeout=TIMEOUT)
        assert all(isinstance(r, m.Number) for r in results)
        assert master.stats().completed >= 300
        assert node.stop() == 0
        given = int(re.search(r"direct peer \S+ ran (\d+) tasks", node.log).group(1))  # type: ignore[union-attr]
        assert 0 < given <= 300, given
        peer_process.wait_for_log(f"it sent {given} tasks")
    finally:
        node.close()


def lend_then_stop_the_peer(
    tmp_path: Path, master: MasterThread, peer: NodeProcess, port: int, signal_number: int
) -> tuple[NodeProcess, list[m.Result]]:
    """A node lending slow Computes to `peer`, which gets `signal_number` mid-burst; returns
    the node (to be closed by the caller) and every result, in order."""
    node = start_lending_node(tmp_path, master, port)
    try:
        body = "+".join(f"sin({k})*cos({k})" for k in range(300))
        tasks: list[m.Task] = [m.Compute(f"{i}+{body}") for i in range(400)]

        async def go() -> list[m.Result]:
            async with Client.connect(tmp_path / "join.json", timeout=TIMEOUT) as client:
                ids = await client.submit_many(tasks)
                await asyncio.sleep(0.3)
                peer.proc.send_signal(signal_number)  # mid-burst: the peer holds tasks
                found = await client.results(ids, timeout=60)
                return [found[i] for i in ids]

        return node, asyncio.run(go())
    except BaseException:
        node.close()
        raise


def test_tasks_at_a_lost_peer_run_here(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # SIGKILL: the peer never answers the tasks it holds.
    node, results = lend_then_stop_the_peer(tmp_path, master, *peer, signal.SIGKILL)
    try:
        assert all(isinstance(r, m.Number) for r in results), results
        node.wait_for_log("re-run or answered here")
    finally:
        node.close()


def test_tasks_a_draining_peer_did_not_start_run_here(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # A peer stopped by SIGTERM drains: what it had not started it answers with an Error
    # ("the node is stopping"), as it must for a client's link. The node that lent it those
    # tasks has them from the master and can run them itself; none may end as that Error.
    peer_process, _ = peer
    node, results = lend_then_stop_the_peer(tmp_path, master, *peer, signal.SIGTERM)
    try:
        assert peer_process.proc.wait(TIMEOUT) == 0
        errors = [r for r in results if not isinstance(r, m.Number)]
        assert not errors, f"{len(errors)} of {len(results)}: {errors[0]}"
        assert "it sent" in peer_process.log  # the link was used
        node.wait_for_log("is stopping: what it did not start runs here")  # that path ran
    finally:
        node.close()


def test_only_tasks_without_data_are_lent_to_a_peer(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # A StoreData lent to the peer stored its key in the peer's store, where a RetrieveData
    # that this node runs later does not find it: tasks on a store or a disk stay here.
    _, port = peer
    node = start_lending_node(tmp_path, master, port)
    try:
        body = "+".join(f"sin({k})" for k in range(40))
        tasks: list[m.Task] = []
        for i in range(150):
            tasks += [m.Compute(f"{i}+{body}"), m.StoreData(f"key-{i}", bytes([i]) * 10)]
        results = run_tasks(tmp_path / "join.json", tasks, timeout=TIMEOUT)
        assert results[1::2] == [m.Stored()] * 150, results[1::2]

        async def read_one_at_a_time() -> list[m.Result]:  # the node has room for each one
            async with Client.connect(tmp_path / "join.json", timeout=TIMEOUT) as client:
                return [await client.run(m.RetrieveData(f"key-{i}"), TIMEOUT) for i in range(150)]

        assert asyncio.run(read_one_at_a_time()) == [m.Bytes(bytes([i]) * 10) for i in range(150)]
        assert node.stop() == 0
        given = int(re.search(r"direct peer \S+ ran (\d+) tasks", node.log).group(1))  # type: ignore[union-attr]
        assert 0 < given <= 150, given  # Computes only
    finally:
        node.close()


def test_cpnode_submit_direct(
    tmp_path: Path, master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    _, port = peer
    env = dict(os.environ, CPCLUSTER_JOIN=str(tmp_path / "join.json"))
    done = subprocess.run(
        [sys.executable, "-m", "node.submit_cli", "--direct", f"127.0.0.1:{port}", "compute", "6*7"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "42\n"), done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "node.submit_cli", "--direct", f"127.0.0.1:{port}", "--token",
         "wrong", "compute", "1"],
        env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert refused.returncode == 3
    assert "Invalid token" in refused.stderr


def answer_seven(link: DirectConnection, ident: str, payload: bytes) -> None:
    """A peer's task answered on its link, with 7, as a node's dispatcher would."""
    link.send_results(
        frame(codec.task_result_payload(link.prefix + ident, m.Number(7.0))),
        [link.prefix + ident],
    )


def test_connection_info_listens_on_the_port_and_the_first_link_wins() -> None:
    from node.config import JoinInfo
    from node.direct import accept_connection_info
    from node.tls import ServerTls

    port = free_port()
    config = Config(failover_timeout_ms=3000)
    join = JoinInfo("secret", "127.0.0.1", 1)

    async def go() -> m.Result:
        links: set[DirectConnection] = set()
        # The master names a peer at [::1]; nothing listens there, so the link that wins is
        # the one the peer (this test) dials in on the port the master gave.
        opening = asyncio.ensure_future(
            accept_connection_info(
                m.ConnectionInfo("[::1]:40000", port), config=config, join=join,
                on_task=answer_seven, links=links, listen_tls=ServerTls(None, "auto"),
                policy=NetworkPolicy(config.network_allow, config.network_deny),
            )
        )  # fmt: skip
        client = None
        for _ in range(100):
            try:
                client = await DirectClient.connect("127.0.0.1", port, "secret", timeout=1)
                break
            except DirectError:
                await asyncio.sleep(0.02)
        assert client is not None
        async with client:
            link = await asyncio.wait_for(opening, TIMEOUT)
            # The link this test dialed in on won: it is the one kept (and the only one), and
            # it is the inbound end, not the node's own dial to [::1] (which nothing answers).
            assert link is not None
            assert links == {link}
            assert link.dialer is False
            result = await client.run(m.Compute("anything"), TIMEOUT)
            # The task went over the winning link.
            assert link.tasks_run == 1
        link.close()
        return result

    assert asyncio.run(go()) == m.Number(7.0)


def test_a_connection_info_port_bounds_its_idle_connections() -> None:
    # The port a ConnectionInfo names was listened on with no bound: idle connections from
    # anyone held a descriptor each until their token was due. Now 64 at most (the direct
    # port's bound), the oldest closed as newcomers come, and the real peer still wins.
    from node.config import JoinInfo
    from node.direct import accept_connection_info
    from node.tls import ServerTls

    port = free_port()
    config = Config(failover_timeout_ms=15000)
    join = JoinInfo("secret", "127.0.0.1", 1)

    def hold_idle() -> set[int]:
        deadline = time.monotonic() + TIMEOUT
        while True:  # until the listener is up
            try:
                idle = IdleConnections(port, 70)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        holders.append(idle)
        # Well inside the listener's window (failover_timeout_ms) and the 10 s a first byte has.
        return idle.wait_closed(6, timeout=3.0)

    holders: list[IdleConnections] = []

    async def go() -> tuple[set[int], m.Result]:
        opening = asyncio.ensure_future(
            accept_connection_info(
                m.ConnectionInfo("[::1]:40000", port), config=config, join=join,
                on_task=answer_seven, links=set(), listen_tls=ServerTls(None, "auto"),
                policy=NetworkPolicy(config.network_allow, config.network_deny),
            )
        )  # fmt: skip
        closed = await asyncio.to_thread(hold_idle)
        try:
            client = await DirectClient.connect("127.0.0.1", port, "secret", timeout=TIMEOUT)
        except DirectError:
            opening.cancel()
            raise
        async with client:
            link = await asyncio.wait_for(opening, TIMEOUT)
            assert link is not None
            assert link.dialer is False
            result = await client.run(m.Compute("anything"), TIMEOUT)
        link.close()
        return closed, result

    try:
        closed, result = asyncio.run(go())
    finally:
        for idle in holders:
            idle.close()
    assert closed == set(range(6))  # the oldest six: 64 stay
    assert result == m.Number(7.0)


def test_a_connection_info_peer_is_dialed_at_each_of_its_addresses_in_turn() -> None:
    # Only the first address a name resolved to was dialed: a peer listening on its second
    # one (IPv4 behind an IPv6 first, say) was never reached from this side.
    from node.direct import _dial_each

    port = free_port()

    async def go() -> str:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: DirectConnection(token="secret", dialer=False, max_frame_bytes=1 << 20),
            "127.0.0.1",
            port,
        )
        try:
            link = await _dial_each(
                ["127.0.0.2", "127.0.0.1"], port, timeout=TIMEOUT, token="secret",
                tls_mode="never", tls=None, max_frame_bytes=1 << 20,
            )  # fmt: skip
            link.close()
            return link.peer
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(go()) == f"127.0.0.1:{port}"


def test_tasks_in_another_json_form_are_run_over_a_direct_link(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # An AssignTask with spaces before its first key was decoded, then ignored: the dialer
    # waited for ever.
    _, port = peer
    odd = b' {"AssignTask": {"task": {"Compute": {"expression": "20+22"}}, "id": "odd"}}'
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        decoder = FrameDecoder()
        sock.sendall(frame(master.token.encode()) + frame(odd))
        payloads: list[bytes] = []
        while not any(p.startswith(b'{"TaskResult"') for p in payloads):
            data = sock.recv(1 << 16)
            assert data, f"the link closed; it sent {payloads}"
            payloads += decoder.feed(data)
    assert payloads[0] == b"OK"
    (result,) = [codec.decode(p) for p in payloads if p.startswith(b'{"TaskResult"')]
    assert result == m.TaskResult("odd", m.Number(42.0))


# --- which ConnectionInfo a node acts on ----------------------------------------------------------


def test_connection_requests_are_answered_once_and_only_on_their_connection() -> None:
    requests = ConnectionRequests()
    assert not requests.answer("127.0.0.1:4000")  # nothing asked yet
    requests.sent(["127.0.0.1:4000", "[0:0::1]:4001", "Peer.Example.:4002", "not an address"])
    assert not requests.answer("127.0.0.1:4001")  # another port
    assert not requests.answer("127.0.0.2:4000")  # another host
    assert requests.answer("127.0.0.1:4000")
    assert not requests.answer("127.0.0.1:4000")  # answered already
    # Spelled otherwise, the same address.
    assert requests.answer("[::1]:4001")
    assert requests.answer("peer.example:4002")
    assert requests.answer("not an address")
    requests.sent(["[::ffff:10.0.0.5]:4000", "[::ffff:10.0.0.5]:4000"])
    assert requests.answer("10.0.0.5:4000")
    # A new master connection: what the earlier one was asked is void.
    requests.sent(["127.0.0.1:5000"])
    assert not requests.answer("10.0.0.5:4000")
    assert requests.answer("127.0.0.1:5000")


def listening_socket() -> socket.socket:
    """A socket on 127.0.0.1 that nobody is meant to reach (see `was_connected`)."""
    return socket.create_server(("127.0.0.1", 0))


def assert_nobody_connected(server: socket.socket) -> None:
    """The kernel queues a connection to `server` (and what it sent) whether or not it is
    accepted, so one accept without waiting tells whether anything connected."""
    server.setblocking(False)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return
    with conn:
        conn.settimeout(1)
        sent = conn.recv(4096)
    raise AssertionError(f"something connected to {server.getsockname()} and sent {sent!r}")


def nothing_listens_on(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_an_unrequested_connection_info_opens_no_listener_and_dials_nothing(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # The node asks for one peer; the master names two others. Each would have had the node
    # listen on the port and dial it with the cluster token.
    requested = "127.0.0.1:7001"
    idle = free_port()
    with listening_socket() as target:
        port = target.getsockname()[1]
        node = start_scripted_node(
            tmp_path, scripted, "conninfo-unrequested", workers=1,
            args=["--request-connection", requested],
        )  # fmt: skip
        try:
            assert scripted.expect(m.RequestConnection) == m.RequestConnection(requested)
            scripted.send_raw(
                codec.encode(m.ConnectionInfo(f"127.0.0.1:{port}", port))
                + codec.encode(m.ConnectionInfo(f"127.0.0.1:{idle}", idle))
            )
            # Both frames were handled before this task (a connection's frames are read in
            # order), and a poll after its result.
            assert scripted.run(m.Compute("6*7")) == m.Number(42.0)
            scripted.expect(m.Heartbeat)
            assert nothing_listens_on(idle)
            node.wait_for_log(f"ignoring a ConnectionInfo for '127.0.0.1:{idle}'")
            assert f"ignoring a ConnectionInfo for '127.0.0.1:{port}'" in node.log
            assert_nobody_connected(target)
            assert "direct link with" not in node.log
            assert stop_node(node, scripted) == 0
        finally:
            node.close()


def test_a_connection_info_read_with_the_masters_ok_answers_nothing(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # Asked on the first connection, answered on the next one before it registered (in the
    # same read as the master's "OK"): not an answer to anything this connection sent.
    requested = "127.0.0.1:7001"
    idle = free_port()
    node = start_scripted_node(
        tmp_path, scripted, "conninfo-early", workers=1, args=["--request-connection", requested]
    )
    try:
        scripted.expect(m.RequestConnection)
        scripted.accept(after_ok=codec.encode(m.ConnectionInfo(requested, idle)))
        assert scripted.expect(m.RequestConnection) == m.RequestConnection(requested)
        assert scripted.run(m.Compute("1+1")) == m.Number(2.0)
        node.wait_for_log(f"ignoring a ConnectionInfo for '{requested}'")
        assert nothing_listens_on(idle)
        assert "direct link with" not in node.log
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


def test_a_requested_connection_info_to_a_refused_peer_dials_nothing(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    # The reviewer's case: a Tcp task could not reach the peer, so neither may the token.
    idle = free_port()
    with listening_socket() as target:
        port = target.getsockname()[1]
        node = start_scripted_node(
            tmp_path, scripted, "conninfo-refused", workers=1,
            network_deny=["127.0.0.0/8", "::1/128"],
            args=["--request-connection", "127.0.0.1:7001", "--request-connection", "[::1]:7002"],
        )  # fmt: skip
        try:
            scripted.expect(m.RequestConnection)
            scripted.expect(m.RequestConnection)
            scripted.send_raw(
                codec.encode(m.ConnectionInfo("127.0.0.1:7001", port))
                + codec.encode(m.ConnectionInfo("[::1]:7002", idle))
            )
            node.wait_for_log(
                f"ConnectionInfo 127.0.0.1:7001 port {port}: 127.0.0.1 is refused by network_deny"
                " 127.0.0.0/8; no listener, no dial"
            )
            node.wait_for_log(
                f"ConnectionInfo [::1]:7002 port {idle}: ::1 is refused by network_deny ::1/128;"
                " no listener, no dial"
            )
            assert nothing_listens_on(idle)
            assert_nobody_connected(target)
            assert "did not request it" not in node.log
            assert stop_node(node, scripted) == 0
        finally:
            node.close()


def test_a_requested_connection_info_opens_a_link_once(
    tmp_path: Path, scripted: ScriptedMaster
) -> None:
    requested = "127.0.0.1:7001"
    port = free_port()
    node = start_scripted_node(
        tmp_path, scripted, "conninfo-requested", workers=1, direct_host="127.0.0.1",
        args=["--request-connection", requested],
    )  # fmt: skip
    try:
        assert scripted.expect(m.RequestConnection) == m.RequestConnection(requested)
        # Nothing else listens on the port, so the node's dial reaches its own listener: a
        # link with itself, opened as a link with a peer would be.
        scripted.send_raw(codec.encode(m.ConnectionInfo(requested, port)))
        node.wait_for_log("direct link with 127.0.0.1:")
        assert "(ConnectionInfo)" in node.log
        scripted.send_raw(codec.encode(m.ConnectionInfo(requested, port)))  # answered already
        node.wait_for_log(f"ignoring a ConnectionInfo for '{requested}'")
        assert node.log.count("direct link with") == 1
        assert stop_node(node, scripted) == 0
    finally:
        node.close()


class ForgingPeer:
    """A direct port on 127.0.0.1 that takes any token and answers the tasks it is lent with
    results of its own making, by turns: `Number` null (no master parses it), a valid result in
    another JSON form, a big valid `Bytes` and a big `Bytes` with an element above 255. Runs in
    a thread; `answered` maps each task id to the kind of answer it got."""

    KINDS = ("null", "spaced", "big", "big-bad")
    BIG = bytes(range(256)) * 400  # 100 KiB: read in a thread, not on the node's loop

    def __init__(self) -> None:
        self.answered: dict[str, str] = {}
        self._server = socket.socket()
        self._server.bind(("127.0.0.1", 0))
        self._server.listen()
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ForgingPeer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._server.close()

    def _answer(self, ident: str) -> bytes:
        kind = self.KINDS[len(self.answered) % len(self.KINDS)]
        self.answered[ident] = kind
        quoted = json.dumps(ident).encode()
        if kind == "null":
            return b'{"TaskResult":{"id":' + quoted + b',"result":{"Number":null}}}'
        if kind == "spaced":
            return b'{"TaskResult": {"result": {"Number": 7.0}, "id": ' + quoted + b"}}"
        array = codec.encode_payload(m.TaskResult(ident, m.Bytes(self.BIG)))
        return array if kind == "big" else array.replace(b"[0,1,2,", b"[0,1,300,", 1)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                # Reads wake every 0.2 s to see `_stop`; a big answer's send may wait longer
                # for a loaded node to read it.
                conn.settimeout(0.2)
                send = functools.partial(_send_within, conn, TIMEOUT)
                decoder = FrameDecoder(1 << 20)
                greeted = False
                while not self._stop.is_set():
                    try:
                        data = conn.recv(1 << 16)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    for payload in decoder.feed(data):
                        if not greeted:
                            greeted = True
                            send(frame(b"OK"))
                        elif payload.startswith(b'{"AssignTask"'):
                            send(frame(self._answer(str(codec.peek_id(payload)))))
                        elif payload == b'"Heartbeat"':
                            send(frame(b'"HeartbeatAck"'))


def _send_within(conn: socket.socket, timeout: float, data: bytes) -> None:
    """`conn.sendall(data)` with its own `timeout`, the socket's read timeout put back after."""
    previous = conn.gettimeout()
    conn.settimeout(timeout)
    try:
        conn.sendall(data)
    finally:
        conn.settimeout(previous)


def test_a_peers_results_are_checked_before_they_reach_the_master(
    tmp_path: Path, master: MasterThread
) -> None:
    # The master drops a connection that sends a frame it cannot parse, and the outbox sends
    # every unconfirmed result again on the next one: a peer's malformed result passed on as it
    # came would keep the node from delivering anything, ever. (A plain link's peer need not
    # know the token: anyone answering at the `connect_to` address is lent tasks.)
    with ForgingPeer() as forger:
        node = start_lending_node(tmp_path, master, forger.port)
        try:
            body = "+".join(f"sin({k})*cos({k})" for k in range(300))
            tasks: list[m.Task] = [m.Compute(f"{i}+{body}") for i in range(40)]

            async def go() -> dict[str, m.Result]:
                async with Client.connect(tmp_path / "join.json", timeout=TIMEOUT) as client:
                    ids = await client.submit_many(tasks)
                    return await client.results(ids, timeout=TIMEOUT)

            results = asyncio.run(go())
            assert len(results) == 40
            assert set(forger.KINDS) <= set(forger.answered.values()), forger.answered
            for ident, kind in forger.answered.items():
                result = results[ident]
                if kind in ("null", "big-bad"):
                    assert isinstance(result, m.Error), (kind, result)
                    assert "sent a malformed result" in result.message, result
                elif kind == "spaced":
                    assert result == m.Number(7.0)
                else:
                    assert result == m.Bytes(forger.BIG)
            assert "malformed frame" not in node.log
            assert node.stop() == 0
        finally:
            node.close()


def test_connections_that_never_authenticate_hold_few_descriptors(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # Anyone who can reach a direct port can open connections and send nothing; each held a
    # descriptor of the node's for 30 s, without a bound, up to the process's limit (which
    # the master link, workers, segments and files share). 80 from five addresses: 64 stay.
    process, port = peer
    sources = [f"127.0.0.{n}" for n in range(2, 7)]
    held = [IdleConnections(port, 16, source=source) for source in sources]
    try:

        def closed() -> int:
            return sum(len(idle.closed()) for idle in held)

        deadline = time.monotonic() + TIMEOUT
        while closed() < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert closed() == 16
        process.wait_for_log("64 connections are not authenticated yet, the most it holds")
    finally:
        for idle in held:
            idle.close()

    async def go() -> m.Result:
        async with await DirectClient.connect("127.0.0.1", port, master.token) as client:
            return await client.run(m.Compute("6*7"), timeout=TIMEOUT)

    assert asyncio.run(go()) == m.Number(42.0)


def test_one_address_filling_the_port_gives_way_and_a_peer_behind_it_still_gets_in(
    master: MasterThread, peer: tuple[NodeProcess, int]
) -> None:
    # One client opening idle connections from one address (again as each was closed) held
    # all 64 slots, for 30 s each, and kept every peer out. Once all are held now, its oldest
    # are closed as newcomers come (waiting for a first byte, or for the rest of a token), and
    # a peer behind the same address (here all of them are on 127.0.0.1) connects at once.
    process, port = peer
    with (
        IdleConnections(port, 50) as silent,
        IdleConnections(port, 50, first=b"\x00") as partial,  # a token's length begun
    ):
        assert silent.wait_closed(36, timeout=5) == set(range(36))  # 64 are left
        time.sleep(0.2)
        assert partial.closed() == set()

        async def go() -> m.Result:
            async with await DirectClient.connect(
                "127.0.0.1", port, master.token, timeout=5
            ) as client:
                return await client.run(m.Compute("6*7"), timeout=TIMEOUT)

        assert asyncio.run(go()) == m.Number(42.0)
        # The peer's connection took the place of the oldest left.
        assert silent.wait_closed(37, timeout=5) == set(range(37))
        time.sleep(0.2)
        assert silent.closed() == set(range(37))
        assert partial.closed() == set()
    process.wait_for_log("the most it holds: the oldest of 127.0.0.1's 64 closed")
    time.sleep(0.2)  # what the node still had to log of these
    lines = process.log.count("the most it holds")
    assert 1 <= lines <= 2, process.log  # 37 closed; a loaded machine may take two periods


def test_a_connection_info_listener_without_a_direct_port_keeps_tls_always() -> None:
    # From a security review: with tls "always" and no direct_port, the port a ConnectionInfo
    # names took plain links (its listener was built with "never"), token and tasks in clear.
    from node.config import JoinInfo
    from node.direct import DirectLinks
    from node.dispatch import Dispatcher

    port = free_port()
    config = Config(tls="always", failover_timeout_ms=3000, direct_host="127.0.0.1")
    requested = "127.0.0.1:7001"

    async def go() -> None:
        links = DirectLinks(
            config, JoinInfo("secret", "127.0.0.1", 1), Dispatcher(4, lambda blob, count: None),
            NetworkPolicy(config.network_allow, config.network_deny),
        )  # fmt: skip
        links.request_connections = [requested]
        links.registered(lambda message: None)
        links.connection_info(m.ConnectionInfo(requested, port), registered=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while await asyncio.to_thread(nothing_listens_on, port):
                assert time.monotonic() < deadline, "the ConnectionInfo's port never listened"
                await asyncio.sleep(0.02)
            with pytest.raises(DirectError):  # plain TCP, with the right token
                async with await DirectClient.connect("127.0.0.1", port, "secret", timeout=5):
                    pass
            assert not links.links
        finally:
            await links.close()

    asyncio.run(go())


def test_failed_tls_handshakes_do_not_close_the_direct_port(
    tmp_path: Path, master: MasterThread
) -> None:
    # A link whose TLS handshake fails is never told it was made or lost: the direct port
    # kept it as "not authenticated yet" for good, and after 64 such handshakes (from anyone
    # who can reach the port, no token needed) it closed every connection at once, for ever.
    port = free_port()
    process = start_node(
        tmp_path, "peer", master,
        {"direct_port": port, "direct_host": "127.0.0.1", "role": "Disk",
         "cert_path": "node_cert.pem", "key_path": "node_key.pem"},
    )  # fmt: skip
    try:
        process.wait_for_log("accepting direct links on")
        for _ in range(70):
            with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello")  # a TLS record, but no ClientHello
                sock.settimeout(TIMEOUT)
                with contextlib.suppress(OSError):
                    while sock.recv(4096):  # until the node has closed it
                        pass

        async def go() -> m.Result:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client = await DirectClient.connect("127.0.0.1", port, master.token, timeout=5)
                    break
                except DirectError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            async with client:
                return await client.run(m.Compute("6*7"), timeout=TIMEOUT)

        assert asyncio.run(go()) == m.Number(42.0)
        assert "not authenticated yet" not in process.log
    finally:
        process.close()


def test_connections_refused_before_a_token_are_logged_at_most_once_per_period(
    peer: tuple[NodeProcess, int],
) -> None:
    # As refused tokens: anyone who reaches the port can open connections that close at once,
    # or whose first frame is no token, as fast as it connects; a warning line for each would
    # fill the log's disk.
    process, port = peer
    for _ in range(40):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
    for length in [1 << 16] * 40 + [0x7FFFFFFF] * 40:  # too long for a token, for any frame
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(length.to_bytes(4, "big"))
            sock.settimeout(TIMEOUT)
            with contextlib.suppress(OSError):
                while sock.recv(4096):  # until the node has closed it
                    pass
    process.wait_for_log("first frame is not a token")
    time.sleep(0.5)  # what the node still had to log of these
    log = process.log  # two lines at most: a loaded machine may take more than one period
    assert 1 <= log.count("closed before sending anything") <= 2, log
    assert 1 <= log.count("first frame is not a token") + log.count("bytes announced") <= 2, log


def test_a_big_result_from_a_peer_is_checked_without_holding_the_event_loop() -> None:
    # A connect_to peer's result above 64 KiB is read and written again in a thread, so that
    # the node's event loop goes on (heartbeats leave on time). Its JSON was put together with
    # `+`, a copy of the whole that holds the GIL each time: a 20 MiB `Bytes` result (70 MB of
    # JSON) held the loop for about 250 ms. `bytes.join` lets go of the GIL for big pieces.
    data = os.urandom(20 << 20)
    payload = codec.task_result_payload("big", m.Bytes(data))

    async def longest_pause() -> tuple[float, bytes]:
        loop = asyncio.get_running_loop()
        checking = loop.run_in_executor(None, _peer_result, "big", payload, "peer")
        longest, last = 0.0, time.perf_counter()
        while not checking.done():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
        return longest, await checking

    pauses = []
    for _ in range(3):  # the best of three: a loaded machine pauses a loop now and then
        pause, result = asyncio.run(longest_pause())
        assert result == frame(payload)
        pauses.append(pause)
    assert min(pauses) < 0.05, f"the loop paused for {min(pauses) * 1000:.0f} ms at best"


def test_a_link_whose_slot_was_taken_back_before_it_was_made_is_closed_unread() -> None:
    # From a review: evicted while its TLS handshake ended in the same turn of the loop, a
    # link was made, read the peer's token and said OK, and was closed by the listener's
    # cancel a moment later. Now it is closed as it is made.
    from node.admission import Admission

    async def go() -> tuple[bytes, bool]:
        admission = Admission(1, "test")
        slot = admission.admit("127.0.0.1")
        admission.admit("127.0.0.1")  # takes the first slot back
        assert not slot.held
        ours, theirs = socket.socketpair()
        theirs.sendall(frame(b"secret"))
        loop = asyncio.get_running_loop()
        _, link = await loop.connect_accepted_socket(
            lambda: DirectConnection(
                token="secret", dialer=False, max_frame_bytes=1 << 20, slot=slot
            ),
            ours,
        )
        await asyncio.wait_for(link.closed, TIMEOUT)
        theirs.settimeout(TIMEOUT)
        try:
            answer = theirs.recv(64)
        except ConnectionResetError:  # aborted with the token unread
            answer = b""
        theirs.close()
        return answer, link.opened.done() and link.opened.exception() is not None

    assert asyncio.run(go()) == (b"", True)  # no OK, and the link never opened
