"""The node's error tree, typed by who is at fault and whether retrying helps.

Every error the supervisor raises on purpose derives from `CpnodeError`, so a command line can
catch the whole family, print the message and exit with a status that says what went wrong.
The protocol codec keeps its own tree (`node.protocol.errors`) because it imports nothing of ours.

- `ConfigError`: the operator's config file, `join.json` or command line is wrong. Retrying cannot
  help; the message names the file, the field, the bad value and what is expected, and the node
  exits with status 2 before starting anything.
- `ListenError`: an address of ours cannot be listened on (a port in use, say). Nothing in the
  configuration need be wrong, and a later start may work: exit status 1.
"""

from __future__ import annotations


class CpnodeError(Exception):
    """Base of every error the node raises on purpose."""


class ConfigError(CpnodeError):
    """A config file, `join.json` or a command-line setting is invalid; fix it and start again."""


class ListenError(CpnodeError):
    """A port or address the node must listen on cannot be bound (exit status 1)."""
