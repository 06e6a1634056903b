"""Fresh virtual environments with a package pip-installed, for the install tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Venv:
    root: Path
    pip_log: str

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            cwd=self.root,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def clean_env() -> dict[str, str]:
    """This process's environment without what would make the venv see this checkout."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }


def make_venv(where: Path, package: Path) -> Venv:
    """A fresh venv with ``package`` pip-installed (verbose, to see the build's warnings)."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    pip = subprocess.run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "-v", str(package)],
        cwd=where,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return Venv(where, pip.stdout + pip.stderr)
