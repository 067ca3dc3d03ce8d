"""The compiled parts of cpnode: ``shm._bytesjson``, the fast decoder of JSON byte arrays, and
``workers._fastpath``, the worker's answer to a plain ``Compute`` task.

Everything else lives in pyproject.toml. Both extensions are optional accelerators: without a C
compiler the install still succeeds, ``shm.bytesjson`` decodes with numpy (about a fifth of the
speed) and workers answer every task in Python. Set ``CPNODE_NO_EXTENSION=1`` to skip them on
purpose.
"""

import os

from setuptools import Extension, setup

extensions = []
if os.environ.get("CPNODE_NO_EXTENSION", "") in ("", "0"):
    extensions += [
        Extension(name, sources=[source], extra_compile_args=["-O2"], optional=True)
        for name, source in [
            ("shm._bytesjson", "shm/_bytesjson.c"),
            ("workers._fastpath", "workers/_fastpath.c"),
        ]
    ]

setup(ext_modules=extensions)
