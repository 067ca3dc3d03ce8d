"""`python -m tests.slownode CONFIG [OPTIONS]`: `cpnode-supervisor` (`node.cli`) whose workers run
`Compute` with tests/slowtasks.py, so a real node can be given tasks that sleep, or that say
which worker runs them (`NodeProcess(..., slow_compute=True)` starts one)."""

from __future__ import annotations

import functools
import sys

from node import cli, supervisor

if __name__ == "__main__":
    supervisor.WorkerSettings = functools.partial(
        supervisor.WorkerSettings, executors={"Compute": "tests.slowtasks:compute"}
    )
    sys.exit(cli.main())
