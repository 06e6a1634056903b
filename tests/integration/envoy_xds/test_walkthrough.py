"""The README's walkthrough, as a user runs it: ``aviator run`` on the example directory,
``aviator bootstrap`` for two gateways on their own ports, real Envoys, the README's wait for
the listener, then a request. What Envoy answers is what the README says it answers."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from aviator.envoy.process import EnvoyProcess, free_port
from tests.envoy_fixtures import EnvoyFactory, poll_until

pytestmark = pytest.mark.envoy

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"


def walkthrough() -> str:
    text = README.read_text()
    start = text.index("## Walkthrough: a gateway fed from a directory")
    return text[start : text.index("\n## ", start + 1)]


async def _aviator(*args: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aviator", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip


async def _bootstrap(*args: str) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "bootstrap", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    config: dict[str, object] = yaml.safe_load(out)
    return config


async def test_the_walkthrough_routes_and_envoy_answers_what_the_readme_says(
    envoy_factory: EnvoyFactory, tmp_path: Path
) -> None:
    text = walkthrough()
    # The example's pods are on loopback: the README's command allows probing them.
    assert "--admin-address 127.0.0.1:18001 --allow-probe-loopback &" in text
    # The README's wait: until Envoy's admin /listeners shows the port.
    assert "until curl -s http://127.0.0.1:9901/listeners | grep -q ':10000'" in text
    (said,) = re.findall(r"Envoy answers `503` with\s+`([^`]+)`", text)
    source = tmp_path / "web"
    shutil.copytree(ROOT / "examples" / "web", source)  # pods at 127.0.0.11-13:8080
    xds = free_port()
    proc = await _aviator(
        "run", "--source", f"dir:{source}", "--xds-address", f"127.0.0.1:{xds}",
        "--admin-address", "127.0.0.1:0", "--gateway-address", "127.0.0.1",
        "--allow-probe-loopback",  # as the README says: the example's pods are on loopback
        log=tmp_path / "aviator.log",
    )  # fmt: skip
    try:
        ports = [free_port(), free_port()]
        envoys: list[EnvoyProcess] = []
        for i, port in enumerate(ports):
            extra = ["--listen-address", "127.0.0.1"] if i else []
            config = await _bootstrap(
                "--xds", f"127.0.0.1:{xds}", "--node-id", f"gateway-{i + 1}",
                "--mode", "gateway", "--listen", str(port), "--admin", str(free_port()), *extra,
            )  # fmt: skip
            envoys.append(await envoy_factory(config))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for envoy, port in zip(envoys, ports, strict=True):

                async def has_listener(envoy: EnvoyProcess = envoy, port: int = port) -> bool:
                    async with http.get(f"{envoy.admin_url}/listeners") as response:
                        return f":{port}" in await response.text()

                await poll_until(has_listener, within=30)
                # Routed to the example's pods, where nothing listens.
                url = f"http://127.0.0.1:{port}/"
                async with http.get(url, headers={"Host": "web.shop"}) as response:
                    assert (response.status, await response.text()) == (503, said)
    finally:
        proc.terminate()
        await proc.wait()
