#!/usr/bin/env python3
"""Build the compiled model: ``client/`` with its per-fault and per-packet modules compiled
by mypyc, for sweeps and long runs.  ``make compiled`` runs this.

The result is a directory (``.build/compiled`` by default) holding a copy of ``client/``; a
process uses it when that directory comes first on ``PYTHONPATH``::

    make compiled
    PYTHONPATH=.build/compiled .venv/bin/netswap sweep FILE --out DIR

It is the same model: the same sources, compiled.  A run gives the same summary, counter
for counter, as the plain Python one (``tests/test_compiled.py`` builds it and compares),
in about two thirds of the CPU time (docs/benchmarks.md).  ``netswap`` refuses a build
whose sources have changed since (``testbed/compiled.py``).

What the copy changes before compiling, and why:

* attrs classes: mypyc knows attrs by its classic names only, so in the compiled modules
  ``@attrs.define`` / ``@attrs.frozen`` become ``@attr.s(...)`` with their settings
  (``auto_attribs``, ``auto_detect``, ``collect_by_mro``, no ordering) and ``attrs.field(``
  becomes ``attr.ib(`` (the same function under its older name).  Two settings cannot
  carry over: ``slots`` (attrs would build a new class, and the compiled one keeps neither
  its ``__eq__`` nor its ``__repr__``) and ``frozen`` (attrs' frozen ``__init__`` writes
  through ``__dict__``, which a compiled class has none of).  A compiled class has a fixed
  layout anyway, and an ``attrs.frozen`` class keeps its hash by value (``hash=True``);
  that nothing assigns to a frozen instance, the plain Python runs of the tests check.
  Every other line is the source's.
* ``client/_build.py`` is added: the source tree and a digest of its Python files.

Modules left as Python (see ``INTERPRETED``) are copied as they are.  The build needs a C
compiler and Python's headers (Debian: ``gcc``, ``python3-dev``); it takes 1-2 minutes.

Usage::

    .venv/bin/python bench/compile_model.py [--out .build/compiled]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.compiled import source_digest  # noqa: E402

#: Where the model's own code spends its time: every module of the memory manager and the
#: network stack, the hogs, the NBD client and its lock, but for these.
COMPILED_GLOBS = ("client/mm/*.py", "client/net/*.py", "client/workload.py")
COMPILED_EXTRA = ("client/nbd_client.py", "client/sync.py")
INTERPRETED = {
    "client/mm/facts.py": "facts derive from the interpreted Fact base, which attrs "
    "cannot extend from compiled code",
    "client/net/facts.py": "as client/mm/facts.py",
    "client/mm/page.py": "Page names Zone and Process in its fields, and both modules "
    "import page.py: a cycle mypyc cannot set up",
    "client/mm/process.py": "as page.py (Process names Page)",
    "client/mm/policy.py": "the policies (client/policy/) derive from NullPolicy, and "
    "an interpreted class cannot derive from a compiled one",
    "client/mm/testing.py": "test helpers",
}

_DEFINE = re.compile(r"^(\s*)@attrs\.(define|frozen)(?:\((.*)\))?\s*$")
_SAME_AS_DEFINE = "auto_attribs=True, auto_detect=True, collect_by_mro=True, order=False"


def compiled_modules() -> list[str]:
    """The files to compile, relative to the checkout."""
    found: set[str] = set(COMPILED_EXTRA)
    for pattern in COMPILED_GLOBS:
        found.update(str(p.relative_to(HERE)) for p in HERE.glob(pattern))
    return sorted(f for f in found if not f.endswith("__init__.py") and f not in INTERPRETED)


def classic_attrs(source: str, name: str) -> str:
    """``source`` with attrs' new names (``attrs.define``, ``attrs.frozen``,
    ``attrs.field``) spelt the classic way mypyc recognises, settings unchanged."""
    lines = []
    for line in source.splitlines(keepends=True):
        m = _DEFINE.match(line)
        if m:
            indent, kind, args = m.groups()
            settings = _SAME_AS_DEFINE
            if kind == "frozen" and "eq=False" not in (args or ""):
                settings += ", hash=True"  # frozen's hash by value
            if args:
                settings += ", " + args
            line = f"{indent}@attr.s({settings})\n"
        lines.append(line.replace("attrs.field(", "attr.ib("))
    out = "".join(lines)
    if out != source and not re.search(r"^import attr$", out, re.M):
        out, n = re.subn(r"^import attrs$", "import attr\nimport attrs", out, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"compile_model: {name}: uses attrs without `import attrs`")
    left = re.search(r"@attrs\.(define|frozen|mutable)|attrs\.field\(", out)
    if left:
        raise SystemExit(f"compile_model: {name}: cannot rewrite {left.group(0)!r} for mypyc")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / ".build" / "compiled")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None:
        print("compile_model: no C compiler (install gcc and python3-dev)", file=sys.stderr)
        return 1

    modules = compiled_modules()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(
        HERE / "client",
        stage / "client",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "_build.py"),
    )
    digest = source_digest(stage / "client")
    for name in modules:
        path = stage / name
        path.write_text(classic_attrs(path.read_text(), name))
    (stage / "client" / "_build.py").write_text(
        '"""Written by bench/compile_model.py: this copy of client/ is compiled."""\n\n'
        f"SOURCE = {str(HERE / 'client')!r}\n"
        f"DIGEST = {digest!r}\n"
    )
    # mypy reads its settings from the directory it runs in; the stage has its own.
    (stage / "mypy.ini").write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"
    )
    script = (
        "from setuptools import setup\n"
        "from mypyc.build import mypycify\n"
        f"setup(name='netswap-compiled-model', ext_modules=mypycify({modules!r}, "
        "opt_level='3'), script_args=['build_ext', '--inplace'])\n"
    )
    print(f"compile_model: compiling {len(modules)} modules with mypyc into {out} ...", flush=True)
    started = time.monotonic()
    log = stage / "build.log"
    with log.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=stage, stdout=sink, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        print(f"compile_model: the build failed; its log is {log}", file=sys.stderr)
        return 1
    for leftover in ("build", ".mypy_cache", "mypy.ini", "build.log"):
        target = stage / leftover
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(
        f"compile_model: done in {time.monotonic() - started:.0f} s; use it with "
        f"PYTHONPATH={os.path.relpath(out)} (source digest {digest})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
