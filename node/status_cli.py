"""`cpnode-status`: a one-screen summary of a running node, read from its health endpoint.

    cpnode-status [HOST:PORT] [--interval S] [--timeout S] [--json]

    GET /healthz, /readyz ─▶ healthy? ready?
    GET /status ─ wait S ─ GET /status ─▶ role, master, uptime, workers, queue, tasks/s
                                          (answered-counter delta), recent warnings and errors

The node serves the endpoint only when started with `--health-port` or `--health-listen`.
Exit status: 0 ready, 1 reachable but not ready (or unhealthy), 2 unreachable or bad arguments.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from typing import Any

from node.config import format_address, parse_address, seconds_argument
from node.health import DEFAULT_PORT

MAX_WORKER_ROWS = 16
MAX_PROBLEMS = 5


class Unreachable(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpnode-status",
        description="Print a summary of a running cpnode read from its health endpoint "
        "(start the node with --health-port or --health-listen).",
        epilog="Exit status: 0 ready, 1 reachable but not ready or unhealthy, 2 unreachable.",
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"the node's health endpoint (default 127.0.0.1:{DEFAULT_PORT}; a bare PORT means "
        "127.0.0.1:PORT)",
    )
    parser.add_argument(
        "--interval",
        type=seconds_argument(allow_zero=True),
        default=1.0,
        metavar="S",
        help="seconds between the two reads that give tasks/s (default 1; 0 = one read)",
    )
    parser.add_argument(
        "--timeout",
        type=seconds_argument(),
        default=5.0,
        metavar="S",
        help="per request (default 5)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the node's /status document as JSON instead"
    )
    return parser


def _target(text: str) -> tuple[str, int]:
    text = text.strip().removeprefix("http://").rstrip("/")
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_address(text)


def _get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"{format_address(host, port)}{path}: {exc}") from None
    finally:
        connection.close()


def _status(host: str, port: int, timeout: float) -> dict[str, Any]:
    code, body = _get(host, port, "/status", timeout)
    if code != 200:
        raise Unreachable(f"{format_address(host, port)}/status answered HTTP {code}")
    try:
        document: dict[str, Any] = json.loads(body)
    except ValueError:
        raise Unreachable(f"{format_address(host, port)}/status is not JSON") from None
    return document


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {seconds:02d}s"
    return f"{minutes}m {seconds:02d}s"


def render(
    status: dict[str, Any], healthy: bool, ready: bool, rate: float | None, address: str
) -> str:
    """The summary, as lines of text."""
    tasks = status["tasks"]
    workers = status["workers"]
    ready_workers = sum(1 for w in workers if w["status"] == "ready")
    lines = [
        f"cpnode {status['node_id']} at {address}: role {status['role']}, "
        f"version {status['version']}, pid {status['pid']}",
        f"status    {status['status']} ({'healthy' if healthy else 'UNHEALTHY'}, "
        f"{'ready' if ready else 'NOT READY'}), uptime {_duration(status['uptime_seconds'])}, "
        f"loop lag {status['loop_lag_seconds'] * 1000:.1f} ms",
        f"master    {status['master'] or '-'} ({status['link']}; {status['connects']} connects, "
        f"{status['failovers']} failovers)",
        f"tasks     {tasks['received']} received, {tasks['answered']} answered, "
        + (f"{rate:.1f}/s" if rate is not None else "-/s"),
        f"queue     {tasks['queued']} waiting, {tasks['held']} held, "
        f"{tasks['io_running']} I/O running, {tasks['unconfirmed']} results unconfirmed",
        f"workers   {ready_workers} ready of {len(workers)}",
        "  #  pid      status    held   done       restarts",
    ]
    for worker in workers[:MAX_WORKER_ROWS]:
        lines.append(
            f"  {worker['index']:<2} {worker['pid'] or '-'!s:<8} {worker['status']:<9} "
            f"{worker['held']:<6} {worker['tasks_done']:<10} {worker['restarts']}"
        )
    if len(workers) > MAX_WORKER_ROWS:
        lines.append(f"  ... {len(workers) - MAX_WORKER_ROWS} more")
    causes = status.get("worker_restarts_by_cause") or {}
    if causes:
        lines.append(
            "restarts  " + ", ".join(f"{count} x {cause}" for cause, count in causes.items())
        )
    problems = status.get("recent_problems") or []
    if problems:
        lines.append(f"recent problems (last {min(len(problems), MAX_PROBLEMS)}):")
        for problem in problems[-MAX_PROBLEMS:]:
            when = time.strftime("%H:%M:%S", time.localtime(problem["ts"]))
            level, logger = problem["level"], problem["logger"]
            lines.append(f"  {when} {level:<5} {logger}: {problem['message']}")
    else:
        lines.append("recent problems: none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `cpnode-status | head -1`: the reader has what it wanted
        # Python would complain again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        host, port = _target(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    address = format_address(host, port)
    try:
        first = _status(host, port, args.timeout)
        started = time.monotonic()
        healthy = _get(host, port, "/healthz", args.timeout)[0] == 200
        ready = _get(host, port, "/readyz", args.timeout)[0] == 200
        rate = None
        status = first
        if args.interval > 0:
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
            status = _status(host, port, args.timeout)
            elapsed = status["uptime_seconds"] - first["uptime_seconds"]
            if elapsed > 0:
                rate = (status["tasks"]["answered"] - first["tasks"]["answered"]) / elapsed
        text = (
            json.dumps(dict(status, healthy=healthy, ready=ready, tasks_per_second=rate))
            if args.json
            else render(status, healthy, ready, rate, address)
        )
    except Unreachable as exc:
        print(
            f"cpnode-status: cannot read the node's health endpoint: {exc}\n"
            "(is the node running with --health-port or --health-listen?)",
            file=sys.stderr,
        )
        return 2
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        print(
            f"cpnode-status: {address}/status is not a cpnode status document"
            f" ({type(exc).__name__}: {exc}); is a cpnode listening there?",
            file=sys.stderr,
        )
        return 2
    print(text)
    return 0 if healthy and ready else 1


if __name__ == "__main__":
    sys.exit(main())
