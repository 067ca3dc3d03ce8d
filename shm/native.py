"""The compiled accelerators (see setup.py): one way to load them, and a record of what loaded.

Each is optional: `load("shm._bytesjson")` returns the module, or None when the install has no
such module (built without a C compiler, or with ``CPNODE_NO_EXTENSION=1``) or it cannot be
loaded (a broken or foreign build: the reason is kept, not swallowed). The Python code each one
stands in for stays in place as the reference and the fallback. `summary()` says which are in
use, for the supervisor's start-up log line.
"""

from __future__ import annotations

import importlib
import os
import types
from typing import Final

MODULES: Final = ("shm._bytesjson", "workers._fastpath", "node.protocol._speedups")
"""Every compiled module setup.py builds."""

_missing: dict[str, str] = {}  # module name -> why it did not load
_loaded: set[str] = set()


def skipped_on_purpose() -> bool:
    """The install was told to build none of them (``CPNODE_NO_EXTENSION`` set and not 0): the
    tests of the compiled paths skip instead of failing."""
    return os.environ.get("CPNODE_NO_EXTENSION", "") not in ("", "0")


def load(name: str) -> types.ModuleType | None:
    """The compiled module `name`, or None (the reason is kept for `summary`)."""
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        _missing[name] = str(error) or type(error).__name__
        return None
    _loaded.add(name)
    return module


def missing() -> dict[str, str]:
    """The compiled modules that did not load in this process, and why (loading each one that
    was not tried yet)."""
    for name in MODULES:
        if name not in _loaded and name not in _missing:
            load(name)
    return dict(_missing)


def summary() -> str:
    """One line: which compiled modules are in use, and why any is not."""
    absent = missing()
    used = [name for name in MODULES if name not in absent]
    parts = [f"compiled hot paths in use: {', '.join(used) or 'none'}"]
    if absent:
        reasons = "; ".join(f"{name} ({reason})" for name, reason in absent.items())
        parts.append(f"running the Python code instead of {reasons}")
    return "; ".join(parts)
