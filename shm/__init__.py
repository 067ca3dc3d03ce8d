"""Shared memory and storage for the node's processes.

``segments`` moves blobs between processes through files in ``shm_dir``; ``nodedir`` claims the
node's own directory there (and clears what a crashed run left); ``memstore`` is the node-wide
memory store in it; ``diskstore`` keeps confined files under ``storage_dir`` within a quota;
``bytesjson`` turns blobs into their JSON wire form and back; ``space`` and ``errors`` serve
them all. Nothing here imports ``node`` or ``workers``.
"""
