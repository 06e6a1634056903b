"""``aviator run`` as users start it: a real process, its admin endpoint, signals, bad flags."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from aviator.envoy.process import free_port
from tests.admin_ready import wait_ready

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "web"


async def _aviator(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "nowhere"], "--source must be dir:PATH"),
        (["--source", "dir:/does/not/exist"], "is not a directory"),
        (["--source", f"dir:{EXAMPLES}", "--xds-address", "localhost"], "expected HOST:PORT"),
    ],
)
async def test_bad_flags_are_one_line_errors(args: list[str], message: str) -> None:
    proc = await _aviator("run", *args)
    _, err = await proc.communicate()
    assert proc.returncode == 2
    text = err.decode()
    assert message in text
    assert "Traceback" not in text


async def test_serves_the_example_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    source = tmp_path / "web"
    shutil.copytree(EXAMPLES, source)
    admin = free_port()
    proc = await _aviator(
        "run", "--source", f"dir:{source}",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, within_s=10)
            async with http.get(f"http://127.0.0.1:{admin}/debug/policies") as r:
                policies = json.loads(await r.text())
            async with http.get(f"http://127.0.0.1:{admin}/debug/endpoints") as r:
                endpoints = json.loads(await r.text())
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics = await r.text()
        assert [p["policy"] for p in policies] == ["AviatorPolicy shop/web"]
        assert policies[0]["serving"] is True
        assert sorted(e["address"] for e in endpoints) == [
            "127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080",
        ]  # fmt: skip
        assert 'aviator_policies{serving="true"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "control plane stopped" in err.decode()
