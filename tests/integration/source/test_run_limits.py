"""``aviator run --max-file-size``: the directory source's size limit, as users set it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from aviator.envoy.process import free_port
from tests.admin_ready import wait_ready
from tests.unit.k8s.builders import pod_doc


async def _aviator(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_a_bad_size_is_a_one_line_error(tmp_path: Path) -> None:
    proc = await _aviator("run", "--source", f"dir:{tmp_path}", "--max-file-size", "ten")
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip().splitlines()[-1] == (
        "aviator run: --max-file-size: expected a size such as 10MiB, 500KB or 1048576, got 'ten'"
    )


async def test_a_file_above_the_limit_is_reported_and_the_rest_served(tmp_path: Path) -> None:
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(pod_doc("web-1", "10.0.0.1")))
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump_all([pod_doc(f"web-{i}", f"10.0.1.{i}") for i in range(2, 12)]))
    assert small.stat().st_size < 1000 < big.stat().st_size
    admin = free_port()
    proc = await _aviator(
        "run", "--source", f"dir:{tmp_path}", "--max-file-size", "1K",
        "--xds-address", f"127.0.0.1:{free_port()}", "--admin-address", f"127.0.0.1:{admin}",
        "--gateway-port", "0",
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, within_s=30)
            async with http.get(f"http://127.0.0.1:{admin}/debug/problems") as r:
                problems = json.loads(await r.text())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    size = big.stat().st_size
    assert problems == [
        f"{big}: file too large to read: {size:,} bytes, the limit is 1,000 "
        "bytes; split it into smaller files (or raise --max-file-size); none of its objects "
        "are served"
    ]
    assert proc.returncode == 0, err.decode()[-2000:]
