"""``aviator run --source kubernetes`` with bad flags or credentials: one line, exit 2, no
traceback (a real process, as users start it; no API server needed)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest


async def _aviator_run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "run", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kubeconfig", "/does/not/exist"], "--kubeconfig /does/not/exist: no such file"),
        ([], "not running in a cluster"),
        (["--namespace", "Not_A_Namespace"], "--namespace 'Not_A_Namespace'"),
    ],
)
async def test_aviator_run_reports_bad_kubernetes_flags_in_one_line(
    args: list[str], message: str
) -> None:
    code, err = await _aviator_run("--source", "kubernetes", *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


async def test_kubernetes_flags_need_the_kubernetes_source(tmp_path: Path) -> None:
    code, err = await _aviator_run("--source", f"dir:{tmp_path}", "--namespace", "shop")
    assert code == 2
    assert "need --source kubernetes" in err
