"""The compiled model (``make compiled``, bench/compile_model.py) is the same model.

Built here from this checkout, it gives the same run summary as plain Python, field for
field but the wall time, for a run that deadlocks and one that completes; and ``netswap``
refuses it once its sources change.  Building takes one to two minutes (mypyc, then gcc).
Without a C compiler or Python's headers the build tests skip locally and fail in CI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

from tests.processes import netswap

HERE = Path(__file__).resolve().parent.parent
SCENARIO = str(HERE / "configs/swap-over-nbd.toml")


def _compile_model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compile_model", HERE / "bench/compile_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _require_compiler() -> None:
    missing = []
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        missing.append("a C compiler (Debian: gcc)")
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        missing.append("Python's headers (Debian: python3-dev)")
    if missing:
        message = f"the compiled model needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must build it")
        pytest.skip(message)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_compiler()
    out = tmp_path_factory.mktemp("compiled") / "model"
    done = subprocess.run(
        [sys.executable, str(HERE / "bench/compile_model.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    return env


def _summary(env: dict[str, str], policy: str, path: Path) -> tuple[int, dict[str, object]]:
    done = netswap(
        "run", SCENARIO, "--policy", policy, "--log-level", "warning", "--summary", str(path),
        env=env, timeout=600,
    )  # fmt: skip
    summary = json.loads(path.read_text())
    summary.pop("wall_seconds")
    return done.returncode, summary


def test_the_copy_spells_attrs_the_classic_way_with_the_same_settings() -> None:
    rewrite = _compile_model().classic_attrs
    source = (
        "import attrs\n\n\n"
        "@attrs.define\nclass A:\n    x: list[int] = attrs.field(factory=list)\n\n\n"
        "@attrs.frozen\nclass B:\n    y: int = 0\n\n\n"
        "@attrs.define(eq=False, repr=False)\nclass C:\n    z: int = attrs.field(default=1)\n"
    )
    out = rewrite(source, "x.py")
    same = "auto_attribs=True, auto_detect=True, collect_by_mro=True, order=False"
    assert out.splitlines()[:2] == ["import attr", "import attrs"]
    assert f"@attr.s({same})\nclass A:\n    x: list[int] = attr.ib(factory=list)\n" in out
    assert f"@attr.s({same}, hash=True)\nclass B:\n" in out
    assert (
        f"@attr.s({same}, eq=False, repr=False)\nclass C:\n    z: int = attr.ib(default=1)" in out
    )
    # The rewritten classes compare, hash and print as the originals do.
    namespace: dict[str, object] = {}
    exec(compile(out, "x.py", "exec"), namespace)
    a, b, c = namespace["A"], namespace["B"], namespace["C"]
    assert a() == a() and a().x is not a().x and repr(a()) == "A(x=[])"  # type: ignore[operator]
    assert b() == b() and {b(): 1}[b()] == 1 and repr(b()) == "B(y=0)"  # type: ignore[operator]
    assert c() != c() and c().z == 1  # type: ignore[operator]


def test_an_attrs_spelling_it_cannot_rewrite_stops_the_build() -> None:
    rewrite = _compile_model().classic_attrs
    with pytest.raises(SystemExit, match=r"x\.py: cannot rewrite '@attrs.mutable'"):
        rewrite("import attrs\n\n\n@attrs.mutable\nclass A:\n    x: int = 0\n", "x.py")


@pytest.mark.timeout(1800)
def test_the_compiled_model_runs_the_same_model(compiled: Path, tmp_path: Path) -> None:
    env = _env(compiled, HERE)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import client.net.socket as s, testbed.compiled as c; "
            "print(s.__file__); print(c.check().digest)",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, digest = probe.stdout.split()
    assert module_file.startswith(str(compiled)) and module_file.endswith(".so")
    from testbed.compiled import source_digest

    assert digest == source_digest(HERE / "client")

    plain = _env(HERE)
    for policy, expected in (("none", "deadlock"), ("pfmemalloc", "completed")):
        code, summary = _summary(plain, policy, tmp_path / f"{policy}.py.json")
        compiled_code, compiled_summary = _summary(env, policy, tmp_path / f"{policy}.so.json")
        assert summary["outcome"] == expected  # both outcomes are compared
        assert (compiled_code, compiled_summary) == (code, summary)


@pytest.mark.timeout(1800)
def test_a_stale_compiled_model_is_refused(compiled: Path, tmp_path: Path) -> None:
    source = tmp_path / "src" / "client"
    shutil.copytree(HERE / "client", source, ignore=shutil.ignore_patterns("__pycache__"))
    model = tmp_path / "model"
    shutil.copytree(compiled, model)
    build = model / "client" / "_build.py"
    build.write_text(build.read_text().replace(repr(str(HERE / "client")), repr(str(source))))
    env = _env(model, HERE)
    with (source / "mm" / "alloc.py").open("a") as f:
        f.write("# changed after the build\n")
    done = netswap("run", SCENARIO, "--policy", "none", env=env)
    assert done.returncode == 2
    assert "is stale" in done.stderr and str(source) in done.stderr
    assert "make compiled" in done.stderr
    shutil.rmtree(source)
    done = netswap("run", SCENARIO, "--policy", "none", env=env)
    assert done.returncode == 2 and "which is gone" in done.stderr
