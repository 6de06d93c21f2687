"""The Makefile's promises, read from ``make`` itself (dry runs only: nothing is installed).

- ``make help`` lists every target, including the two-name ``train fit`` rule.
- ``make run`` installs the runtime packages (``pip install -e .``) and Debian's Fashion-MNIST
  only; ``make test`` and the tools that need them add the dev extra and the test packages.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Targets whose recipes need the dev extra or the test tools' Debian packages.
NEEDS_TEST_TOOLS = ["test", "pytest", "lint", "typecheck", "bench", "bench-serve", "soak"]
NEEDS_TEST_TOOLS += ["screenshots", "demo", "container-smoke"]
RUNTIME_ONLY = ["run", "setup", "train", "serve", "mlflow", "import", "alerts"]
# The venv running these tests: make asks its Python for settings (make mlflow's store).
TEST_VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _make(*args: str, venv: Path | None = None) -> str:
    extra = [f"VENV={venv}"] if venv is not None else []
    result = subprocess.run(
        ["make", "--no-print-directory", *args, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def _variable(name: str) -> list[str]:
    """A Makefile variable's words, as make expands it."""
    return _make("-s", "--eval", f"print-var: ; @echo $({name})", "print-var").split()


def _phony_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {name for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for name in line.split()}


def _listed_by_help() -> set[str]:
    names: set[str] = set()
    for line in _make("-s", "help").splitlines():
        # "  train fit          train the default config": names, then a gap, then the help.
        head, gap, _help = line.strip().partition("  ")
        assert gap, f"no help text after the target name: {line!r}"
        names.update(head.split())
    return names


def test_help_lists_every_target() -> None:
    phony = _phony_targets()
    assert {"train", "fit", "run", "test"} <= phony
    missing = phony - _listed_by_help()
    assert not missing, f"make help does not list {sorted(missing)}"


def _dry_run(target: str, tmp_path: Path) -> str:
    # A .venv that does not exist yet, so the dry run shows every install step; make mlflow
    # would ask that venv's Python for the store, so it is given one.
    return _make("-n", target, f"MLFLOW_STORE={tmp_path}", venv=tmp_path / "fresh-venv")


@pytest.mark.parametrize("target", RUNTIME_ONLY)
def test_runtime_targets_install_no_test_tools(target: str, tmp_path: Path) -> None:
    commands = _dry_run(target, tmp_path)
    assert "pip install -q -e .\n" in commands
    assert ".[dev]" not in commands
    for package in _variable("TEST_APT_PACKAGES"):
        assert not re.search(rf"\b{re.escape(package)}\b", commands), package
    for package in _variable("RUN_APT_PACKAGES"):
        assert package in commands


@pytest.mark.parametrize("target", NEEDS_TEST_TOOLS)
def test_test_targets_install_the_test_tools(target: str, tmp_path: Path) -> None:
    commands = _dry_run(target, tmp_path)
    assert "pip install -q -e '.[dev]'" in commands
    for package in [*_variable("TEST_APT_PACKAGES"), *_variable("RUN_APT_PACKAGES")]:
        assert package in commands, package


def test_make_monitoring_installs_only_prometheus_and_alertmanager(tmp_path: Path) -> None:
    commands = _dry_run("monitoring", tmp_path)
    monitoring = _variable("MONITORING_APT_PACKAGES")
    assert monitoring == ["prometheus", "prometheus-alertmanager"]
    assert all(package in commands for package in monitoring)
    others = set(_variable("TEST_APT_PACKAGES")) - set(monitoring)
    assert others and not [p for p in others if re.search(rf"\b{re.escape(p)}\b", commands)]
    assert ".[dev]" not in commands


def test_the_test_packages_are_not_runtime_packages() -> None:
    assert _variable("RUN_APT_PACKAGES") == ["dataset-fashion-mnist"]
    assert not set(_variable("TEST_APT_PACKAGES")) & set(_variable("RUN_APT_PACKAGES"))


def test_make_mlflow_opens_the_configured_store(tmp_path: Path) -> None:
    """``make mlflow`` reads tracking.store_dir through the settings loader, not a copy of it."""
    from train.config import load_settings

    tracking = load_settings().tracking
    printed = _make("-n", "-s", "mlflow", venv=TEST_VENV)
    (line,) = [x for x in printed.replace("\\\n", " ").splitlines() if "mlflow server" in x]
    command = shlex.split(line)
    assert command[command.index("--backend-store-uri") + 1] == tracking.embedded_uri()
    artifacts = command[command.index("--artifacts-destination") + 1]
    assert Path(artifacts) == tracking.store_path() / "artifacts"
    # `make mlflow-ui` is the same rule; an explicit MLFLOW_STORE still wins.
    assert _make("-n", "-s", "mlflow-ui", venv=TEST_VENV) == printed
    other = _make("-n", "-s", "mlflow", f"MLFLOW_STORE={tmp_path}", venv=TEST_VENV)
    assert f"sqlite:///{tmp_path}/mlflow.db" in other
