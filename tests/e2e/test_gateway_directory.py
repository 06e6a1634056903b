"""End to end: a directory source, the control plane, a real Envoy gateway, real backends.

The issue's promises, checked from Envoy's side and from real requests:
- pods of different latencies → within three ping intervals of traffic at least 80% of the
  requests for ``Host: web.shop`` go to the fast half, and no request fails;
- deleting a pod from the YAML removes it from Envoy within two seconds;
- an invalid policy next to a valid one is reported and the valid one keeps working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.bootstrap import render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.testbed.backend import BACKEND_HEADER, BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.profile import Profile
from aviator.xds.resources import GatewayConfig

pytestmark = pytest.mark.envoy

PING_INTERVAL_S = 0.3
FAST = {"fast-a": "127.0.0.21", "fast-b": "127.0.0.22"}
SLOW = {"slow-a": "127.0.0.23", "slow-b": "127.0.0.24"}
CLUSTER = "shop/web"


def _pod(name: str, ip: str, port: int) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": "web"}},
        "spec": {
            "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": port}]}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _deployment(name: str, port: int) -> dict[str, object]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "ports": [{"containerPort": port}]}]},
            },
        },
    }


def _policy(name: str, target: str, ping_interval: str) -> dict[str, object]:
    return {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "latencyThreshold": "50ms",
            "pingInterval": ping_interval,
        },
    }


def _write(path: Path, *docs: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(path)  # atomic: the source never reads a half-written file


@dataclass
class Traffic:
    """Requests sent at a steady rate through the gateway, each recorded as it completes."""

    url: str
    host: str
    rate: float
    records: list[tuple[float, str, int]] = field(default_factory=list)  # (sent, backend, status)

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as http:
            pending: set[asyncio.Task[None]] = set()
            while not stop.is_set():
                task = asyncio.create_task(self._one(http))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(1 / self.rate)
            await asyncio.gather(*pending)

    async def _one(self, http: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            async with http.get(self.url, headers={"Host": self.host}) as r:
                await r.read()
                self.records.append((sent, r.headers.get(BACKEND_HEADER, "-"), r.status))
        except aiohttp.ClientError as exc:
            self.records.append((sent, f"error: {exc!r}", 0))

    def since(self, t: float) -> list[tuple[float, str, int]]:
        return [r for r in self.records if r[0] >= t]


@dataclass
class Stack:
    root: Path
    port: int
    control_plane: ControlPlane
    envoy: EnvoyProcess
    gateway_url: str


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    port = free_port(FAST["fast-a"])
    backends = [
        BackendSpec(name, host=ip, port=port, profile=Profile.constant(0.002, capacity=32))
        for name, ip in FAST.items()
    ] + [
        BackendSpec(name, host=ip, port=port, profile=Profile.constant(0.150, capacity=32))
        for name, ip in SLOW.items()
    ]
    root = tmp_path / "source"
    root.mkdir()
    _write(root / "web.yaml", _deployment("web", port), _policy("web", "web", "300ms"))
    _write(root / "pods.yaml", *(_pod(n, ip, port) for n, ip in {**FAST, **SLOW}.items()))
    gateway_port = free_port()
    settings = Settings(
        source=f"dir:{root}",
        xds_address="127.0.0.1:0",
        admin_address="127.0.0.1:0",
        gateway=GatewayConfig(address="127.0.0.1", port=gateway_port),
        allow_probe_loopback=True,  # the fleet's pods are on 127.0.0.x
    )
    async with Fleet(FleetSpec(backends=tuple(backends))):
        control_plane = ControlPlane(settings)
        started = asyncio.Event()
        task = asyncio.create_task(control_plane.run(started=started))
        await started.wait()
        assert control_plane.xds_port is not None
        bootstrap = render_bootstrap(
            xds_host="127.0.0.1",
            xds_port=control_plane.xds_port,
            node_id="e2e-gateway",
            listen_port=gateway_port,
            admin_port=0,
        )
        try:
            async with EnvoyProcess(bootstrap) as envoy:
                # LIVE: the listener is warmed (its routes arrived); the clusters' hosts can
                # show in /clusters before it, and traffic sent then is refused.
                await asyncio.wait_for(envoy.wait_live(), 30)
                yield Stack(root, port, control_plane, envoy, f"http://127.0.0.1:{gateway_port}/")
        finally:
            control_plane.stop()
            await task


async def _hosts(envoy: EnvoyProcess) -> set[str]:
    return {h.address for h in await envoy.admin.clusters() if h.cluster == CLUSTER}


async def _wait_for(envoy: EnvoyProcess, want: set[str], within: float) -> float:
    """Seconds until Envoy's cluster holds exactly ``want``; fails after ``within`` seconds."""
    start = time.monotonic()
    while (held := await _hosts(envoy)) != want:
        if time.monotonic() - start > within:
            pytest.fail(f"after {within}s Envoy holds {sorted(held)}, want {sorted(want)}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_traffic_goes_to_the_fast_half_and_pods_leave_with_their_yaml(stack: Stack) -> None:
    all_hosts = {f"{ip}:{stack.port}" for ip in {**FAST, **SLOW}.values()}
    await _wait_for(stack.envoy, all_hosts, within=10)

    traffic = Traffic(stack.gateway_url, "web.shop", rate=80)
    stop = asyncio.Event()
    load = asyncio.create_task(traffic.run(stop))
    t0 = time.monotonic()
    # The slow pods show their latency only once traffic reaches them (their agents report
    # the latency of recent requests), so the clock starts with the traffic.
    await asyncio.sleep(3 * PING_INTERVAL_S)
    measured_from = time.monotonic()
    await asyncio.sleep(2.0)

    # A pod deleted from the YAML leaves Envoy within two seconds.
    gone = SLOW["slow-b"]
    _write(
        stack.root / "pods.yaml",
        *(_pod(n, ip, stack.port) for n, ip in {**FAST, **SLOW}.items() if ip != gone),
    )
    took = await _wait_for(stack.envoy, all_hosts - {f"{gone}:{stack.port}"}, within=2.0)
    print(f"pod removal reached Envoy in {took * 1000:.0f} ms")
    stop.set()
    await load

    window = [r for r in traffic.since(measured_from) if r[0] < measured_from + 2.0]
    fast = sum(1 for _, backend, _ in window if backend in FAST)
    print(f"after 3 ping intervals: {fast}/{len(window)} requests to the fast half")
    assert len(window) > 50
    assert fast / len(window) >= 0.8
    failed = [r for r in traffic.records if r[2] != 200]
    assert failed == [], f"{len(failed)} failed requests, e.g. {failed[:3]}"
    assert t0 < measured_from


async def test_an_invalid_policy_is_reported_and_the_valid_one_keeps_working(
    stack: Stack,
) -> None:
    all_hosts = {f"{ip}:{stack.port}" for ip in {**FAST, **SLOW}.values()}
    await _wait_for(stack.envoy, all_hosts, within=10)
    bad = _policy("api", "api", "fast")  # not a duration
    bad["spec"]["weigher"] = {"maxWeightRatio": 0}  # type: ignore[index]
    _write(stack.root / "api.yaml", _deployment("api", stack.port), bad)

    deadline = time.monotonic() + 5
    while True:
        views = {p["policy"]: p for p in stack.control_plane.policies_view()}
        if "AviatorPolicy shop/api" in views:
            break
        assert time.monotonic() < deadline, "the invalid policy was never reported"
        await asyncio.sleep(0.05)
    api = views["AviatorPolicy shop/api"]
    assert not api["serving"]
    accepted = next(c for c in api["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False"
    assert "spec.pingInterval" in accepted["message"]
    assert "spec.weigher.maxWeightRatio" in accepted["message"]
    assert views["AviatorPolicy shop/web"]["serving"]

    # The valid policy keeps serving: Envoy still holds its hosts and requests succeed.
    assert await _hosts(stack.envoy) == all_hosts
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            async with http.get(stack.gateway_url, headers={"Host": "web.shop"}) as r:
                assert r.status == 200
    stats = await stack.envoy.admin.stats()
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert stats["listener_manager.lds.update_rejected"] == 0
