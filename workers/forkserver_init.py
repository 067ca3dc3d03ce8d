"""Imported once, by the forkserver process only (`set_forkserver_preload`), first.

The supervisor owns shutdown. SIGTERM sent to the whole process group (a service manager, a
terminal) must not kill the forkserver: its workers die with it (PR_SET_PDEATHSIG), which would
turn a graceful drain into lost work. The forkserver still exits when the supervisor does, since
it watches the supervisor's end of a pipe.

SIGINT (a terminal's Ctrl-C) is ignored here too, not only once the forkserver's loop runs: the
forkserver gives each worker it forks the handlers that were in place when its loop started, so
a worker ignores SIGINT from its first instruction, not only from `worker_main` on (a Ctrl-C
while workers started killed some with exit code 1, and the node exited 1 instead of stopping).
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
