"""``compare --seeds``: every policy once per seed, and how often each outcome came out."""

from __future__ import annotations

import argparse

import attrs

from client.summary import unstructure_summary
from nbdproto.config import ConfigError
from testbed.cli.common import EXIT_OK
from testbed.cli.render import write_summary
from testbed.cli.runs import run_all
from testbed.config import ScenarioConfig
from testbed.report import format_table


def parse_seeds(text: str) -> list[int]:
    """``0-9`` or ``1,5,7`` (or both: ``0-4,10``) → the seeds, in order, each once."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected A-B or A,B,... (integers)") from None
        if lo < 0 or hi < lo or hi - lo > 10_000:
            raise ConfigError(f"--seeds {text!r}: {part.strip()!r} is not a range of seeds")
        seeds.extend(s for s in range(lo, hi + 1) if s not in seeds)
    return seeds


def compare_seeds(
    args: argparse.Namespace, scenario: ScenarioConfig, policies: list[str], seeds: list[int]
) -> int:
    """Every policy once per seed; a table of how often each outcome came out."""
    work = [
        (f"{policy}, seed {seed}", attrs.evolve(scenario, run=attrs.evolve(scenario.run, seed=seed)),
         policy)
        for policy in policies
        for seed in seeds
    ]  # fmt: skip
    runs = [
        attrs.evolve(summary, seed=seeded.run.seed)
        for summary, (_, seeded, _) in zip(run_all(args, work, None), work, strict=True)
    ]
    counts: dict[str, dict[str, list[int]]] = {}
    for summary, (_, seeded, policy) in zip(runs, work, strict=True):
        counts.setdefault(policy, {}).setdefault(summary.outcome, []).append(seeded.run.seed)
    outcomes = sorted({o for by in counts.values() for o in by})
    rows = [("policy", *outcomes)]
    for policy in policies:
        rows.append((policy, *(f"{len(counts[policy].get(o, []))}/{len(seeds)}" for o in outcomes)))
    lines = format_table(rows)
    for policy in policies:
        for outcome in outcomes:
            which = counts[policy].get(outcome)
            if which:
                lines.append(f"{policy} {outcome}: seeds {', '.join(map(str, which))}")
    print("\n".join(lines))
    if args.summary:
        write_summary(
            args.summary,
            {
                "scenario": args.scenario,
                "seeds": seeds,
                "runs": [unstructure_summary(r) for r in runs],
            },
        )
    return EXIT_OK
