"""Reproducible virtual-clock runs: trio's scheduler, seeded from the scenario.

trio's run loop takes each batch of runnable tasks in an order drawn from a module-level
``random.Random`` (``trio._core._run._r``): half the time reversed, or shuffled when
Hypothesis has asked for deterministic scheduling.  The randomness is deliberate, to shake
out code that depends on an order trio does not promise.  In the model, the order in which
kswapd, the hogs and the softirq task run decides who gets the last free pages, so near a
threshold the outcome of a run depends on it.

Under the virtual clock everything else is deterministic, so seeding that generator makes a
run a function of its scenario and ``run.seed``: the same seed gives the same run, and a
sweep over seeds measures how likely an outcome is.  Real-clock runs stay at the mercy of
the host's timing.

This reaches into trio's private module state (the same two names trio's own Hypothesis
plugin sets). If a trio release renames them, ``seeded_scheduling`` yields False and runs
are merely unseeded; ``tests/testbed/test_outcomes.py`` would show it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def seeded_scheduling(seed: int) -> Iterator[bool]:
    """Within the block, trio shuffles runnable tasks with a generator seeded by ``seed``
    (the Hypothesis mode, whether or not Hypothesis is loaded); restored afterwards.
    Yields whether seeding was possible."""
    try:
        from trio._core import _run
    except ImportError:  # pragma: no cover - trio moved its internals
        yield False
        return
    rng = getattr(_run, "_r", None)
    if not isinstance(rng, random.Random) or not hasattr(_run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
        yield False  # pragma: no cover
        return
    state = rng.getstate()
    mode = _run._ALLOW_DETERMINISTIC_SCHEDULING
    rng.seed(seed)
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    try:
        yield True
    finally:
        _run._ALLOW_DETERMINISTIC_SCHEDULING = mode  # type: ignore[misc]
        rng.setstate(state)
