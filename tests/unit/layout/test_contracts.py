"""The layout's import contracts (pyproject.toml, [tool.importlinter]) hold on this tree and
fail on a deliberate bad import, and the pure modules read no wall clock."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

PURE_CONTRACT = "Pure modules import no I/O library and read no clock"


def _pure_modules() -> list[Path]:
    """The files of the pure contract's source modules (pyproject.toml is the one list)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = (
        c for c in config["tool"]["importlinter"]["contracts"] if c["name"] == PURE_CONTRACT
    )
    files: list[Path] = []
    for module in contract["source_modules"]:
        # The agent's package lives in its own distribution's tree (agent/src).
        top = ROOT / "agent" / "src" if module.split(".")[0] == "aviator_agent" else ROOT
        path = top.joinpath(*module.split("."))
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")])
    return files


CLOCK_CALLS = {"now", "utcnow", "today", "monotonic", "time", "perf_counter", "time_ns"}


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(tree / "pyproject.toml")],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def copy_of_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "aviator", tree / "aviator", ignore=ignore)
    # The agent's package (its own distribution, agent/) is the contracts' second root.
    shutil.copytree(ROOT / "agent/src/aviator_agent", tree / "aviator_agent", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contracts_hold_on_this_tree(copy_of_tree: Path) -> None:
    result = _lint(copy_of_tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("aviator/k8s/_bad.py", "import time\n", "Pure modules import no I/O library"),
        ("aviator/xds/_bad.py", "import aviator.k8s.policy\n", "Layers"),
        ("aviator/controlplane_bad.py", "import aviator.testbed.backend\n", "Production code"),
        ("aviator/xds/_bad.py", "import kubernetes\n", "Only the Kubernetes source"),
        ("aviator_agent/_bad.py", "import aviator.model\n", "The agent imports nothing"),
        ("aviator_agent/_bad.py", "import grpc\n", "The agent imports nothing"),
        ("aviator_agent/tracker_bad.py", "import aiohttp\n", "Only the agent's aiohttp"),
    ],
)
def test_a_bad_import_breaks_its_contract(
    copy_of_tree: Path, module: str, line: str, contract: str
) -> None:
    bad = copy_of_tree / module
    # Contracts that name modules (not packages): put the bad import inside one of them.
    named = {
        "aviator/controlplane_bad.py": "aviator/controlplane.py",
        "aviator_agent/tracker_bad.py": "aviator_agent/tracker.py",
    }
    if module in named:
        bad = copy_of_tree / named[module]
        original = bad.read_text()
        bad.write_text(original + "\n" + line)
    else:
        original = None
        bad.write_text(line)
    try:
        result = _lint(copy_of_tree)
    finally:
        if original is None:
            bad.unlink()
        else:
            bad.write_text(original)
    assert result.returncode != 0
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken) or contract in result.stdout.split("Broken")[-1]


def _clock_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CLOCK_CALLS
        ):
            found.append(f"{path}:{node.lineno}: .{node.func.attr}()")
    return found


def test_pure_modules_read_no_clock() -> None:
    files = _pure_modules()
    assert ROOT / "aviator/k8s/resolve.py" in files
    assert ROOT / "agent/src/aviator_agent/orca.py" in files
    assert all(f.is_file() for f in files)
    calls = [c for f in files for c in _clock_calls(f)]
    assert calls == []


def test_the_clock_scan_sees_a_clock_read(tmp_path: Path) -> None:
    bad = tmp_path / "clock.py"
    bad.write_text("import datetime\nNOW = datetime.datetime.now()\n")
    assert _clock_calls(bad) == [f"{bad}:2: .now()"]
