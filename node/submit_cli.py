"""`cpnode-submit`: run tasks on a CPCluster network from the command line.

    argv ──argparse──▶ task(s) ──Client (node.client)──▶ master ──▶ result(s) ──▶ stdout

One subcommand per task type submits that task, waits for its result and prints it (`--json` for
the wire form); `batch` submits a file of tasks in upstream JSON form in one go and prints one
JSON line per task, in input order. The exit status says what happened (see `EXIT_*`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import IO, Final

import orjson
import uvloop

from node.client import (
    DEFAULT_RESULT_TIMEOUT,
    AuthenticationError,
    Client,
    ClientError,
    ResultTimeout,
)
from node.config import (
    host_argument,
    load_join,
    parse_address,
    port_argument,
    seconds_argument,
)
from node.direct import DirectClient, DirectError, DirectLinkRefused
from node.errors import ConfigError
from node.protocol import (
    Bytes,
    ComplexMath,
    Compute,
    DiskRead,
    DiskWrite,
    Error,
    GetGlobalRam,
    GetStorage,
    HttpRequest,
    Number,
    RemoteProtocolError,
    Response,
    Result,
    RetrieveData,
    Stored,
    StoreData,
    Task,
    Tcp,
    Udp,
    Written,
    result_to_json,
    task_from_json,
)
from node.tls import TlsVerifyError

EXIT_OK: Final = 0
EXIT_TASK_FAILED: Final = 1  # a result is an Error, or a result did not come in time
EXIT_USAGE: Final = 2  # bad command line, join.json, data file or batch file
EXIT_AUTH: Final = 3  # the master rejected the token
EXIT_CONNECTION: Final = 4  # no connection, connection lost, or the master misbehaved
EXIT_INTERRUPTED: Final = 130

_PROG: Final = "cpnode-submit"

_DESCRIPTION = """\
Submit tasks to a CPCluster master and print their results.

One subcommand per task type submits one task, waits for its result and prints it. `batch`
submits a whole file of tasks at once and prints one JSON line per task."""

_EPILOG = """\
data arguments (tcp, udp, store, disk-write):
  DATA is the bytes to send: @FILE reads them from FILE, @- from standard input, and
  anything else is taken as text (UTF-8). --text STRING always means the text itself,
  also when it starts with "@".

output:
  Number    as Rust prints an f64: 3, 0.5, -0, 1000000000000000000000
  Response  the text, with a newline added if it has none
  Bytes     the raw bytes, unchanged, no newline added
  Stored, Written   the word
  Error     "cpnode-submit: task ID failed: MESSAGE" on stderr (exit status 1)
  --json    one line {"id":ID,"result":RESULT}, RESULT in the wire form
            ({"Number":3.0}, {"Response":"..."}, {"Bytes":[1,2]}, "Stored", {"Error":"..."}),
            or {"id":ID,"result":null,"error":"timeout: ..."} when no result came in time,
            {"id":ID,"result":null,"error":"connection: ..."} when the connection broke first
  batch     the same, one line per task in input order, with "task_index":N after the id:
            when the connection breaks, every result already received is still printed
  A task without a result may still be on the master: `cpnode-submit result ID` fetches it.

exit status:
  0  every result arrived and none is an Error
  1  a result is an Error, or a result did not arrive before --timeout
  2  bad command line, join.json, data file or batch file (nothing was submitted)
  3  the master rejected the token (join.json's token, CPCLUSTER_TOKEN or --token)
  4  cannot connect to the master (or the --direct node), the connection broke, or the
     master stopped answering or broke the protocol
  130  interrupted (Ctrl-C)

environment:
  CPCLUSTER_JOIN   path of join.json when --join is not given (default ./join.json)
  CPCLUSTER_TOKEN  the token, instead of the one in join.json"""

_BATCH_HELP = """\
FILE holds one task per line in upstream JSON form, e.g. {"Compute":{"expression":"1+2"}},
{"StoreData":{"key":"k","data":[1,2,3]}} or "GetGlobalRam"; blank lines are skipped; "-"
reads standard input. The whole file is checked before anything is submitted. Every task is
submitted in one go, then the results are polled; --timeout bounds the wait for them all. Prints
one JSON line per task in input order: {"id":ID,"task_index":N,"result":RESULT}, or
{"id":ID,"task_index":N,"result":null,"error":"timeout: ..."} for a task without a result in
time. Exit status 1 when any result is an Error or missing. When the connection breaks (the
master stopped or restarted), the results already received are printed all the same, each other
task gets {"id":ID,"task_index":N,"result":null,"error":"connection: ..."}, and the exit status
is 4; `cpnode-submit result ID` fetches such a task's result if the master kept it."""


# --- command line --------------------------------------------------------------------------


def _pem_file(text: str) -> str:
    """argparse type of --ca-cert: a file that can be read (what it holds is checked later)."""
    try:
        with open(text, "rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {error.strerror or error}") from None
    return text


def _add_common_options(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """The connection and output options, accepted before or after the subcommand."""

    def default(value: object) -> object:
        # On a subcommand an option not given must not hide the one given before it.
        return argparse.SUPPRESS if on_subcommand else value

    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--join",
        metavar="PATH",
        default=default(None),
        help="the master's join.json (default: $CPCLUSTER_JOIN, else ./join.json)",
    )
    group.add_argument(
        "--host",
        type=host_argument,
        default=default(None),
        help="connect to HOST instead of join.json's ip",
    )
    group.add_argument(
        "--port",
        type=port_argument,
        default=default(None),
        help="connect to PORT instead of join.json's",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help="use TOKEN instead of join.json's (other users can see it in the process "
        "list; prefer CPCLUSTER_TOKEN)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds_argument(),
        default=default(DEFAULT_RESULT_TIMEOUT),
        help="how long to wait for the result once the task is submitted; for batch, for "
        f"all the results (default {DEFAULT_RESULT_TIMEOUT:g})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help='print the result as one JSON line {"id":ID,"result":RESULT} (batch always does)',
    )
    group.add_argument(
        "--direct",
        metavar="HOST:PORT",
        default=default(None),
        help="send the task(s) straight to a node's direct port instead of the master "
        "(authenticated with the token of join.json, CPCLUSTER_TOKEN or --token)",
    )
    group.add_argument(
        "--tls",
        choices=("auto", "always", "never"),
        default=default("auto"),
        help="auto (default): TLS when the address is not loopback or private; always; never",
    )
    group.add_argument(
        "--ca-cert",
        metavar="PATH",
        type=_pem_file,
        default=default(None),
        help="PEM file of the CA to check the TLS certificate against (default: system roots)",
    )


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        metavar="DATA",
        nargs="?",
        help="the bytes: @FILE, @- for standard input, or text",
    )
    parser.add_argument(
        "--text", metavar="STRING", help="the bytes as the UTF-8 text STRING, taken literally"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_options(parser, on_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, **extra: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=extra.get("description", summary),
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common_options(sub, on_subcommand=True)
        return sub

    command("compute", "evaluate a real expression (Compute), e.g. 1+2").add_argument(
        "expression", metavar="EXPR"
    )
    command(
        "complex", "evaluate a complex expression (ComplexMath), e.g. (1+2*i)*(3-i)"
    ).add_argument("expression", metavar="EXPR")
    command("http", "GET a URL and print the body (HttpRequest)").add_argument("url", metavar="URL")
    for name, kind in (("tcp", "Tcp"), ("udp", "Udp")):
        sub = command(name, f"send DATA to ADDR from an Internet node, print the answer ({kind})")
        sub.add_argument("addr", metavar="ADDR", help="host:port")
        _add_data(sub)
    sub = command("store", "store DATA under KEY (StoreData)")
    sub.add_argument("key", metavar="KEY")
    _add_data(sub)
    command("retrieve", "read what is stored under KEY (RetrieveData)").add_argument(
        "key", metavar="KEY"
    )
    sub = command("disk-write", "write DATA to PATH in a Disk node's storage_dir (DiskWrite)")
    sub.add_argument("path", metavar="PATH")
    _add_data(sub)
    command("disk-read", "read PATH from a Disk node's storage_dir (DiskRead)").add_argument(
        "path", metavar="PATH"
    )
    command("ram", "list the keys in the memory store (GetGlobalRam)")
    command("storage", "show a Disk node's free space and files (GetStorage)")
    command(
        "result", "wait for the result of a task submitted earlier (GetTaskResult)"
    ).add_argument("id", metavar="ID", help="the task id, as printed by a timeout or --json")
    sub = command(
        "batch", "submit every task of a JSON-lines file", description=_BATCH_HELP.strip()
    )
    sub.add_argument("file", metavar="FILE", help='tasks, one per line; "-" for standard input')
    sub.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (one is drawn on stderr only when it is a terminal)",
    )
    return parser


def _read_data(args: argparse.Namespace) -> bytes:
    if args.text is not None and args.data is not None:
        raise ConfigError(f"{args.command}: give DATA or --text, not both")
    if args.text is not None:
        return str(args.text).encode("utf-8")
    if args.data is None:
        raise ConfigError(f"{args.command}: missing DATA (@FILE, @- or text) or --text STRING")
    data = str(args.data)
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        path = data[1:]
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as error:
            raise ConfigError(
                f"{args.command}: cannot read data file {path}: {error.strerror or error}"
            ) from None
    return data.encode("utf-8", "surrogateescape")


def _task(args: argparse.Namespace) -> Task:
    match args.command:
        case "compute":
            return Compute(args.expression)
        case "complex":
            return ComplexMath(args.expression)
        case "http":
            return HttpRequest(args.url)
        case "tcp":
            return Tcp(args.addr, _read_data(args))
        case "udp":
            return Udp(args.addr, _read_data(args))
        case "store":
            return StoreData(args.key, _read_data(args))
        case "retrieve":
            return RetrieveData(args.key)
        case "disk-write":
            return DiskWrite(args.path, _read_data(args))
        case "disk-read":
            return DiskRead(args.path)
        case "ram":
            return GetGlobalRam()
        case "storage":
            return GetStorage()
    raise AssertionError(f"unhandled command {args.command!r}")


def read_batch(path: str) -> list[Task]:
    """Every task of a batch file (`-`: standard input); ConfigError names the bad line."""
    label = "<stdin>" if path == "-" else path
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                raw = file.read()
    except OSError as error:
        raise ConfigError(f"{label}: cannot read batch file: {error.strerror or error}") from None
    tasks: list[Task] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tasks.append(task_from_json(orjson.loads(line)))
        except orjson.JSONDecodeError as error:
            raise ConfigError(f"{label}:{number}: not valid JSON: {error}") from None
        except RemoteProtocolError as error:
            raise ConfigError(f"{label}:{number}: not a task: {error}") from None
    return tasks


# --- output --------------------------------------------------------------------------------


def rust_display(value: float) -> str:
    """`value` as Rust's `{}` prints an f64: shortest round-trip digits, never an exponent."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    text = format(Decimal(repr(value)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _line_head(task_id: str, index: int | None) -> bytes:
    head = b'{"id":' + orjson.dumps(task_id)
    return head if index is None else head + b',"task_index":' + str(index).encode()


def _result_line(task_id: str, index: int | None, result: Result) -> bytes:
    return _line_head(task_id, index) + b',"result":' + result_to_json(result) + b"}\n"


def _missing_line(task_id: str, index: int | None, reason: str) -> bytes:
    return _line_head(task_id, index) + b',"result":null,"error":' + orjson.dumps(reason) + b"}\n"


def _timed_out(timeout: float) -> str:
    """Why a task has no result, when the wait for it ran out."""
    return f"timeout: no result within {timeout:g} s"


def _cut_off(error: BaseException) -> str:
    """Why a task has no result, when the connection that would carry it broke."""
    return f"connection: {error}"


def _no_result_reason(error: ClientError) -> str:
    return _timed_out(error.timeout) if isinstance(error, ResultTimeout) else _cut_off(error)


def _fetch_later(ids: Sequence[str]) -> str:
    """The hint after a broken connection: how to get the results that did not arrive."""
    if len(ids) == 1:
        return (
            f"task {ids[0]} has no result: `{_PROG} result {ids[0]}` fetches it if the master "
            "kept it"
        )
    return (
        f"{len(ids)} tasks have no result (their lines name their ids): "
        f"`{_PROG} result ID` fetches one if the master kept it"
    )


def _write_result(task_id: str, result: Result, as_json: bool) -> int:
    status = EXIT_TASK_FAILED if isinstance(result, Error) else EXIT_OK
    out = sys.stdout.buffer
    if as_json:
        out.write(_result_line(task_id, None, result))
    else:
        match result:
            case Number(value):
                out.write(rust_display(value).encode() + b"\n")
            case Response(text):
                out.write(text.encode("utf-8") + (b"" if text.endswith("\n") else b"\n"))
            case Bytes(data):
                out.write(data)
            case Stored() | Written():
                out.write(type(result).__name__.encode() + b"\n")
            case Error(message):
                _complain(f"task {task_id} failed: {message}")
    out.flush()
    return status


def _complain(message: str) -> None:
    sys.stderr.write(f"{_PROG}: {message}\n")
    sys.stderr.flush()


class ProgressBar:
    """One line on a terminal, redrawn at most ten times a second:

    [##############----------------]  47%  4,700/10,000 tasks  1.2 s
    """

    _WIDTH: Final = 30
    _EVERY: Final = 0.1

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._started = time.monotonic()
        self._drawn = 0.0
        self._shown = False

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._drawn < self._EVERY:
            return
        self._drawn = now
        share = done / total if total else 1.0
        filled = round(share * self._WIDTH)
        bar = "#" * filled + "-" * (self._WIDTH - filled)
        self._stream.write(
            f"\r[{bar}] {share:4.0%}  {done:,}/{total:,} tasks  {now - self._started:.1f} s"
        )
        self._stream.flush()
        self._shown = True

    def finish(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


# --- running -------------------------------------------------------------------------------


def _direct_target(args: argparse.Namespace) -> tuple[str, int, str]:
    """Host, port and token for --direct; ConfigError when they cannot be had."""
    try:
        host, port = parse_address(args.direct)
    except ValueError as error:
        raise ConfigError(f"--direct: {error}") from None
    token = args.token if args.token is not None else load_join(args.join).token
    return host, port, token


async def _run_direct(args: argparse.Namespace, tasks: list[Task], batch: bool) -> int:
    """Send the tasks over one direct link; results are pushed back, so nothing is polled."""
    host, port, token = _direct_target(args)
    client = await DirectClient.connect(
        host, port, token, tls=args.tls, ca_cert_path=args.ca_cert, timeout=10.0
    )
    results: dict[str, Result] = {}
    failures: dict[str, str] = {}
    link_broke = False
    async with client:
        submitted = [client.submit(task) for task in tasks]
        await asyncio.wait([waiter for _, waiter in submitted], timeout=args.timeout)
        for task_id, waiter in submitted:
            if not waiter.done():
                waiter.cancel()
                failures[task_id] = _timed_out(args.timeout)
            elif (error := waiter.exception()) is not None:
                failures[task_id] = _cut_off(error)
                link_broke = True
            else:
                results[task_id] = waiter.result()
    ids = [task_id for task_id, _ in submitted]
    failed_status = EXIT_CONNECTION if link_broke else EXIT_TASK_FAILED
    if not batch:
        (task_id,) = ids
        if task_id in results:
            return _write_result(task_id, results[task_id], args.json)
        if args.json:
            sys.stdout.buffer.write(_missing_line(task_id, None, failures[task_id]))
            sys.stdout.flush()
        _complain(f"task {task_id}: {failures[task_id]}")
        return failed_status
    lines: list[bytes] = []
    for index, task_id in enumerate(ids):
        result = results.get(task_id)
        lines.append(
            _missing_line(task_id, index, failures[task_id])
            if result is None
            else _result_line(task_id, index, result)
        )
    sys.stdout.buffer.write(b"".join(lines))
    sys.stdout.flush()
    if failures:
        reason = next(iter(failures.values()))
        _complain(f"{len(failures)} of {len(ids)} tasks had no result: {reason}")
        return failed_status
    failed = any(isinstance(result, Error) for result in results.values())
    return EXIT_TASK_FAILED if failed else EXIT_OK


async def _run_single(args: argparse.Namespace, task: Task | None) -> int:
    if args.direct is not None:
        if task is None:
            raise ConfigError("result: a direct link keeps no results; poll the master instead")
        return await _run_direct(args, [task], batch=False)
    async with Client.connect(
        args.join, host=args.host, port=args.port, token=args.token,
        tls=args.tls, ca_cert_path=args.ca_cert,
    ) as client:  # fmt: skip
        try:
            task_id = args.id if task is None else await client.submit(task)
            result = await client.result(task_id, args.timeout)
        except ClientError as error:
            # The id was made here and printed nowhere yet: say it, or the task is lost.
            if args.json:
                reason = _no_result_reason(error)
                for task_id in error.pending:
                    sys.stdout.buffer.write(_missing_line(task_id, None, reason))
                sys.stdout.flush()
            if isinstance(error, ResultTimeout):
                _complain(str(error))
                return EXIT_TASK_FAILED
            _complain(f"{error}; {_fetch_later(error.pending)}" if error.pending else str(error))
            return EXIT_CONNECTION
    return _write_result(task_id, result, args.json)


async def _run_batch(args: argparse.Namespace, tasks: list[Task]) -> int:
    if args.direct is not None:
        return await _run_direct(args, tasks, batch=True)
    draw = not args.no_progress and sys.stderr.isatty()
    bar = ProgressBar(sys.stderr) if draw else None
    async with Client.connect(
        args.join, host=args.host, port=args.port, token=args.token,
        tls=args.tls, ca_cert_path=args.ca_cert,
    ) as client:  # fmt: skip
        ids: list[str] = []
        failure: ClientError | None = None
        try:
            ids = await client.submit_many(tasks)
            results = await client.results(
                ids, args.timeout, progress=bar.update if bar is not None else None
            )
        except ClientError as error:
            # Whatever ended the wait, the results received are printed; a submission that
            # broke off hands back the ids it made in `pending`.
            failure = error
            ids = ids or error.pending
            results = error.done
        finally:
            if bar is not None:
                bar.finish()
    reason = "" if failure is None else _no_result_reason(failure)
    status = EXIT_OK
    lines: list[bytes] = []
    for index, task_id in enumerate(ids):
        result = results.get(task_id)
        if result is None:
            lines.append(_missing_line(task_id, index, reason))
            status = EXIT_TASK_FAILED
        else:
            lines.append(_result_line(task_id, index, result))
            if isinstance(result, Error):
                status = EXIT_TASK_FAILED
    sys.stdout.buffer.write(b"".join(lines))
    sys.stdout.flush()
    if failure is None:
        return status
    if isinstance(failure, ResultTimeout):
        _complain(str(failure))
        return status
    _complain(f"{failure}; {_fetch_later(failure.pending)}" if failure.pending else str(failure))
    return EXIT_CONNECTION


def _expression_behind_dashes(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`compute -1+2`: argparse takes a word that starts with "-" for an option. The first
    such word after `compute`/`complex` that is no option of ours is the expression: move it
    behind "--", where argparse reads it as one (`compute -- -1+2` works as it is)."""
    if "--" in argv:
        return argv
    takes_value = {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}
    position = 0
    seen_command = False
    while position < len(argv):
        word = argv[position]
        if word.startswith("-"):
            option = _option_named(word, takes_value)
            if option is None and seen_command:
                return [*argv[:position], *argv[position + 1 :], "--", word]
            # An option's value follows it unless given as --option=value.
            position += 2 if option is not None and takes_value[option] and "=" not in word else 1
            continue
        if seen_command or word not in ("compute", "complex"):
            return argv  # the expression, or another command
        seen_command = True
        position += 1
    return argv


def _option_named(word: str, options: Mapping[str, bool]) -> str | None:
    """The option argparse takes `word` for (`--tim` and `--time=5` for `--timeout`), if any."""
    name = word.partition("=")[0]
    if name in options:
        return name
    if name.startswith("--") and len(name) > 2:
        matches = [option for option in options if option.startswith(name)]
        if matches:  # several: argparse says the abbreviation is ambiguous
            return matches[0]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run `cpnode-submit`; return the exit status (see `EXIT_*` and --help)."""
    parser = build_parser()
    try:
        args = parser.parse_args(
            _expression_behind_dashes(parser, list(sys.argv[1:] if argv is None else argv))
        )
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        # Everything from the command line is read and checked before connecting.
        if args.command == "batch":
            tasks = read_batch(args.file)
            if not tasks:
                return EXIT_OK
            work = _run_batch(args, tasks)
        else:
            work = _run_single(args, None if args.command == "result" else _task(args))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(work)
    except ConfigError as error:
        _complain(str(error))
        return EXIT_USAGE
    except (AuthenticationError, DirectLinkRefused) as error:
        _complain(str(error))
        return EXIT_AUTH
    except (ClientError, DirectError, TlsVerifyError) as error:
        _complain(str(error))
        return EXIT_CONNECTION
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (`| head`); stop quietly, as other tools do.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_TASK_FAILED


if __name__ == "__main__":
    sys.exit(main())
