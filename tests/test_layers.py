"""The arrows of DESIGN.md §2 hold: the import-linter contracts in pyproject.toml pass.

``make lint`` runs ``lint-imports`` too; this runs it in the suite so that a wrong arrow
fails CI.  The contracts are themselves checked: a copy of the packages with one wrong import
added must break the contract that forbids it (a contract that cannot fail checks nothing).
"""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

import client

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nbdproto", "server", "client", "testbed")
#: Wall seconds one lint-imports run may take (about one on an idle machine).
LINT_TIMEOUT = 120
#: ``lint-imports``, through the interpreter that runs the tests (its script may not be on
#: PATH).
LINT_IMPORTS = (sys.executable, "-c", "from importlinter.cli import lint_imports_command as m; m()")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the pyproject.toml and packages under ``cwd``, which come first on
    the path (before the editable install's)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=LINT_TIMEOUT,
        check=False,
    )


def contracts() -> dict[str, dict[str, Any]]:
    """The contracts of pyproject.toml, by id."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        config = tomllib.load(fh)["tool"]["importlinter"]
    return {c["id"]: c for c in config["contracts"]}


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_memory_model_contract_names_every_other_module_of_the_client() -> None:
    """``mm-below-client`` lists client's other modules one by one (a contract cannot forbid
    a package's siblings by a pattern): a new module of client/ must join the list."""
    siblings = {f"client.{m.name}" for m in pkgutil.iter_modules(client.__path__)}
    # client._build: what the compiled model's copy of client/ adds (make compiled).
    assert set(contracts()["mm-below-client"]["forbidden_modules"]) == siblings - {
        "client.mm",
        "client._build",
    }


#: A wrong import, where it goes, and the contract it must break.
WRONG_ARROWS = [
    pytest.param("client/swapdev.py", "import server.config", "layers", id="client->server"),
    pytest.param("server/stores.py", "import client.config", "layers", id="server->client"),
    pytest.param("server/stores.py", "import testbed.config", "layers", id="server->testbed"),
    pytest.param(
        "client/workload.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import testbed.log",
        "layers",
        id="client->testbed-type-only",
    ),
    pytest.param("nbdproto/errors.py", "import server.config", "layers", id="protocol->server"),
    pytest.param("nbdproto/errors.py", "import trio", "protocol-sans-io", id="protocol->trio"),
    pytest.param("client/mm/waits.py", "import client.config", "mm-below-client", id="mm->client"),
    pytest.param("client/mm/zone.py", "import structlog", "mm-no-io", id="mm->structlog"),
    pytest.param("client/mm/zone.py", "import socket", "mm-no-io", id="mm->socket"),
]


@pytest.mark.parametrize(("path", "line", "contract"), WRONG_ARROWS)
def test_a_wrong_arrow_breaks_its_contract(
    tmp_path: Path, path: str, line: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / path).open("a", encoding="utf-8") as fh:
        fh.write(f"\n{line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    name = contracts()[contract]["name"]
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert name[:40] in broken, result.stdout  # the report wraps names at 80 columns
    assert "1 broken" in result.stdout, result.stdout
