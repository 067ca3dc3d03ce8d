"""TLS between node, client and master, on loopback with a test CA: a good certificate, a wrong
CA, a wrong host name, an expired one; plain and TLS peers on one port; the self-signed pair."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from node.client import Client, MasterCertificateError, MasterUnreachable
from node.config import Config
from node.errors import ConfigError
from node.master import MasterThread
from node.master import server as master_server
from node.pacing import SLICE_BYTES, PacedWriter
from node.protocol import messages as m
from node.protocol.framing import frame
from node.tls import ServerTls, describe_certificate, ensure_certificate, server_tls
from tests.idle import IdleConnections
from tests.netservers import free_port
from tests.nodeproc import NodeProcess

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def context_for(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def master_with(
    tmp_path: Path, cert: trustme.LeafCert | None, mode: str = "always", **config: object
) -> MasterThread:
    tls = ServerTls(context_for(cert) if cert is not None else None, mode)
    return MasterThread(
        Config(**config),  # type: ignore[arg-type]
        join_path=str(tmp_path / "join.json"),
        tls=tls,
    )


def compute(master: MasterThread, **connect: object) -> m.Result:
    async def go() -> m.Result:
        async with Client.connect(
            host="127.0.0.1", port=master.port, token=master.token, timeout=TIMEOUT, **connect
        ) as client:
            return await client.run(m.Compute("1+2"), timeout=0.5)

    return asyncio.run(go())


def connect_error(master: MasterThread, **connect: object) -> str:
    async def go() -> None:
        await Client.connect(
            host="127.0.0.1", port=master.port, token=master.token, timeout=TIMEOUT, **connect
        )

    with pytest.raises(MasterCertificateError) as caught:
        asyncio.run(go())
    return str(caught.value)


def authenticates(master: MasterThread, **connect: object) -> bool:
    async def go() -> bool:
        async with Client.connect(
            host="127.0.0.1", port=master.port, token=master.token, timeout=TIMEOUT, **connect
        ) as client:
            return not client.closed

    return asyncio.run(go())


# --- the client against a TLS master -------------------------------------------------------------


def test_good_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    with master_with(tmp_path, ca.issue_cert("127.0.0.1", "localhost")) as master:
        assert authenticates(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        assert authenticates(master, tls="always", ca_cert_path=str(ca_file))


def test_wrong_ca_names_the_certificate_and_the_reason(tmp_path: Path, ca: trustme.CA) -> None:
    other = trustme.CA()
    with master_with(tmp_path, ca.issue_cert("127.0.0.1", common_name="master.test")) as master:
        text = connect_error(master, tls="always", ca_cert=other.cert_pem.bytes().decode())
    assert text.startswith(f"TLS to master 127.0.0.1:{master.port}: its certificate (subject ")
    assert "CN=master.test" in text
    assert "failed verification against ca_cert: unable to get local issuer certificate" in text


def test_wrong_host_name(tmp_path: Path, ca: trustme.CA) -> None:
    with master_with(tmp_path, ca.issue_cert("elsewhere.test")) as master:
        text = connect_error(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
    assert "for DNS:elsewhere.test" in text
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in text


def test_expired_certificate(tmp_path: Path, ca: trustme.CA) -> None:
    now = datetime.datetime.now(datetime.UTC)
    expired = ca.issue_cert(
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    with master_with(tmp_path, expired) as master:
        text = connect_error(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
    assert "certificate has expired" in text
    assert f"to {(now - datetime.timedelta(days=1)):%Y-%m-%d}" in text


def test_system_roots_do_not_trust_a_private_ca(tmp_path: Path, ca: trustme.CA) -> None:
    with master_with(tmp_path, ca.issue_cert("127.0.0.1")) as master:
        text = connect_error(master, tls="always")
    assert "against the system's trusted roots" in text


# --- what a listener accepts ---------------------------------------------------------------------


def test_auto_serves_plain_and_tls_peers_on_one_port(tmp_path: Path, ca: trustme.CA) -> None:
    with master_with(tmp_path, ca.issue_cert("127.0.0.1"), mode="auto") as master:
        assert authenticates(master, tls="never")
        assert authenticates(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())


@pytest.mark.parametrize(
    ("mode", "client_tls", "refusal"),
    [
        ("always", "never", 'it speaks plain TCP, but tls is "always"'),
        ("never", "always", 'it started a TLS handshake, but tls is "never"'),
        ("auto-without-certificate", "always", "no certificate is configured here"),
    ],
)
def test_listener_refusals_are_logged(
    tmp_path: Path,
    ca: trustme.CA,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    client_tls: str,
    refusal: str,
) -> None:
    cert = None if mode.endswith("without-certificate") else ca.issue_cert("127.0.0.1")
    with master_with(tmp_path, cert, mode=mode.split("-")[0]) as master:
        with pytest.raises((ConnectionError, OSError)):
            authenticates(master, tls=client_tls, ca_cert=ca.cert_pem.bytes().decode())
        deadline = time.monotonic() + TIMEOUT
        while refusal not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "master: connection from 127.0.0.1:" in caplog.text
    assert refusal in caplog.text


def test_a_client_that_wants_tls_from_a_plain_master_is_told_so(
    tmp_path: Path, ca: trustme.CA
) -> None:
    with (
        master_with(tmp_path, None, mode="never") as master,
        pytest.raises(MasterUnreachable) as caught,
    ):
        authenticates(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
    text = str(caught.value)
    assert text.startswith(f"cannot connect to the master at 127.0.0.1:{master.port}: ")
    assert "the TLS handshake failed: does the master serve TLS on this port?" in text
    assert ":  (" not in text  # a reason is given, even when the error has no text


def test_plain_peer_is_served_after_the_peek(tmp_path: Path, ca: trustme.CA) -> None:
    with (
        master_with(tmp_path, ca.issue_cert("127.0.0.1"), mode="auto") as master,
        socket.create_connection(("127.0.0.1", master.port), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(frame(master.token.encode()))
        assert sock.recv(64) == frame(b"OK")  # plain TCP after the peek


def test_a_tls_handshake_that_stalls_gives_way_when_the_port_is_full(
    tmp_path: Path, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small bound for the test (not `raising`, as in test_master). A handshake begun and
    # never finished is the listener's until its timeout: once every slot is held, the oldest
    # of the address holding the most is closed at once, and a real client behind that
    # address still gets in.
    monkeypatch.setattr(master_server, "_MAX_UNAUTHENTICATED", 2, raising=False)
    with (
        master_with(tmp_path, ca.issue_cert("127.0.0.1"), mode="always") as master,
        IdleConnections(master.port, 3, first=b"\x16\x03\x01") as stalled,
    ):
        assert stalled.wait_closed(1, timeout=TIMEOUT) == {0}
        assert authenticates(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
        assert stalled.wait_closed(2, timeout=TIMEOUT) == {0, 1}  # the client's turn took #1
        time.sleep(0.2)
        assert stalled.closed() == {0, 1}


# --- the self-signed pair ------------------------------------------------------------------------


def test_self_signed_pair_is_made_once_and_verifies(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert ensure_certificate(str(cert), str(key), ["127.0.0.1", "localhost"])
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    first = cert.read_bytes()
    assert not ensure_certificate(str(cert), str(key), ["127.0.0.1"])
    assert cert.read_bytes() == first
    server_tls(str(cert), str(key))  # loads
    der = ssl.PEM_cert_to_DER_cert(first.decode())
    assert "self-signed" in describe_certificate(der)
    assert "IP:127.0.0.1" in describe_certificate(der)
    key.unlink()
    with pytest.raises(ConfigError, match="exists but"):
        ensure_certificate(str(cert), str(key), ["127.0.0.1"])


def test_cpnode_master_makes_a_self_signed_pair_and_serves_tls(tmp_path: Path) -> None:
    join = tmp_path / "join.json"
    env = dict(os.environ, CPCLUSTER_JOIN=str(join))
    process = subprocess.Popen(
        [sys.executable, "-m", "node.master.cli", "--listen", "127.0.0.1:0", "--tls", "always",
         "--state-file", str(tmp_path / "state.jsonl")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not join.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(join.read_text())
        cert = tmp_path / "master_cert.pem"
        assert cert.exists() and (tmp_path / "master_key.pem").exists()

        async def go() -> bool:
            async with Client.connect(
                join, tls="always", ca_cert_path=str(cert), timeout=TIMEOUT
            ) as client:
                return not client.closed

        assert asyncio.run(go())
        assert info["ip"] == "127.0.0.1"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, err = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate(timeout=TIMEOUT)
            raise
    assert process.returncode == 0, err
    assert "made a self-signed TLS certificate" in err


# --- the node's master link ----------------------------------------------------------------------


FAILOVER_MS = 1000


@pytest.fixture
def tls_master(tmp_path: Path, ca: trustme.CA) -> Iterator[MasterThread]:
    with master_with(
        tmp_path, ca.issue_cert("127.0.0.1"), failover_timeout_ms=FAILOVER_MS
    ) as master:
        yield master


def test_node_joins_a_tls_master_and_runs_tasks(
    tmp_path: Path, ca: trustme.CA, tls_master: MasterThread
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = {
        "failover_timeout_ms": FAILOVER_MS,
        "master_addresses": [tls_master.address],
        "tls": "always",
        "ca_cert_path": str(ca_file),
    }
    process = NodeProcess(tmp_path, tmp_path / "join.json", config, "--workers", "1")
    try:
        process.wait_for_log("node ready")
        assert "(TLS)" in process.log
        ca_pem = ca.cert_pem.bytes().decode()
        assert compute(tls_master, tls="always", ca_cert=ca_pem) == m.Number(3.0)
        assert process.stop() == 0
    finally:
        process.close()


def test_node_with_the_wrong_ca_logs_which_certificate_failed(
    tmp_path: Path, tls_master: MasterThread
) -> None:
    wrong = tmp_path / "wrong-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(wrong))
    config = {
        "failover_timeout_ms": FAILOVER_MS,
        "master_addresses": [tls_master.address],
        "tls": "always",
        "ca_cert_path": str(wrong),
    }
    process = NodeProcess(tmp_path, tmp_path / "join.json", config, "--workers", "1")
    try:
        process.wait_for_log(f"failed verification against ca_cert_path {wrong}")
        assert "its certificate (subject " in process.log
        assert "node ready" not in process.log
    finally:
        process.close()


def test_node_with_an_unusable_ca_exits_2(tmp_path: Path) -> None:
    (tmp_path / "join.json").write_text('{"token":"t","ip":"127.0.0.1","port":1}')
    config = {"tls": "always", "ca_cert": "not a certificate"}
    process = NodeProcess(tmp_path, tmp_path / "join.json", config, "--workers", "1")
    try:
        assert process.proc.wait(30) == 2
        assert "`ca_cert` is not a usable PEM certificate" in process.log
    finally:
        process.close()


def test_one_trust_file_tells_the_self_signed_master_and_direct_peer_apart(
    tmp_path: Path,
) -> None:
    # The self-signed pairs cpnode makes (cpnode-master's, a direct_port's) both name their
    # host, CN=127.0.0.1 here. A node that checks its master and its direct peer against one
    # file holding both must find each certificate's own key, not the first by that name.
    master_cert, master_key = tmp_path / "master_cert.pem", tmp_path / "master_key.pem"
    ensure_certificate(str(master_cert), str(master_key), ["127.0.0.1"])
    join = tmp_path / "join.json"
    port = free_port()
    tls = ServerTls(server_tls(str(master_cert), str(master_key)), "always")
    config = Config(failover_timeout_ms=FAILOVER_MS)
    with MasterThread(config, join_path=str(join), tls=tls) as master:
        settings = {
            "failover_timeout_ms": FAILOVER_MS,
            "master_addresses": [master.address],
            "tls": "always",
        }
        (tmp_path / "peer").mkdir()
        peer = NodeProcess(
            tmp_path / "peer", join, settings | {
                "ca_cert_path": str(master_cert), "direct_port": port,
                "direct_host": "127.0.0.1", "cert_path": "node_cert.pem",
                "key_path": "node_key.pem",
            }, "--workers", "1",
        )  # fmt: skip
        node: NodeProcess | None = None
        try:
            peer.wait_for_log(f"accepting direct links on 127.0.0.1:{port} (TLS only)")
            trust = tmp_path / "trust.pem"
            trust.write_bytes(
                master_cert.read_bytes() + (tmp_path / "peer/node_cert.pem").read_bytes()
            )
            (tmp_path / "node").mkdir()
            node = NodeProcess(
                tmp_path / "node", join, settings | {
                    "ca_cert_path": str(trust), "connect_to": [f"127.0.0.1:{port}"],
                },  "--workers", "1",
            )  # fmt: skip
            node.wait_for_log("node ready")
            node.wait_for_log(f"direct link to 127.0.0.1:{port} open", timeout=15)
            assert "failed verification" not in node.log
            assert node.stop() == 0
        finally:
            if node is not None:
                node.close()
            peer.close()


@contextlib.asynccontextmanager
async def tls_loopback(
    ca: trustme.CA,
) -> AsyncIterator[tuple[asyncio.Transport, bytearray, asyncio.Future[None]]]:
    """A TLS connection on loopback: the client's transport, what the server has received so
    far, and a future done when the server sees the connection end."""
    loop = asyncio.get_running_loop()
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    received = bytearray()
    ended: asyncio.Future[None] = loop.create_future()

    class Receiver(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            received.extend(data)

        def eof_received(self) -> None:
            if not ended.done():
                ended.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            if not ended.done():
                ended.set_result(None)

    server = await loop.create_server(
        Receiver, "127.0.0.1", 0, ssl=context_for(ca.issue_cert("127.0.0.1"))
    )
    port = server.sockets[0].getsockname()[1]
    transport, _ = await loop.create_connection(
        asyncio.Protocol, "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1"
    )
    try:
        yield transport, received, ended
    finally:
        transport.abort()
        server.close()
        await server.wait_closed()


def test_a_large_write_over_tls_leaves_the_loop_between_slices(ca: trustme.CA) -> None:
    # A TLS transport encrypts all of a write inside write(): the link's writer hands it a
    # slice per turn of the loop, so a heartbeat scheduled meanwhile runs before the blob is
    # through, and frames written later arrive after it, whole and in order.
    blob = os.urandom(5 * SLICE_BYTES + 12345)

    async def scenario() -> None:
        async with tls_loopback(ca) as (transport, received, _):
            writer = PacedWriter(transport)
            writer.write(blob)
            assert writer.backlog_bytes == len(blob)  # nothing encrypted inside this call
            seen: list[int] = []
            asyncio.get_running_loop().call_soon(lambda: seen.append(writer.backlog_bytes))
            writer.write(b"hb")  # small, yet behind the blob
            async with asyncio.timeout(30):
                while len(received) < len(blob) + 2:
                    await asyncio.sleep(0.005)
            assert seen == [len(blob) + 2 - SLICE_BYTES]  # ran after the first slice only
            assert writer.backlog_bytes == 0
            assert bytes(received) == blob + b"hb"

    asyncio.run(scenario())


def test_a_closed_paced_writer_delivers_what_was_written_first(ca: trustme.CA) -> None:
    # A direct link closed right after a big result: the transport's own close() would have
    # sent its buffer; the slices still waiting in the writer must go out too.
    blob = os.urandom(3 * SLICE_BYTES + 77)

    async def scenario() -> None:
        async with tls_loopback(ca) as (transport, received, ended):
            writer = PacedWriter(transport)
            writer.write(blob)
            writer.close()
            assert not transport.is_closing()  # not before the backlog is handed over
            await asyncio.wait_for(ended, 30)
            assert bytes(received) == blob
            assert transport.is_closing()

    asyncio.run(scenario())


# --- a certificate made to trip up its description -----------------------------------------------


def forged_certificate_context(tmp_path: Path) -> ssl.SSLContext:
    """A server context presenting a self-signed certificate whose Certificate Policies
    extension is malformed DER (OpenSSL serves it and never reads it; cryptography refuses
    it) and whose subject holds a newline, to start a log line of its own."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged\nERROR cpnode: injected")])
    now = datetime.datetime.now(datetime.UTC)
    policies = x509.UnrecognizedExtension(
        ExtensionOID.CERTIFICATE_POLICIES, b"\x30\x03\x02\x01\x00"
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(policies, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged_cert.pem", tmp_path / "forged_key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def test_a_certificate_that_cannot_be_described_is_still_refused(
    tmp_path: Path, ca: trustme.CA
) -> None:
    forged = forged_certificate_context(tmp_path)
    with MasterThread(Config(), tls=ServerTls(forged, "always")) as master:
        text = connect_error(master, tls="always", ca_cert=ca.cert_pem.bytes().decode())
    assert "failed verification against ca_cert" in text
    assert "subject CN=forged\\nERROR cpnode: injected" in text
    assert "with extensions that cannot be read" in text
    assert "\n" not in text


def test_a_node_fails_over_from_a_master_whose_certificate_cannot_be_described(
    tmp_path: Path, ca: trustme.CA, tls_master: MasterThread
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    forged = forged_certificate_context(tmp_path)
    with MasterThread(Config(), tls=ServerTls(forged, "always")) as impostor:
        # join.json's address is tried first: the impostor's, then the real master's.
        join = tmp_path / "impostor-join.json"
        join.write_text(
            json.dumps({"token": tls_master.token, "ip": "127.0.0.1", "port": impostor.port})
        )
        config = {
            "failover_timeout_ms": FAILOVER_MS,
            "master_addresses": [tls_master.address],
            "tls": "always",
            "ca_cert_path": str(ca_file),
        }
        process = NodeProcess(tmp_path, join, config, "--workers", "1")
        try:
            process.wait_for_log("node ready")
            assert "with extensions that cannot be read" in process.log
            assert "\nERROR cpnode: injected" not in process.log
            assert process.stop() == 0
        finally:
            process.close()


def test_connections_evicted_before_their_handshake_started_are_closed() -> None:
    # Connections waiting in the backlog are accepted in one go, before any of their tasks
    # starts; an eviction then cancelled a task that never ran, whose clean-up never closed
    # the socket: the evicted peer saw its connection stay open (until garbage collection).
    from node.admission import Admission
    from node.tls import TlsListener

    port = free_port()

    def factory(slot: object) -> asyncio.Protocol:
        return asyncio.Protocol()  # never made: none of them sends a byte

    async def go() -> set[int]:
        listener = await TlsListener.start(
            factory, "127.0.0.1", port, context=None, mode="auto", what="test",
            admission=Admission(2, "test"),
        )  # fmt: skip
        try:
            # All six are queued in the listen backlog while this loop is held on purpose.
            idle = IdleConnections(port, 6)
            try:
                await asyncio.sleep(0)
                return await asyncio.to_thread(idle.wait_closed, 4, 5.0)
            finally:
                idle.close()
        finally:
            listener.close()
            await listener.wait_closed()

    assert asyncio.run(go()) == {0, 1, 2, 3}  # two slots: the newest two keep them
