"""``aviator run``'s exit code as a supervisor sees it: 0 after SIGTERM or SIGINT, 1 (and one
log line) when a task of the control plane ends on its own."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from aviator.envoy.process import free_port
from tests.admin_ready import wait_ready

# `aviator run` in a real process, its source replaced by one whose run() ends (returns, or
# raises) a moment after the control plane started: nothing else in the process is faked.
LAUNCHER = textwrap.dedent(
    """
    import asyncio, sys
    import aviator.controlplane
    from aviator.cli import main

    class EndingSource:
        name = "test:ending"

        async def run(self, store):
            await asyncio.sleep(0.2)
            if sys.argv[1] == "raises":
                raise OSError(5, "Input/output error")

    aviator.controlplane.make_source = lambda spec, **options: EndingSource()
    sys.exit(main(sys.argv[2:]))
    """
)


def _run_args() -> list[str]:
    return [
        "run", "--source", "dir:/nonexistent",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("returns", "control-plane task 'source' ended on its own"),
        ("raises", "control-plane task 'source' failed: OSError: [Errno 5] Input/output error"),
    ],
)
async def test_a_task_that_ends_on_its_own_exits_1_with_one_log_line(how: str, reason: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, how, *_run_args(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = (out + err).decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "[error" in line]
    assert len(errors) == 1, text
    assert "control plane stopping" in errors[0]
    assert "task=source" in errors[0]
    assert reason in errors[0]
    assert "control plane stopped" in text  # and it still shut down in order


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_is_a_clean_exit(sig: signal.Signals, tmp_path: Path) -> None:
    admin = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "run", "--source", f"dir:{tmp_path}",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, within_s=20)
    finally:
        proc.send_signal(sig)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "[error" not in err.decode()
