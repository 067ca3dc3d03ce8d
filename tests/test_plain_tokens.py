"""The token goes over plain TCP only to an address that is local, whatever the name said.

Under `tls = "auto"` a `localhost` or `*.localhost` name picks plain TCP before it is resolved,
and a resolver may map it anywhere (glibc asks DNS for `*.localhost`). Every dialer (the node's
master link, a direct link, the client library) checks the address it reached before the token
leaves. Tests cannot reach a non-local address (loopback only), so the refusing tests take
127.0.0.0/8 out of the local ranges (`node.config._LOCAL_NETWORKS`) and dial `localhost` at a
real listener on 127.0.0.1 that records what it was sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Iterator

import pytest

import node.config
from node.client import Client, ConnectionClosed, MasterUnreachable
from node.config import Config, JoinInfo, plain_peer_refusal
from node.direct import DirectError, dial
from node.link import MasterLink
from node.protocol import messages as m
from node.protocol.framing import frame

TIMEOUT_S = 10.0


@pytest.mark.parametrize(
    ("host", "mode", "peer", "refused"),
    [
        ("localhost", "auto", ("127.0.0.1", 55000), False),
        ("node.localhost", "auto", ("::1", 55000, 0, 0), False),
        ("localhost", "auto", ("::ffff:127.0.0.1", 55000, 0, 0), False),
        ("localhost", "auto", ("10.1.2.3", 55000), False),  # private: local by upstream's rule
        ("node.localhost", "auto", ("203.0.113.9", 55000), True),
        ("localhost", "auto", ("2001:db8::1", 55000, 0, 0), True),
        ("localhost", "auto", ("::ffff:203.0.113.9", 55000, 0, 0), True),
        ("localhost", "auto", None, True),  # nothing known about the peer: no token
        ("localhost", "never", ("203.0.113.9", 55000), False),  # the operator's choice
        ("127.0.0.1", "auto", ("127.0.0.1", 55000), False),  # an IP was judged as such
    ],
)
def test_plain_peer_refusal(host: str, mode: str, peer: object, refused: bool) -> None:
    refusal = plain_peer_refusal(host, mode, peer)
    assert (refusal is not None) is refused
    if refusal is not None:
        assert refusal.startswith(f"{host} resolved to ")
        assert "not a loopback or private address" in refusal
        assert 'set tls to "always"' in refusal


class Recorder:
    """A TCP listener on 127.0.0.1 that keeps every byte each connection sent."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(TIMEOUT_S)
        self.port = self._listener.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT_S)
            data = b""
            try:  # until the peer hangs up, or one whole frame (a token) came
                while chunk := conn.recv(4096):
                    data += chunk
                    if len(data) >= 4 and len(data) >= 4 + int.from_bytes(data[:4], "big"):
                        break
            except OSError:
                pass
            self.received.append(data)

    def close(self) -> list[bytes]:
        """What the one connection sent, once it closed."""
        self._thread.join(TIMEOUT_S)
        self._listener.close()
        assert not self._thread.is_alive()
        return self.received


@pytest.fixture
def loopback_not_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.0/8 counts as a public range, so `localhost` reaching 127.0.0.1 is a name that
    resolved to a non-local address."""
    ranges = tuple(
        net for net in node.config._LOCAL_NETWORKS if net != ipaddress.ip_network("127.0.0.0/8")
    )
    assert len(ranges) == len(node.config._LOCAL_NETWORKS) - 1
    monkeypatch.setattr(node.config, "_LOCAL_NETWORKS", ranges)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    listener = Recorder()
    try:
        yield listener
    finally:
        listener._listener.close()


@pytest.mark.usefixtures("loopback_not_local")
def test_the_client_sends_no_token_to_a_localhost_name_that_is_not_local(
    recorder: Recorder,
) -> None:
    async def go() -> None:
        await Client.connect(host="localhost", port=recorder.port, token="secret", timeout=5)

    with pytest.raises(MasterUnreachable, match=r"localhost resolved to 127\.0\.0\.1, which is"):
        asyncio.run(go())
    assert recorder.close() == [b""]


@pytest.mark.usefixtures("loopback_not_local")
def test_a_direct_dial_sends_no_token_to_a_localhost_name_that_is_not_local(
    recorder: Recorder,
) -> None:
    async def go() -> None:
        await dial(
            "localhost", recorder.port, token="secret", tls_mode="auto", tls=None,
            timeout=5, max_frame_bytes=1 << 20,
        )  # fmt: skip

    with pytest.raises(DirectError, match=r"localhost resolved to 127\.0\.0\.1, which is"):
        asyncio.run(go())
    assert recorder.close() == [b""]


@pytest.mark.usefixtures("loopback_not_local")
def test_the_master_link_sends_no_token_to_a_localhost_name_that_is_not_local(
    recorder: Recorder,
) -> None:
    link = MasterLink(
        Config(),
        JoinInfo("secret", "localhost", recorder.port),
        m.Role.Worker,
        on_assign=lambda ids, payloads: None,
        has_capacity=lambda: True,
    )

    async def go() -> None:
        await link._connect("localhost", recorder.port)

    with pytest.raises(ConnectionError, match=r"localhost resolved to 127\.0\.0\.1, which is"):
        asyncio.run(go())
    assert recorder.close() == [b""]


def test_a_localhost_name_that_reaches_loopback_gets_the_token(recorder: Recorder) -> None:
    """The everyday case, with the real ranges: `localhost`, plain TCP, the token goes out (the
    recorder hangs up once it has it, which the client reports)."""

    async def go() -> None:
        await Client.connect(host="localhost", port=recorder.port, token="secret", timeout=5)

    with pytest.raises(ConnectionClosed):
        asyncio.run(go())
    assert recorder.close() == [frame(b"secret")]
