"""The compiled part of cpnode: ``shm._bytesjson``, the fast decoder of JSON byte arrays.

Everything else lives in pyproject.toml. The extension is optional: without a C compiler the
install still succeeds and ``shm.bytesjson`` decodes with numpy (about half as fast). Set
``CPNODE_NO_EXTENSION=1`` to skip it on purpose.
"""

import os

from setuptools import Extension, setup

extensions = []
if os.environ.get("CPNODE_NO_EXTENSION", "") in ("", "0"):
    extensions.append(
        Extension(
            "shm._bytesjson",
            sources=["shm/_bytesjson.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
