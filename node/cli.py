"""`cpnode-supervisor`: run a cpnode (the supervisor and its worker processes).

    cpnode-supervisor [CONFIG] [--workers N] [--role ROLE] [--log-level LEVEL] [--join PATH]
                      [--prefetch N] [--poll-interval-ms MS] [--start-method forkserver|spawn]
                      [--log-format text|json] [--health-port [PORT] | --health-listen HOST:PORT]
                      [--local-master] [--local-master-port PORT]
                      [--direct-port PORT] [--connect-to HOST:PORT ...] [--tls MODE]
                      [--request-connection ADDR ...]

Exit status: 0 after a clean stop, 2 for a bad config or join.json (or a `shm_dir` it cannot use,
or a `node_id` another node holds), 3 when every master refused the token, 1 for anything else (a
port that cannot be listened on, say: a later start may work).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from node.config import (
    Config,
    JoinInfo,
    check_node_paths,
    load_config,
    load_join,
    parse_role,
    port_argument,
)
from node.errors import ConfigError, ListenError
from node.health import DEFAULT_PORT as DEFAULT_HEALTH_PORT
from node.supervisor import Node
from workers.logformat import FORMATS as LOG_FORMATS
from workers.logformat import HeldRecords, configure_logging

log = logging.getLogger("cpnode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpnode-supervisor",
        description=(
            "Run a CPCluster compute node: joins the master named by join.json (and the "
            "config's master_addresses), runs tasks on a pool of worker processes."
        ),
        epilog=(
            "Files: join.json is read from --join, else $CPCLUSTER_JOIN, else ./join.json; "
            "$CPCLUSTER_TOKEN overrides its token. Stop with SIGTERM or Ctrl-C (drains: "
            "finishes running tasks, delivers their results); a second signal stops at once. "
            "Exit status: 0 clean stop, 2 bad config or join.json (or a shm_dir it cannot use, "
            "or a node_id in use), 3 token refused, 1 other (a port in use included)."
        ),
    )
    parser.add_argument(
        "config", nargs="?", help="config file (upstream format); default: built-in defaults"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes (default from config: workers, else the CPUs available)",
    )
    parser.add_argument(
        "--role",
        metavar="ROLE",
        help="Worker, Disk or Internet (any case; default from config: Worker)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="error, warn, info, debug, trace or off (default from config: info)",
    )
    parser.add_argument(
        "--join", metavar="PATH", help="join.json to use (default: $CPCLUSTER_JOIN or ./join.json)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        metavar="N",
        help="tasks in flight per worker (default from config: 1024)",
    )
    parser.add_argument(
        "--poll-interval-ms", type=int, metavar="MS",
        help="idle poll: send a Heartbeat this often while workers have free capacity "
        "(default from config: 50)",
    )  # fmt: skip
    parser.add_argument(
        "--local-master",
        action="store_true",
        help="start a cpnode-master on 127.0.0.1 for this node (writes its join.json next to it) "
        "and print how to submit work: a whole cluster on one machine",
    )
    parser.add_argument(
        "--local-master-port", type=port_argument, default=55000, metavar="PORT",
        help="port of the --local-master, 1-65535 (default 55000); it reads the node's CONFIG "
        "(or, like the node, none)",
    )  # fmt: skip
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, metavar="FORMAT",
        help="text (human-readable) or json (one object per line; default from config: text)",
    )  # fmt: skip
    health = parser.add_mutually_exclusive_group()
    health.add_argument(
        "--health-port", type=int, nargs="?", const=DEFAULT_HEALTH_PORT, metavar="PORT",
        help="serve /healthz, /readyz, /metrics and /status on 127.0.0.1:PORT "
        f"(PORT defaults to {DEFAULT_HEALTH_PORT}; the endpoint is off unless asked for)",
    )  # fmt: skip
    health.add_argument(
        "--health-listen", metavar="HOST:PORT",
        help="the same on any address, e.g. 0.0.0.0:9655 for Kubernetes probes and Prometheus "
        "(default from config: health_listen)",
    )  # fmt: skip
    parser.add_argument(
        "--start-method", choices=["forkserver", "spawn"], default="forkserver",
        help="how worker processes are started (default forkserver)",
    )  # fmt: skip
    direct = parser.add_argument_group("direct links (tasks between nodes, without the master)")
    direct.add_argument(
        "--direct-port", type=int, metavar="PORT",
        help="accept direct links on PORT (default from config: direct_port, none)",
    )  # fmt: skip
    direct.add_argument(
        "--connect-to", action="append", metavar="HOST:PORT",
        help="dial a peer's direct port and give it the Compute and ComplexMath tasks this "
        "node has no room for (repeatable; replaces the config's connect_to)",
    )  # fmt: skip
    direct.add_argument(
        "--request-connection", action="append", default=[], metavar="ADDR",
        help="ask the master for a connection to the node it lists as ADDR (upstream's "
        "RequestConnection; repeatable)",
    )  # fmt: skip
    direct.add_argument(
        "--tls", choices=["auto", "always", "never"],
        help="TLS to the master and on direct links: auto (default) when the address is not "
        "loopback or private, always, never",
    )  # fmt: skip
    return parser


class _StopBeforeStart(SystemExit):
    """SIGTERM before the node's event loop took the signal over (see `main`). A SystemExit,
    so that no `except Exception` swallows it and an event loop's callback passes it on."""


def _stop_before_start(signum: int, frame: object) -> None:
    raise _StopBeforeStart


def main(argv: list[str] | None = None) -> int:
    # Until the node's loop installs its own handler (which drains), a SIGTERM unwinds the
    # start: a `--local-master` started by then is stopped, and the exit is clean. Without
    # this, SIGTERM's default action ended the process there and left that master running.
    # (Python's start and the imports above come before even this: a few hundred ms.)
    previous = signal.signal(signal.SIGTERM, _stop_before_start)
    try:
        return _main(argv)
    except _StopBeforeStart:
        print("cpnode-supervisor: stopped (SIGTERM) before it started", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, object] = {
            "workers": args.workers,
            "log_level": args.log_level,
            "prefetch": args.prefetch,
            "poll_interval_ms": args.poll_interval_ms,
            "log_format": args.log_format,
            "health_listen": args.health_listen,
            "direct_port": args.direct_port,
            "connect_to": args.connect_to,
            "tls": args.tls,
        }
        if args.role is not None:
            overrides["role"] = parse_role(args.role)
        if args.health_port is not None:
            overrides["health_listen"] = f"127.0.0.1:{args.health_port}"
        # The config gives the log's format and level: what reading it logs waits until then.
        with HeldRecords():
            config = load_config(args.config, overrides=overrides, override_source="command line")
            check_node_paths(config, args.config)
            configure_logging(config.log_level, config.log_format)
    except ConfigError as exc:
        print(f"cpnode-supervisor: {exc}", file=sys.stderr)
        return 2
    master: subprocess.Popen[bytes] | None = None
    try:
        if args.local_master:
            join_path = Path(args.join or os.environ.get("CPCLUSTER_JOIN") or "join.json")
            master = _start_local_master(
                join_path, args.local_master_port, config.log_level, args.config
            )
            join = load_join(str(join_path))
            print(
                f"local master listening on {join.address}; submit work with:\n"
                f"  cpnode-submit --join {join_path} compute '1+2'\n"
                f"  cpnode-submit --join {join_path} batch tasks.jsonl",
                file=sys.stderr,
                flush=True,
            )
        else:
            join = load_join(args.join)
        return _run(config, join, args.start_method, args.request_connection)
    except ConfigError as exc:
        print(f"cpnode-supervisor: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"cpnode-supervisor: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if master is not None:
            # A second SIGTERM now must not leave it running: what follows is bounded.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            master.terminate()
            try:
                master.wait(10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()


def _run(config: Config, join: JoinInfo, start_method: str, requests: list[str]) -> int:
    import uvloop

    async def run() -> int:
        node = Node(config, join, start_method=start_method)
        node.direct.request_connections = requests
        node.install_signal_handlers()
        return await node.run()

    return uvloop.run(run())


def _start_local_master(
    join_path: Path, port: int, log_level: str, config_path: str | None
) -> subprocess.Popen[bytes]:
    """Start `cpnode-master` on 127.0.0.1:PORT and wait until its join.json names that port.
    It reads the node's config file, or like the node none (the same `failover_timeout_ms`,
    so the heartbeats it expects are the ones the node sends), and runs in a session of its
    own: Ctrl-C in the terminal reaches the node, which drains to it and then stops it."""
    env = dict(os.environ, CPCLUSTER_JOIN=str(join_path))
    command = [
        sys.executable,
        "-m",
        "node.master.cli",
        # Without a CONFIG the node runs on built-in defaults: so must its master, whatever
        # ./config.json (an upstream master's, say) says.
        *([os.path.abspath(config_path)] if config_path else ["--no-config"]),
        "--listen",
        f"127.0.0.1:{port}",
        "--log-level",
        log_level,
        # Loopback only, where nodes and clients talk plain TCP: no certificate pair to make
        # (and leave in the user's directory).
        "--tls",
        "never",
    ]
    # File times come from a coarse clock: allow a second (a master still running from then
    # would hold the port, and ours would exit).
    started = time.time() - 1.0
    master = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if master.poll() is not None:
                if master.returncode == 2:  # it said why, above
                    raise ConfigError("the local master refused its configuration (see above)")
                raise ListenError(
                    f"the local master exited with status {master.returncode} (see above):"
                    f" is port {port} in use? (--local-master-port chooses another)"
                )
            try:
                # The master writes join.json once it listens; an older file may name the same
                # port and token, so only a file written after the start counts.
                if join_path.stat().st_mtime >= started and load_join(str(join_path)).port == port:
                    return master
            except (ConfigError, FileNotFoundError):
                pass
            time.sleep(0.05)
        raise ConfigError(f"the local master did not start within 15 s on port {port}")
    except BaseException:
        # Ctrl-C while it starts included: in a session of its own, it would not hear it.
        master.kill()
        master.wait()
        raise


if __name__ == "__main__":
    sys.exit(main())
