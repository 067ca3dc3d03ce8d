"""Run a real `cpnode-supervisor` process for tests, and stop it with nothing left behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from shm.errors import NodeDirectoryInUse
from shm.nodedir import claim_node_dir

REPOSITORY = str(Path(__file__).resolve().parent.parent)


class NodeProcess:
    """`python -m node.cli CONFIG` as a child process, with its log captured to a file;
    `slow_compute`: `python -m tests.slownode CONFIG`, whose workers know the test expressions
    of tests/slowtasks.py."""

    def __init__(
        self,
        tmp: Path,
        join: Path,
        config: dict[str, object],
        *args: str,
        slow_compute: bool = False,
    ) -> None:
        # An explicit node_id, so that what a killed node leaves in shm_dir can be found.
        config = {"node_id": f"test-{uuid.uuid4().hex[:12]}", **config}
        self.node_id = config["node_id"]
        self.shm_dir = str(config.get("shm_dir", "/dev/shm"))
        self.config_path = tmp / "node-config.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = tmp / "node.log"
        env = dict(os.environ, CPCLUSTER_JOIN=str(join))
        env.pop("CPCLUSTER_TOKEN", None)
        module = "node.cli"
        if slow_compute:  # the node and its workers import `tests`
            module = "tests.slownode"
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), REPOSITORY]))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(self.config_path), *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=tmp,
        )
        self.children: list[psutil.Process] = []

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log}")

    def record_children(self) -> list[psutil.Process]:
        """Every process the node started, directly or through the forkserver."""
        self.children = psutil.Process(self.proc.pid).children(recursive=True)
        return self.children

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode

    def close(self) -> None:
        """Stop the node if it still runs: SIGTERM (a drain), a second SIGTERM (stop at once)
        if it takes a while, SIGKILL as a last resort. A node that stops by itself removes its
        directory in /dev/shm; a killed one would leave it there."""
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        for child in self.children:
            if child.is_running():
                child.kill()
        self._log.close()
        if self.proc.returncode is not None and self.proc.returncode < 0 and self.node_id:
            # Killed (by the test or by the last resort above): clear its directory the way
            # the next start with its node_id would.
            with contextlib.suppress(NodeDirectoryInUse, OSError):
                claim_node_dir(self.shm_dir, str(self.node_id)).release()

    def leftover_children(self, timeout: float = 5.0) -> list[psutil.Process]:
        _, alive = psutil.wait_procs(self.children, timeout=timeout)
        return alive
