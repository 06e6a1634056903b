"""``aviator run``'s doors (issue 14): admin and xDS on loopback unless told, ``/debug/*``
off with ``--no-debug-views``, and no token in any log line or view.

Real processes: ``aviator run`` on the example directory, its admin port over HTTP, and a
real gRPC client on its xDS port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from aviator.cli import run as run_cli
from aviator.envoy.process import free_port
from aviator.model import parse_host_port
from aviator.xds import resources as r
from tests.admin_ready import wait_ready

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "web"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.SECRET-TOKEN-b3f1c2d9e8a7"


def test_admin_and_xds_listen_on_loopback_unless_told() -> None:
    parser = argparse.ArgumentParser()
    run_cli.configure(parser)
    settings = run_cli.settings_from(parser.parse_args(["--source", f"dir:{EXAMPLES}"]))
    assert parse_host_port(settings.admin_address, any_port=True)[0] == "127.0.0.1"
    assert parse_host_port(settings.xds_address, any_port=True)[0] == "127.0.0.1"
    assert settings.debug_views is True
    assert settings.allow_probe_loopback is False
    off = run_cli.settings_from(
        parser.parse_args(["--source", f"dir:{EXAMPLES}", "--no-debug-views"])
    )
    assert off.debug_views is False


class Run:
    def __init__(self, proc: asyncio.subprocess.Process, admin: int, xds: int) -> None:
        self.proc, self.admin, self.xds = proc, admin, xds
        self.output = ""


@pytest.fixture
async def started(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Run]:
    source = tmp_path / "web"
    shutil.copytree(EXAMPLES, source)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        f"users: [{{name: u, user: {{token: '{TOKEN}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBE_TOKEN": TOKEN}
    admin, xds = free_port(), free_port()
    extra: list[str] = getattr(request, "param", [])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "--log-level", "debug", "run",
        "--source", f"dir:{source}", "--xds-address", f"127.0.0.1:{xds}",
        "--admin-address", f"127.0.0.1:{admin}", "--allow-probe-loopback", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    run = Run(proc, admin, xds)
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, admin, within_s=20)
        yield run
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        run.output = out.decode(errors="replace")


async def _get(admin: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{admin}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def test_no_token_in_any_log_line_or_view(started: Run) -> None:
    seen = []
    for path in ("/", "/metrics", "/debug/policies", "/debug/endpoints", "/debug/problems"):
        status, body = await _get(started.admin, path)
        assert status == 200, path
        seen.append(body)
    # An xDS stream too, so the ADS server's log lines are among those scanned.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{started.xds}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "n"}))
        async with asyncio.timeout(10):
            assert (await call.read()).type_url == r.CLUSTER_TYPE
        call.cancel()
    status, proxies = await _get(started.admin, "/debug/proxies")
    seen.append(proxies)
    started.proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.wait_for(started.proc.communicate(), 20)
    output = out.decode(errors="replace")
    assert started.proc.returncode == 0, output[-2000:]
    assert "control plane stopped" in output
    assert "ADS stream opened" in output  # debug logging was on: there was much to scan
    assert TOKEN not in output
    assert "SECRET-TOKEN" not in output
    for body in seen:
        assert "SECRET-TOKEN" not in body


@pytest.mark.parametrize("started", [["--no-debug-views"]], indirect=True)
async def test_no_debug_views_leaves_health_and_metrics(started: Run) -> None:
    assert await _get(started.admin, "/healthz") == (200, "ok\n")
    assert (await _get(started.admin, "/readyz"))[0] == 200
    status, metrics = await _get(started.admin, "/metrics")
    assert status == 200
    assert "aviator_policies" in metrics
    for view in ("policies", "endpoints", "proxies", "problems"):
        assert (await _get(started.admin, f"/debug/{view}"))[0] == 404
    status, index = await _get(started.admin, "/")
    assert json.loads(index) == {"endpoints": ["/healthz", "/readyz", "/metrics"]}


async def test_the_kubernetes_source_error_quotes_no_token() -> None:
    """The one path that reads the Kubernetes configuration today: a one-line error."""
    env = {**os.environ, "KUBE_TOKEN": TOKEN}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "--log-level", "debug", "run", "--source", "kubernetes",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert "SECRET-TOKEN" not in (out + err).decode(errors="replace")
