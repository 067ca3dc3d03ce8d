"""TLS for the master link, the client, the local master and direct links.

    dialing:   wants_tls(host, mode) ──▶ client_tls(config) ──▶ ssl=context, server_hostname=host
               handshake refused ──▶ verify_failure(): which certificate, checked against what, why
    listening: server_tls(cert_path, key_path) (a self-signed pair made when both are missing)
               TlsListener: accept ──peek the first byte──▶ 0x16: TLS handshake, else plain TCP
                            (with an Admission: a Slot first, see node/admission.py)

The rule is upstream's (`config.is_local_ip`): a peer on a loopback or private address is spoken
to in plain TCP, any other over TLS; `tls = "always"` or `"never"` overrides it (so TLS can be
tested on loopback). A client checks the server's certificate against `ca_cert` (PEM text), else
`ca_cert_path`, else the system roots, and its host name or IP address.

A listener does not guess what the peer will speak: it looks at the first byte. A TLS handshake
starts with 0x16, a token frame with its length's first byte (0x16 would announce a token of
at least 352 MiB, which no master accepts). So one port serves upstream nodes, which choose TLS
by the master's address, and ours alike; `tls = "always"` refuses plain TCP, `"never"` refuses
TLS, and a listener without a certificate refuses TLS with a message saying so.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from node.admission import Admission, Slot
from node.config import Config, format_address, is_local_ip
from node.errors import ConfigError, CpnodeError
from node.throttle import Throttle, more_since

__all__ = [
    "ClientTls",
    "ServerTls",
    "TlsListener",
    "TlsVerifyError",
    "client_tls",
    "ensure_certificate",
    "server_tls",
    "verify_failure",
    "wants_tls",
]

log = logging.getLogger("cpnode.tls")

_TLS_RECORD_HANDSHAKE: Final = 0x16
# What a peer may take to send its first byte, and to finish a TLS handshake: as long as its
# token may take after that. A peer speaks as soon as it is connected (a TLS ClientHello, or
# its token), so 10 s is generous over any network, and an idle connection holds one of the
# listener's `Admission` slots (and a descriptor) for that long: at 30 s, 64 connections
# opened again every 30 s held every slot of a direct port.
_FIRST_BYTE_TIMEOUT_S: Final = 10.0
_HANDSHAKE_TIMEOUT_S: Final = 10.0
# Connections refused or failed before their token are logged at most this often.
_TROUBLES_LOG_S: Final = 10.0
# Fetching the certificate that failed, only to describe it.
_DESCRIBE_TIMEOUT_S: Final = 3.0


class TlsVerifyError(CpnodeError, ConnectionError):
    """The peer's certificate failed verification; the message says which and why."""


def wants_tls(host: str, mode: str) -> bool:
    """Whether a connection to `host` uses TLS under `tls = mode`."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return not is_local_ip(host)


# --- dialing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientTls:
    """A client context and what it trusts, for messages ("ca_cert_path /etc/ca.pem")."""

    context: ssl.SSLContext
    trust: str


def client_tls(
    ca_cert: str | None = None, ca_cert_path: str | None = None, *, source: str = "config"
) -> ClientTls:
    """A context that checks certificates against `ca_cert` (PEM text), else `ca_cert_path`,
    else the system roots. ConfigError names the setting that cannot be used and why."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_cert is not None:
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_cert)
        except (ssl.SSLError, ValueError) as error:
            raise ConfigError(
                f"{source}: `ca_cert` is not a usable PEM certificate: {_ssl_reason(error)}"
            ) from None
        return ClientTls(context, "ca_cert")
    if ca_cert_path is not None:
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert_path)
        except FileNotFoundError:
            raise ConfigError(f"{source}: `ca_cert_path` {ca_cert_path}: no such file") from None
        except OSError as error:  # ssl.SSLError is an OSError too
            raise ConfigError(
                f"{source}: `ca_cert_path` {ca_cert_path} is not a usable PEM certificate: "
                f"{_ssl_reason(error)}"
            ) from None
        return ClientTls(context, f"ca_cert_path {ca_cert_path}")
    return ClientTls(context, "the system's trusted roots")


def client_tls_for(config: Config) -> ClientTls:
    """`client_tls` with the config's `ca_cert` and `ca_cert_path`."""
    return client_tls(config.ca_cert, config.ca_cert_path)


async def verify_failure(
    error: ssl.SSLCertVerificationError, what: str, host: str, port: int, trust: str
) -> TlsVerifyError:
    """Describe a refused certificate: fetch it again without checking, name it and the reason.

    `what` names the peer ("master", "direct peer").
    """
    reason = error.verify_message or _ssl_reason(error)
    shown = await _describe_peer_certificate(host, port)
    where = format_address(host, port)
    return TlsVerifyError(
        f"TLS to {what} {where}: its certificate{shown} failed verification against {trust}: "
        f"{reason}"
    )


async def _describe_peer_certificate(host: str, port: int) -> str:
    loop = asyncio.get_running_loop()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(_DESCRIBE_TIMEOUT_S):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, host, port, ssl=context, server_hostname=host
            )
    except (OSError, TimeoutError):
        return ""
    try:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        transport.abort()
    if not der:
        return ""
    try:
        return f" ({describe_certificate(der)})"
    except Exception as error:  # the peer chose these bytes; the refusal stands
        # OpenSSL serves and refuses certificates that cryptography cannot read (a malformed
        # extension it never looks at): describing one must not turn the refusal into a crash.
        return f" (unreadable: {_printable(str(error))})"


def describe_certificate(der: bytes) -> str:
    """`subject CN=x, issued by CN=y, valid 2024-01-01 to 2025-01-01, for DNS:x, IP:1.2.3.4`."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    parts = [f"subject {_printable(cert.subject.rfc4514_string()) or '(empty)'}"]
    if cert.issuer == cert.subject:
        parts.append("self-signed")
    else:
        parts.append(f"issued by {_printable(cert.issuer.rfc4514_string())}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    parts.append(f"valid {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        # A malformed extension, any of them: they are parsed together.
        parts.append("with extensions that cannot be read")
        names = None
    if names is not None:
        shown = [f"DNS:{_printable(n)}" for n in names.get_values_for_type(x509.DNSName)]
        shown += [f"IP:{n}" for n in names.get_values_for_type(x509.IPAddress)]
        parts.append("for " + (", ".join(shown) or "no names"))
    return ", ".join(parts)


def _printable(text: str) -> str:
    """`text` with its control characters escaped: a peer's certificate names go into log
    lines, and a newline in one would start a line of the peer's choosing."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _ssl_reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason).replace("_", " ").lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


# --- listening -----------------------------------------------------------------------------------


def ensure_certificate(cert_path: str, key_path: str, hosts: Iterable[str]) -> bool:
    """Write a self-signed certificate for `hosts` and its key when both files are missing, as
    upstream's master does; True when it wrote them. One without the other is a ConfigError
    (a lone key is never overwritten)."""
    have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise ConfigError(
            f"{present} exists but {missing} does not: give both `cert_path` and `key_path`, "
            "or remove the one left to have a new self-signed pair made"
        )
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    names = list(dict.fromkeys(h for h in hosts if h and h not in ("0.0.0.0", "::")))
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "cpnode")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        # An end-entity certificate, as rcgen makes upstream's: rustls refuses a CA as one.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Key identifiers (RFC 5280 4.2.1.1-2): self-signed certificates share a subject name
        # (the host's), and OpenSSL looks an issuer up by name; one trust file holding two of
        # them (a master's and a direct peer's) then checks a certificate against the other's
        # key and refuses it as "self-signed certificate". The identifiers tell them apart.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
    )
    if alternatives:
        builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key_pem)
        with open(cert_path, "wb") as file:
            file.write(cert.public_bytes(serialization.Encoding.PEM))
    except OSError as error:
        raise ConfigError(
            f"cannot write a self-signed certificate to {cert_path} and {key_path}: "
            f"{error.strerror or error}"
        ) from None
    log.warning(
        "made a self-signed TLS certificate for %s: %s (key %s); give it to peers as "
        "`ca_cert_path` to let them check it",
        ", ".join(names) or "cpnode",
        cert_path,
        key_path,
    )
    return True


def server_tls(cert_path: str, key_path: str) -> ssl.SSLContext:
    """A server context presenting `cert_path`; ConfigError names the file that is wrong."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_path, key_path)
    except FileNotFoundError as error:
        raise ConfigError(f"TLS certificate or key: {error.filename}: no such file") from None
    except ssl.SSLError as error:
        raise ConfigError(
            f"`cert_path` {cert_path} with `key_path` {key_path}: not a usable certificate and "
            f"key: {_ssl_reason(error)}"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"cannot read `cert_path` {cert_path} or `key_path` {key_path}: "
            f"{error.strerror or error}"
        ) from None
    return context


ProtocolFactory = Callable[[Slot | None], asyncio.BaseProtocol]
"""Makes the protocol of an accepted connection, handing it the connection's `Admission` slot
(None without one), which it sets `evict` on and releases once authenticated or closed."""


@dataclass(frozen=True, slots=True)
class ServerTls:
    """How a listener treats TLS: its certificate (None: refuses TLS) and the `tls` mode."""

    context: ssl.SSLContext | None
    mode: str


class TlsListener:
    """A listening socket that serves TLS or plain TCP, whichever each peer starts with.

    Quacks like the `asyncio.Server` its users need: `sockets`, `close()`, `wait_closed()`.
    `what` names the service in log lines ("master", "direct links").

    With an `admission`, each accepted connection takes a slot there first (which may close
    an older connection, see node/admission.py): idle connections from anyone who can reach
    the port would otherwise hold a file descriptor each, up to the process's limit, which the
    whole node shares. The slot is the listener's while it peeks and handshakes (given back when the
    connection fails there), then the protocol's: the factory gets it.
    """

    def __init__(
        self,
        factory: ProtocolFactory,
        sock: socket.socket,
        *,
        context: ssl.SSLContext | None,
        mode: str,
        what: str,
        admission: Admission | None = None,
    ) -> None:
        self._factory = factory
        self._socket = sock
        self._context = context
        self._mode = mode
        self._what = what
        self._admission = admission
        # Refused or failed before anything else: anyone who reaches the port can repeat those.
        self._troubles = Throttle(_TROUBLES_LOG_S)
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.ensure_future(self._accept())
        self.sockets = [sock]

    @classmethod
    async def start(
        cls,
        factory: ProtocolFactory,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext | None,
        mode: str,
        what: str,
        admission: Admission | None = None,
    ) -> TlsListener:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(factory, sock, context=context, mode=mode, what=what, admission=admission)

    def close(self) -> None:
        self._accepting.cancel()
        for task in self._handshakes:
            task.cancel()
        self._socket.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._handshakes, return_exceptions=True)

    async def _accept(self) -> None:
        while True:
            try:
                conn, peer = await self._loop.sock_accept(self._socket)
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("%s: cannot accept a connection: %s", self._what, error)
                    await asyncio.sleep(0.1)
                    continue
                raise
            slot = None
            if self._admission is not None:
                slot = self._admission.admit(str(peer[0]))  # may close another connection
            task = asyncio.ensure_future(self._start_connection(conn, peer, slot))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._started, conn, slot))
            if slot is not None:
                slot.evict = task.cancel  # until the protocol has the connection

    def _started(self, conn: socket.socket, slot: Slot | None, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        if task.cancelled():
            # Evicted or closed, perhaps before it ran at all (connections waiting in the
            # backlog are accepted in one go, before any of their tasks starts): then its own
            # clean-up never ran, and the socket would stay open until collected.
            self._release(slot)
            conn.close()

    async def _start_connection(self, conn: socket.socket, peer: Any, slot: Slot | None) -> None:
        where = format_address(str(peer[0]), int(peer[1]))
        try:
            first = await self._first_byte(conn)
            refusal = self._refusal(first, str(peer[0]))
            if refusal is not None:
                self._give_up(conn, slot, where, f"refused: {refusal}")
                return
            tls = first[0] == _TLS_RECORD_HANDSHAKE
            await self._loop.connect_accepted_socket(
                lambda: self._factory(slot),
                conn,
                ssl=self._context if tls else None,
                ssl_handshake_timeout=_HANDSHAKE_TIMEOUT_S if tls else None,
            )
        except (OSError, TimeoutError) as error:
            reason = "no data in time" if isinstance(error, TimeoutError) else _ssl_reason(error)
            self._give_up(conn, slot, where, f"failed: {reason}")
        except BaseException:
            self._release(slot)
            conn.close()
            raise

    def _give_up(self, conn: socket.socket, slot: Slot | None, where: str, why: str) -> None:
        """Close a connection refused or failed before its protocol took it; say so, throttled
        (whoever reaches the port can repeat either at will)."""
        if count := self._troubles.hit():
            log.warning("%s: connection from %s %s%s", self._what, where, why, more_since(count))
        self._release(slot)
        conn.close()

    @staticmethod
    def _release(slot: Slot | None) -> None:
        """Give back the slot of a connection that failed here: a TLS handshake that failed
        was never made, nor lost, so no protocol will (one that was made released it then)."""
        if slot is not None:
            slot.release()

    async def _first_byte(self, conn: socket.socket) -> bytes:
        """The peer's first byte, left in the socket for whoever reads next."""
        readable: asyncio.Future[None] = self._loop.create_future()
        fd = conn.fileno()
        self._loop.add_reader(fd, _resolve_once, readable)
        try:
            async with asyncio.timeout(_FIRST_BYTE_TIMEOUT_S):
                await readable
        finally:
            self._loop.remove_reader(fd)
        return conn.recv(1, socket.MSG_PEEK)

    def _refusal(self, first: bytes, peer_host: str) -> str | None:
        if not first:
            return "closed before sending anything"
        if first[0] == _TLS_RECORD_HANDSHAKE:
            if self._mode == "never":
                return 'it started a TLS handshake, but tls is "never"'
            if self._context is None:
                return "it started a TLS handshake, but no certificate is configured here"
            return None
        if self._mode == "always":
            return 'it speaks plain TCP, but tls is "always"'
        if not is_local_ip(peer_host):
            log.debug("%s: plain TCP from %s, which is not local", self._what, peer_host)
        return None


def _resolve_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
