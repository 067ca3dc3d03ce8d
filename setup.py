"""The compiled parts of cpnode: ``shm._bytesjson``, the codec of JSON byte arrays,
``workers._fastpath``, the worker's answer to a plain ``Compute`` task, and
``node.protocol._speedups``, the supervisor's frame splitting and task-id reading.

Everything else lives in pyproject.toml. The extensions are optional accelerators of Python code
that stays the reference: without a C compiler the install still succeeds, ``shm.bytesjson``
decodes with numpy (about a fifth of the speed), and workers and the supervisor do everything in
Python. Set ``CPNODE_NO_EXTENSION=1`` to skip them on purpose.
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
            ("node.protocol._speedups", "node/protocol/_speedups.c"),
        ]
    ]

setup(ext_modules=extensions)
