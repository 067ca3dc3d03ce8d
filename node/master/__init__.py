"""The local CPCluster master: a protocol-compatible master for development, tests and benchmarks.

    scheduler.py  sans-I/O state: per-role FIFO queues, nodes, windows, results (O(1) per task)
    journal.py    the state file: JSON-lines journal written by a thread, replayed at start
    server.py     asyncio Protocols over TCP, the token check, the handlers; start_master(),
                  MasterThread
    cli.py        `cpnode-master`

Where upstream loses work or stalls, this master does not: see the README's list of differences.
"""

from node.master.scheduler import Policy
from node.master.server import MasterServer, MasterStats, MasterThread, new_token, start_master

__all__ = ["MasterServer", "MasterStats", "MasterThread", "Policy", "new_token", "start_master"]
