"""The four reserve policies the testbed compares (DESIGN.md §4.3)."""

from __future__ import annotations

from collections.abc import Callable

from client.config import Scenario
from client.policy.base import Policy
from client.policy.none import NonePolicy
from client.policy.pfmemalloc import PfmemallocPolicy
from client.policy.recursive import RecursivePolicy
from client.policy.reserve import MemReserve, MemReservePolicy

POLICIES: dict[str, Callable[[Scenario], Policy]] = {
    "none": lambda _s: NonePolicy(),
    "recursive": lambda _s: RecursivePolicy(),
    "reserve": lambda s: MemReservePolicy(s.reserve),
    "pfmemalloc": lambda s: PfmemallocPolicy(throttle=s.throttle),
}


def make_policy(name: str, scenario: Scenario) -> Policy:
    """The policy called ``name``, configured from the scenario."""
    try:
        return POLICIES[name](scenario)
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "MemReserve",
    "MemReservePolicy",
    "NonePolicy",
    "PfmemallocPolicy",
    "Policy",
    "RecursivePolicy",
    "make_policy",
]
