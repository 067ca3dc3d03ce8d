"""Imported once, by the forkserver process only (`set_forkserver_preload`).

The supervisor owns shutdown. SIGTERM sent to the whole process group (a service manager, a
terminal) must not kill the forkserver: its workers die with it (PR_SET_PDEATHSIG), which would
turn a graceful drain into lost work. The forkserver still exits when the supervisor does, since
it watches the supervisor's end of a pipe. (It already ignores SIGINT itself.)
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
