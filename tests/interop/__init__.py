"""Interoperability: real NBD peers (nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-nbd) against us.

Each test starts the server in-process on 127.0.0.1 port 0 (``nbd_server``/``make_server``
from ``tests/conftest.py``) and runs the peer as a subprocess with ``trio.run_process``, so
the server keeps serving while the test awaits the peer.  A missing peer skips the test
locally and fails it in CI (``require_tool``).

This directory is a package so that its module names cannot collide with other test
directories'; imports inside it are relative.
"""
