"""The loopback guard of the tests' child processes (tests/childguard/sitecustomize.py) is on
in every Python process a test starts, refuses traffic off loopback and reports it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.childguard.sitecustomize import _INET, LOG_VARIABLE

PROBE = """
import socket
socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
try:
    socket.create_connection(("192.0.2.1", 9), timeout=5)
except PermissionError as error:
    print("refused:", error)
"""


def test_a_child_process_is_refused_traffic_off_loopback(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        log = tmp_path / "refusals.log"  # not the session's log: this refusal is on purpose
        done = subprocess.run(
            [sys.executable, "-c", PROBE.format(port=port)],
            env=dict(os.environ, **{LOG_VARIABLE: str(log)}),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Loopback went through; 192.0.2.1 (TEST-NET-1) was refused before any packet left.
    assert "refused: loopback_only: socket.connect to ('192.0.2.1', 9)" in done.stdout
    assert "socket.connect to ('192.0.2.1', 9)" in log.read_text()
    assert "127.0.0.1" not in log.read_text()


def test_the_guard_knows_the_address_families() -> None:
    assert (socket.AF_INET, socket.AF_INET6) == _INET
