#!/usr/bin/env python3
"""The model's speed: page I/Os per second of CPU, against a peer commit, in one run.

A benchmark, not a test: it prints numbers and ratios measured side by side and always
exits 0 when the runs themselves succeed.

Each run is one ``netswap run FILE --policy POLICY`` on the virtual clock (server and client
joined in memory, logging off), in a fresh subprocess whose ``PYTHONPATH`` is a source tree:
this one, or the peer's (a ``git worktree add /tmp/base538 538dcc0``; the same venv serves
both).  The subprocess reports its own CPU time (``time.process_time``: this machine is
shared, so CPU is steadier than wall time), its wall time and the machine's ``pswpout +
pswpin``: its cost per page I/O.  The trees alternate (peer, this, this, peer, ...) and each
figure is the median of ``--rounds``.

Both trees run the same scenario file.  A key the peer's config does not know yet is
removed from the peer's copy (the line is dropped, and the script says which); so is one
this tree does not know.

``--large FILE`` runs a second scenario (``bench/configs/model-1g.toml``: 1 GiB of RAM,
hogs of 2x RAM, swap large enough) and prints the cost per page I/O there over the cost in
the first, for each tree: how the model scales with modelled RAM.

Usage::

    .venv/bin/python bench/model_speed.py [--peer /tmp/base538] [--scenario FILE]
        [--policy reserve] [--rounds 3] [--large bench/configs/model-1g.toml]
        [--large-rounds 1] [--json FILE] [--profile OUT.prof] [--compiled .build/compiled]

``--compiled DIR`` adds a third column, "compiled": this tree with its ``client`` imported
from ``DIR``, a build of ``make compiled`` (bench/compile_model.py) from this tree.

``--profile`` runs the scenario once under cProfile in this tree (no timing) and writes the
stats; ``python -m pstats OUT.prof`` reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent

# The subprocess: one run on the virtual clock, logging off, its numbers as JSON.  It uses
# only names both trees have (load_scenario, run_scenario, MockClock).
WORKER = r"""
import json, logging, sys, time
import structlog, trio, trio.testing
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
from testbed.config import load_scenario
from testbed.scenario import run_scenario
scenario = load_scenario(sys.argv[1], {})
policy = sys.argv[2]
profile = sys.argv[3] if len(sys.argv) > 3 else ""
if profile:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
wall, cpu = time.perf_counter(), time.process_time()
summary = trio.run(
    lambda: run_scenario(scenario, policy=policy, transport="memory"),
    clock=trio.testing.MockClock(autojump_threshold=0),
)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
if profile:
    prof.disable()
    prof.dump_stats(profile)
if not isinstance(summary, dict):  # a typed RunSummary (since issue I §3); peers: a dict
    from client.summary import unstructure_summary
    summary = unstructure_summary(summary)
vm = summary["vmstat"]
print(json.dumps({
    "outcome": summary["outcome"], "duration": summary["duration"],
    "pswpout": vm["pswpout"], "pswpin": vm["pswpin"], "cpu": cpu, "wall": wall,
}))
"""

_EXTRA = re.compile(r"extra fields found \(([^)]*)\)")


def _commit(tree: Path) -> str:
    out = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "?"


#: ``--compiled DIR``: runs labelled "compiled" import this tree's ``client`` from DIR.
_PYTHONPATH: dict[Path, str] = {}


def _run(tree: Path, scenario: Path, policy: str, profile: str = "") -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": _PYTHONPATH.get(tree, str(tree)), "PYTHONHASHSEED": "0"}
    # -P: not the working directory first on sys.path, where the tree's own client/ would
    # hide a compiled one.
    args = [sys.executable, "-P", "-c", WORKER, str(scenario), policy]
    if profile:
        args.append(profile)
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["io"] = result["pswpout"] + result["pswpin"]
    return result


def _scenario_for(tree: Path, scenario: Path, policy: str, workdir: Path) -> tuple[Path, list[str]]:
    """``scenario``, or a copy without the keys ``tree``'s config rejects (and which)."""
    dropped: list[str] = []
    text = scenario.read_text()
    for _ in range(10):
        path = workdir / f"{tree.name}-{scenario.name}"
        path.write_text(text)
        env = {**os.environ, "PYTHONPATH": str(tree)}
        check = subprocess.run(
            [sys.executable, "-c", "import sys; from testbed.config import load_scenario; "
             "load_scenario(sys.argv[1], {})", str(path)],
            cwd=tree, env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        keys = [k.strip() for m in _EXTRA.finditer(check.stderr) for k in m.group(1).split(",")]
        if check.returncode == 0 or not keys:
            return (path if dropped else scenario), dropped
        for key in keys:
            text = re.sub(rf"(?m)^\s*{re.escape(key)}\s*=.*\n", "", text)
            dropped.append(key)
    raise RuntimeError(f"{scenario}: cannot make it loadable for {tree}")


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def bench(
    trees: dict[str, Path], scenario: Path, policy: str, rounds: int, workdir: Path
) -> dict[str, list[dict[str, Any]]]:
    files = {}
    for label, tree in trees.items():
        files[label], dropped = _scenario_for(tree, scenario, policy, workdir)
        if dropped:
            print(f"  {label}: {scenario.name} without {', '.join(dropped)} (unknown to it)")
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    order = list(trees)
    for i in range(rounds):
        for label in order if i % 2 == 0 else reversed(order):
            r = _run(trees[label], files[label], policy)
            results[label].append(r)
            print(
                f"  round {i + 1} {label:>5}: {r['outcome']} {r['io']:,} page I/Os,"
                f" {r['cpu']:.1f} s CPU, {r['wall']:.1f} s wall,"
                f" {1e6 * r['cpu'] / r['io']:.1f} µs CPU each",
                flush=True,
            )
    return results


def table(results: dict[str, list[dict[str, Any]]], trees: dict[str, Path], what: str) -> str:
    lines = [
        f"| {what} | commit | outcome | page I/Os | CPU s | wall s | µs CPU per page I/O |"
        " page I/Os per CPU s | per wall s |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for label, runs in results.items():
        io = _median(runs, "io")
        cpu, wall = _median(runs, "cpu"), _median(runs, "wall")
        per = statistics.median(r["cpu"] / r["io"] for r in runs)
        outcomes = ",".join(sorted({r["outcome"] for r in runs}))
        lines.append(
            f"| {label} | {_commit(trees[label])} | {outcomes} | {io:,.0f} | {cpu:.1f} |"
            f" {wall:.1f} | {1e6 * per:.1f} | {1 / per:,.0f} |"
            f" {statistics.median(r['io'] / r['wall'] for r in runs):,.0f} |"
        )
    return "\n".join(lines)


def throughput(runs: list[dict[str, Any]], key: str) -> float:
    """Median page I/Os per second of ``key`` (cpu or wall)."""
    return statistics.median(r["io"] / r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", type=Path, default=Path("/tmp/base538"))
    parser.add_argument("--scenario", type=Path, default=HERE / "configs/swap-over-nbd.toml")
    parser.add_argument("--policy", default="reserve")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=Path, default=None)
    parser.add_argument("--large-rounds", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", default="")
    parser.add_argument("--compiled", type=Path, default=None)
    args = parser.parse_args()
    if args.profile:
        r = _run(HERE, args.scenario.resolve(), args.policy, profile=args.profile)
        print(f"profile of {r['io']:,} page I/Os written to {args.profile}")
        return 0
    trees = {"peer": args.peer.resolve(), "this": HERE}
    if args.compiled is not None:
        # The same tree, its client/ from the compiled build: a path of its own (a symlink
        # to this tree) so that the runs can tell the two apart.
        link = Path(tempfile.mkdtemp()) / "compiled"
        link.symlink_to(HERE)
        trees["compiled"] = link
        _PYTHONPATH[link] = f"{args.compiled.resolve()}{os.pathsep}{HERE}"
        check = subprocess.run(
            [sys.executable, "-P", "-c", "import testbed.compiled as c; assert c.check(), 'none'"],
            env={**os.environ, "PYTHONPATH": _PYTHONPATH[link]},
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            print(f"--compiled {args.compiled}: {check.stderr.strip().splitlines()[-1]}")
            return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"{started}: {args.scenario.name} --policy {args.policy}, {args.rounds} rounds,"
        f" this tree {_commit(HERE)} vs peer {_commit(trees['peer'])} ({trees['peer']})"
    )
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        small = bench(trees, args.scenario.resolve(), args.policy, args.rounds, workdir)
        out["small"] = small
        print()
        print(table(small, trees, args.scenario.name))
        print()
        pairs = [("this", "peer")] + (
            [("compiled", "peer"), ("compiled", "this")] if "compiled" in trees else []
        )
        for key in ("cpu", "wall"):
            for a, b in pairs:
                ratio = throughput(small[a], key) / throughput(small[b], key)
                target = " (target >= 2)" if b == "peer" else ""
                print(f"page I/O throughput per {key} second, {a}/{b}: {ratio:.2f}x{target}")
        if args.large is not None:
            large = bench(trees, args.large.resolve(), args.policy, args.large_rounds, workdir)
            out["large"] = large
            print()
            print(table(large, trees, args.large.name))
            print()
            for label in trees:
                cost_small = statistics.median(r["cpu"] / r["io"] for r in small[label])
                cost_large = statistics.median(r["cpu"] / r["io"] for r in large[label])
                print(
                    f"{label}: CPU per page I/O, {args.large.name} / {args.scenario.name}:"
                    f" {cost_large / cost_small:.2f}x (target <= 1.25)"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
