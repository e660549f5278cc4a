"""Fixtures for the tests of the client machine."""

from __future__ import annotations

import pytest
import trio

from tests.client.netrig import MakeNet, net_factory


@pytest.fixture
def make_net(nursery: trio.Nursery) -> MakeNet:
    """A small machine's network (tests/client/netrig.py), its tasks in the test's nursery."""
    return net_factory(nursery)
