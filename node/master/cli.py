"""`cpnode-master`: run the local CPCluster master.

    CONFIG + flags ─load_config(overrides)─▶ Config ─▶ listen address, token
        ─▶ start_master() ─▶ join.json (0600) ─▶ serve until SIGTERM/SIGINT ─▶ close() ─▶ exit 0

The token is kept across restarts: `--token` wins, then `--new-token` (a fresh one), then the
token of an existing join.json, and only without any of those a fresh one. Upstream makes a new
token at every start, which locks out every node that joined before.

Exit status: 0 after SIGTERM/SIGINT, 1 when the address cannot be listened on, 2 for a bad config
file, flag, join.json or state file (the message says which and why).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from node.config import (
    Config,
    default_join_path,
    host_argument,
    load_config,
    load_join,
    parse_address,
)
from node.errors import ConfigError
from node.master.journal import JournalError, check_writable
from node.master.server import new_event_loop, new_token, start_master
from node.tls import ServerTls, ensure_certificate, server_tls

_log = logging.getLogger("cpnode.master")

# Upstream reads `config.json` from the working directory when no file is named.
_DEFAULT_CONFIG = "config.json"
# Upstream's certificate files when the config names none; made self-signed when missing.
_DEFAULT_CERT = "master_cert.pem"
_DEFAULT_KEY = "master_key.pem"

_EPILOG = """\
files:
  CONFIG            the upstream config file (master_addresses, min_port, max_port,
                    failover_timeout_ms, state_file, log_level, ...) plus cpnode's window,
                    max_frame_bytes and result_ttl_s; default ./config.json when it exists,
                    else (or with --no-config) built-in defaults
  join.json         written at start (mode 0600) to $CPCLUSTER_JOIN, default ./join.json:
                    {"token", "ip", "port"}; nodes and cpnode-submit read it; "ip" is
                    the --listen host, or --advertise; its token is --token, else
                    $CPCLUSTER_TOKEN (which nodes and cpnode-submit also take), else the
                    existing file's, else a new one
  state file        pending and completed tasks, replayed at start (--state-file, config
                    `state_file`, default master_state.json); a task is acknowledged
                    (TaskAccepted) once written there, so a crash of the master loses
                    none it acknowledged (fsync'ed every second: a power cut may)
  TLS certificate   config `cert_path`/`key_path`, default ./master_cert.pem and
                    ./master_key.pem, made self-signed when both are missing (unless
                    tls is "never"); give the certificate to nodes as `ca_cert_path`

exit status: 0 stopped by SIGTERM/SIGINT, 1 cannot listen, 2 bad config, flag, join.json or
state file
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpnode-master",
        description=(
            "A CPCluster master for one machine: speaks the upstream protocol, hands tasks out "
            "in submission order to nodes of the right role, and keeps its tasks across restarts."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "config",
        nargs="?",
        metavar="CONFIG",
        help="config file (default: ./config.json when it exists, else built-in defaults)",
    )
    parser.add_argument(
        "--no-config",
        action="store_true",
        help="use the built-in defaults even when ./config.json exists (cpnode-supervisor "
        "--local-master passes this when the node itself was given no CONFIG)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="error, warn, info, debug, trace or off (overrides the config's log_level)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: the first of the config's master_addresses, "
        "127.0.0.1:55000); port 0 picks a free port",
    )
    parser.add_argument(
        "--advertise",
        metavar="HOST",
        type=host_argument,
        help="the address join.json gives nodes to connect to, and a name in a new TLS "
        "certificate (default: the --listen host; needed with 0.0.0.0 or ::, which a node on "
        "another host cannot connect to)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        metavar="TOKEN",
        help="the join token to require (e.g. the one another master of the cluster uses; "
        "other users can see it in the process list: prefer $CPCLUSTER_TOKEN); default: "
        "$CPCLUSTER_TOKEN, else keep the token of an existing join.json",
    )
    tokens.add_argument(
        "--new-token",
        action="store_true",
        help="make a new token even if join.json has one (locks out nodes holding the old one)",
    )
    parser.add_argument(
        "--scheduling",
        choices=("fifo", "upstream"),
        default="fifo",
        help="fifo (default): tasks pushed in submission order as soon as a node of the role "
        "has a free slot in its window; upstream: as the upstream master, a node gets every "
        "pending task of its role at once, and only right after it sent a frame",
    )
    parser.add_argument(
        "--window",
        type=int,
        metavar="N",
        help="fifo: tasks in flight per node (overrides the config's window, default 1024)",
    )
    parser.add_argument(
        "--state-file",
        metavar="PATH",
        help="journal of pending and completed tasks (overrides the config's state_file)",
    )
    parser.add_argument(
        "--tls",
        choices=("auto", "always", "never"),
        help="auto (default): TLS for peers that start a TLS handshake (upstream nodes do when "
        "the master's address is not local), plain TCP for the others; always: TLS only; "
        "never: plain TCP only (overrides the config's tls)",
    )
    return parser


def _server_tls(config: Config, hosts: Sequence[str]) -> ServerTls | None:
    """The master's certificate (made self-signed for `hosts` and loopback when missing),
    unless tls is "never"."""
    if config.tls == "never":
        return None
    cert_path = config.cert_path or _DEFAULT_CERT
    key_path = config.key_path or _DEFAULT_KEY
    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1", "::1"]))
    ensure_certificate(cert_path, key_path, names)
    return ServerTls(server_tls(cert_path, key_path), config.tls)


def _listen_address(text: str | None, config: Config) -> tuple[str, int]:
    if text is None:
        return config.master_endpoints[0]
    head, _, port_text = text.rpartition(":")
    try:
        if port_text == "0":  # parse_address refuses port 0; here it means "any free port"
            return parse_address(head + ":1")[0], 0
        return parse_address(text)
    except ValueError as error:
        raise ConfigError(f"--listen: {error}") from None


def _choose_token(token: str | None, rotate: bool, join_path: str, env: Mapping[str, str]) -> str:
    """--token, else $CPCLUSTER_TOKEN (as nodes and cpnode-submit take it: so a node given the
    token that way and `--local-master` agree), else join.json's, else a new one."""
    rule = (
        "must be non-empty, without leading or trailing whitespace (the master compares the "
        "token a node sends after trimming it)"
    )
    if token is not None:
        if not token or token != token.strip():
            raise ConfigError(f"--token: {rule}")
        return token
    env_token = env.get("CPCLUSTER_TOKEN")
    if env_token is not None:
        if rotate:
            raise ConfigError(
                "--new-token: CPCLUSTER_TOKEN is set, and nodes that read it would be refused;"
                " unset it to make a new token"
            )
        if not env_token or env_token != env_token.strip():
            raise ConfigError(f"CPCLUSTER_TOKEN: the token {rule}")
        return env_token
    if rotate or not os.path.lexists(join_path):
        return new_token()
    hint = "(use --new-token to replace it with a new token)"
    try:
        kept = load_join(join_path, env={}).token
    except ConfigError as error:
        raise ConfigError(f"{error}\n{hint}") from None
    if kept != kept.strip():  # every node would be refused
        raise ConfigError(f"{join_path}: the token {rule}\n{hint}")
    return kept


async def _serve(
    config: Config,
    host: str,
    port: int,
    advertise: str | None,
    token: str,
    scheduling: str,
    join_path: str,
    state_file: str,
    tls: ServerTls | None,
) -> int:
    # Handlers first: join.json appears during start-up, and whoever reads it may send SIGTERM
    # at once; the default action would kill the master before it could close cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            master = await start_master(
                config,
                host=host,
                port=port,
                token=token,
                scheduling=scheduling,
                join_path=join_path,
                advertise=advertise,
                state_file=state_file,
                tls=tls,
            )
        except (ConfigError, JournalError) as error:
            print(f"cpnode-master: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(
                f"cpnode-master: cannot listen on {host}:{port}: {error.strerror or error}",
                file=sys.stderr,
            )
            return 1
        _log.info("join information written to %s", join_path)
        try:
            await stop.wait()
            _log.info("stopping: closing connections and writing the state file")
        finally:
            await master.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Run the master; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_config and args.config is not None:
        parser.error("--no-config: not allowed with a CONFIG file")
    config_path = args.config
    if config_path is None and not args.no_config and os.path.exists(_DEFAULT_CONFIG):
        config_path = _DEFAULT_CONFIG
    join_path = default_join_path()
    try:
        config = load_config(
            config_path,
            overrides={
                "log_level": args.log_level,
                "window": args.window,
                "state_file": args.state_file,
                "tls": args.tls,
            },
            override_source="command line",
        )
        host, port = _listen_address(args.listen, config)
        token = _choose_token(args.token, args.new_token, join_path, os.environ)
    except ConfigError as error:
        print(f"cpnode-master: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.logging_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # Before the certificate: a bad state_file must leave no new files behind.
        check_writable(config.state_file)
        tls = _server_tls(config, [host] if args.advertise is None else [host, args.advertise])
    except (ConfigError, JournalError) as error:
        print(f"cpnode-master: {error}", file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(
            _serve(
                config,
                host,
                port,
                args.advertise,
                token,
                args.scheduling,
                join_path,
                config.state_file,
                tls,
            )
        )


def main() -> None:
    """Console-script entry point (`cpnode-master = "node.master.cli:main"`)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
