"""The README stays true: every config field documented, the two commands as CI runs them, and
the quick start does what it says: a node with its own local master answers `cpnode-submit`."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from node.config import CONFIG_FIELDS, config_reference_markdown
from tests.netservers import free_port

README = (Path(__file__).parent.parent / "README.md").read_text()
TIMEOUT = 60.0


def test_readme_config_reference_is_current() -> None:
    start = README.index("<!-- config-reference")
    end = README.index("<!-- end config-reference -->")
    section = README[start:end]
    assert config_reference_markdown().strip() in section
    for spec in CONFIG_FIELDS:
        assert f"`{spec.name}`" in section


def test_readme_names_the_install_and_test_commands() -> None:
    assert "cpnode-supervisor --workers 2 --local-master" in README
    assert ".venv/bin/python -m pytest" in README
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "-m pytest" in ci


def readme_command(program: str, *words: str) -> list[str]:
    """The arguments of the first README command line that runs `program` with `words`."""
    for line in README.splitlines():
        for command in line.split("&&"):
            try:
                argv = shlex.split(command)
            except ValueError:  # prose with an apostrophe: no command
                continue
            if argv and argv[0].endswith(f"/{program}") and all(w in argv for w in words):
                return argv[1:]
    raise AssertionError(f"the README runs no `{program} {' '.join(words)}`")


def wait_for_text(process: subprocess.Popen[bytes], log: Path, text: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while text not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged within {TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], children: list[psutil.Process]) -> None:
    """What a failed test leaves running: SIGTERM (a drain), then SIGKILL; then its children."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if process.poll() is not None:
            break
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def test_readme_quick_start_runs_and_answers(tmp_path: Path) -> None:
    # `cpnode-supervisor --workers 2 --local-master`, in a fresh directory, with nothing of ours
    # in the environment. The one addition: a free port for the local master (55000 may be
    # taken on this machine).
    supervisor_args = readme_command("cpnode-supervisor", "--local-master")
    assert supervisor_args == ["--workers", "2", "--local-master"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCLUSTER_")}
    # A config.json lying in the directory is not the node's (it was given no CONFIG), so the
    # local master must not read it either: it would exit 2 on this one.
    (tmp_path / "config.json").write_text("{not the node's config")
    log = tmp_path / "node.log"
    with log.open("wb") as output:
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", *supervisor_args, "--local-master-port", str(port)],
            cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        wait_for_text(node, log, "node ready")
        children = psutil.Process(node.pid).children(recursive=True)
        # The local master, the forkserver and two workers (and the forkserver's helpers).
        assert len(children) >= 4, children
        # It wrote join.json in the current directory and printed how to submit work.
        join = json.loads((tmp_path / "join.json").read_text())
        assert (join["ip"], join["port"]) == ("127.0.0.1", port)
        assert "submit work with:\n  cpnode-submit --join join.json compute" in log.read_text()

        # "In a second terminal": the README's own cpnode-submit lines, in the same directory.
        for words, answer in ((["compute"], "1028"), (["complex"], "5+5i")):
            submit_args = readme_command("cpnode-submit", "--join", "join.json", *words)
            done = subprocess.run(
                [sys.executable, "-m", "node.submit_cli", *submit_args],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT,
            )  # fmt: skip
            assert (done.returncode, done.stdout) == (0, f"{answer}\n"), (submit_args, done.stderr)

        # "Stop the node with Ctrl-C or SIGTERM: it drains ... and exits 0."
        node.send_signal(signal.SIGTERM)
        assert node.wait(TIMEOUT) == 0, log.read_text()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], alive
    finally:
        stop(node, children)


def test_local_master_that_cannot_start_says_why_with_the_documented_status(
    tmp_path: Path,
) -> None:
    # A port in use may be free at the next start (exit 1, systemd restarts); a join.json
    # path that cannot be written is the operator's to fix (exit 2).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCLUSTER_")}

    def supervisor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "--workers", "1", "--local-master", *args],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = supervisor("--local-master-port", str(port))
    assert done.returncode == 1, done.stderr
    assert f"cpnode-master: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert f"is port {port} in use?" in done.stderr
    done = supervisor("--local-master-port", str(free_port()), "--join", "missing/join.json")
    assert done.returncode == 2, done.stderr
    assert "missing/join.json: cannot write join file: No such file or directory" in done.stderr
    assert "the local master refused its configuration (see above)" in done.stderr
    assert "in use" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no state file left behind


def test_sigterm_while_the_local_master_starts_stops_both(tmp_path: Path) -> None:
    # Before the node's event loop takes SIGTERM over (it then drains), SIGTERM's default action
    # ended the supervisor and left its --local-master running, in a session of its own. The
    # master here cannot finish starting: its state file is a FIFO nobody writes, so its
    # replay waits, and the supervisor waits for it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPCLUSTER_")}
    os.mkfifo(tmp_path / "state.fifo")
    (tmp_path / "config.json").write_text('{"state_file": "state.fifo"}')
    with open(tmp_path / "err.log", "wb") as err_file:  # the master inherits it
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "config.json", "--workers", "1",
             "--local-master", "--local-master-port", str(free_port())],
            cwd=tmp_path, env=env, stderr=err_file,
        )  # fmt: skip
    masters: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while not masters:
            assert time.monotonic() < deadline, "the local master never started"
            with contextlib.suppress(psutil.NoSuchProcess):
                masters = psutil.Process(node.pid).children()
            time.sleep(0.05)
        time.sleep(0.5)  # it is replaying (waiting on the FIFO), the supervisor waiting for it
        node.send_signal(signal.SIGTERM)
        code = node.wait(TIMEOUT)
        err = (tmp_path / "err.log").read_text()
        assert code == 0, err
        assert "stopped (SIGTERM) before it started" in err
        _, alive = psutil.wait_procs(masters, timeout=TIMEOUT)
        assert not alive, f"the local master is still running: {alive}"
    finally:
        for process in masters:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if node.poll() is None:
            node.kill()
            node.wait(10)
