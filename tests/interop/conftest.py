"""Fixtures for the interop tests: one per peer, and the random data they copy.

A peer fixture is synchronous, so a missing tool skips (or, in CI, fails) the test before
trio starts, through the suite's ``require_tool``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require_tool

MiB = 1 << 20


@pytest.fixture
def nbdinfo() -> str:
    return require_tool("nbdinfo")


@pytest.fixture
def nbdcopy() -> str:
    return require_tool("nbdcopy")


@pytest.fixture
def nbdsh() -> str:
    return require_tool("nbdsh")


@pytest.fixture
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture
def qemu_nbd() -> str:
    return require_tool("qemu-nbd")


@pytest.fixture(scope="session")
def random_64m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 MiB of random data in a file (written once per session; treat it as read-only)."""
    path = tmp_path_factory.mktemp("interop-data") / "random-64m.img"
    with path.open("wb") as fh:
        for _ in range(64):
            fh.write(os.urandom(MiB))
    return path
