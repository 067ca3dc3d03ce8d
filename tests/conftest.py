"""What every test shares: no hidden timing assertion, and a guard against traffic off loopback.

- Hypothesis fails an example that runs longer than its `deadline` (200 ms by default): a timing
  assertion in disguise, which a loaded machine trips. The profile loaded here turns it off for
  every test and keeps every other default (a test's own `@settings` still applies on top).
- `loopback_only`: a fixture that refuses, in this process, every socket operation that could
  put a packet on a network other than loopback (connect, sendto, sendmsg to an address outside
  127.0.0.0/8 and ::1, and the resolution of a host name other than `localhost`). The operation
  raises PermissionError before any system call and is recorded; the test fails at teardown
  when anything was attempted.
- Every Python process a test starts (nodes, masters, workers, CLIs) has that guard on for its
  whole life: `pytest_configure` puts `tests/childguard` first on PYTHONPATH, whose
  `sitecustomize` installs it, and names a log file; any test during which a child wrote a
  refusal there fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.childguard.sitecustomize import LOG_VARIABLE, LoopbackGuard
from tests.scripted import ScriptedMaster

settings.register_profile("cpnode", deadline=None)
settings.load_profile("cpnode")


_CHILD_LOG = Path(tempfile.gettempdir(), f"cpnode-test-loopback-{os.getpid()}.log")


def pytest_configure(config: pytest.Config) -> None:
    """Give every Python process started from here on the loopback guard (see the module
    docstring); before any test, so forkservers and workers started in this process get it."""
    guard_dir = str(Path(__file__).parent / "childguard")
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([guard_dir, *([inherited] if inherited else [])])
    os.environ[LOG_VARIABLE] = str(_CHILD_LOG)
    _CHILD_LOG.unlink(missing_ok=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    _CHILD_LOG.unlink(missing_ok=True)


def _child_refusals() -> str:
    try:
        return _CHILD_LOG.read_text(errors="replace")
    except FileNotFoundError:
        return ""


@pytest.fixture(autouse=True)
def _children_stay_on_loopback() -> Iterator[None]:
    """Fail the test during which a child process tried to reach off loopback."""
    before = len(_child_refusals())
    yield
    refused = _child_refusals()[before:]
    assert not refused, f"a child process tried to reach off loopback (refused):\n{refused}"


_guard: LoopbackGuard | None = None


@pytest.fixture
def loopback_only() -> Iterator[LoopbackGuard]:
    """Refuse and record any traffic off loopback from this process while the test runs."""
    global _guard
    if _guard is None:
        # An audit hook cannot be removed: install one, once, and switch it on per test.
        _guard = LoopbackGuard()
        sys.addaudithook(_guard)
    _guard.attempts.clear()
    _guard.active = True
    try:
        yield _guard
    finally:
        _guard.active = False
    attempts = list(_guard.attempts)
    _guard.attempts.clear()
    assert attempts == [], f"traffic off loopback was attempted (and refused): {attempts}"


@pytest.fixture
def scripted() -> Iterator[ScriptedMaster]:
    """A `tests.scripted.ScriptedMaster` on loopback, closed after the test."""
    master = ScriptedMaster()
    try:
        yield master
    finally:
        master.close()
