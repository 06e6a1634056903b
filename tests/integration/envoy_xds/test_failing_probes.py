"""Every pod of a policy failing its probes (issue 14): traffic still flows through Envoy.

A real control plane (directory source, real prober on loopback) feeds a real gateway Envoy
in front of three real backends whose probe path can be made to answer 503 while their
traffic path keeps answering 200. One pod failing is floored and DEGRADED; then every pod
failing gives equal weights, all HEALTHY: the prober never takes the last endpoints away, and
never floors all of them. Envoy's own view is sampled all along, and traffic runs throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from aviator.controlplane import ControlPlane, Settings
from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.process import free_port
from aviator.model import MAX_WEIGHT, WeigherKnobs
from aviator.probing.results import DEFAULT_PROBE_PATH
from aviator.xds.resources import GatewayConfig
from tests.envoy_fixtures import Backend, poll_until
from tests.integration.envoy_xds.harness import GatewayFactory, cluster_name, holds, write_source
from tests.integration.envoy_xds.test_restart import Traffic

pytestmark = pytest.mark.envoy

WEB = cluster_name("web")
FLOOR = math.ceil(MAX_WEIGHT / WeigherKnobs().max_weight_ratio)


@dataclass
class Pod:
    """A real backend: ``200 <name>`` on every path, its probe path answers ``probe_status``."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    probe_status: int = 200
    probes: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == DEFAULT_PROBE_PATH:
            self.probes += 1
            return web.Response(status=self.probe_status, text="probe")
        return web.Response(text=self.name)


@contextlib.asynccontextmanager
async def pods(names: list[str]) -> AsyncIterator[list[Pod]]:
    runners = []
    out = []
    try:
        for name in names:
            pod = Pod(name)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", pod.handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, pod.host, 0)
            await site.start()
            pod.port = runner.addresses[0][1]
            out.append(pod)
        yield out
    finally:
        for runner in runners:
            await runner.cleanup()


@dataclass
class Held:
    """Envoy's hosts of ``shop/web`` (address → (weight, EDS health)), sampled every 20 ms."""

    samples: list[dict[str, tuple[int, str]]] = field(default_factory=list)

    async def run(self, admin: EnvoyAdmin, stop: asyncio.Event) -> None:
        while not stop.is_set():
            hosts = await admin.clusters()
            self.samples.append(
                {h.address: (h.weight, h.eds_health) for h in hosts if h.cluster == WEB}
            )
            await asyncio.sleep(0.02)


async def weights(admin: EnvoyAdmin) -> dict[str, tuple[int, str]]:
    return {h.address: (h.weight, h.eds_health) for h in await admin.clusters() if h.cluster == WEB}


async def test_every_pod_failing_its_probes_keeps_traffic_flowing(
    gateways: GatewayFactory, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    gateway_port = free_port()
    async with pods(["p1", "p2", "p3"]) as (p1, p2, p3):
        write_source(source, [Backend(p.name, p.host, p.port) for p in (p1, p2, p3)])
        settings = Settings(
            source=f"dir:{source}",
            xds_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            gateway=GatewayConfig(address="127.0.0.1", port=gateway_port),
            allow_probe_loopback=True,  # the pods are on 127.0.0.1
        )
        cp = ControlPlane(settings)
        started = asyncio.Event()
        run = asyncio.create_task(cp.run(started=started))
        await started.wait()
        assert cp.xds_port is not None
        gw = await gateways(cp.xds_port, delta=False, port=gateway_port)
        admin = gw.admin
        addresses = {f"{p.host}:{p.port}": p for p in (p1, p2, p3)}
        traffic = Traffic(f"http://127.0.0.1:{gateway_port}/")
        held = Held()
        stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        try:

            async def equal_and_healthy() -> bool:
                now = await weights(admin)
                return set(now) == set(addresses) and set(now.values()) == {(MAX_WEIGHT, "HEALTHY")}

            await poll_until(lambda: holds(admin, {WEB: set(addresses)}), within=20)
            await poll_until(equal_and_healthy, within=20)
            assert (await gw.get("web.shop"))[0] == 200
            tasks = [
                asyncio.create_task(traffic.run(stop)),
                asyncio.create_task(held.run(admin, stop)),
            ]

            # One pod failing its probes: the prober floors it and marks it DEGRADED (no agent:
            # the others keep equal weights, so Envoy's least request keeps its two choices).
            p1.probe_status = 503
            one = f"{p1.host}:{p1.port}"

            async def p1_floored() -> bool:
                now = await weights(admin)
                return now.get(one) == (FLOOR, "DEGRADED") and all(
                    v == (MAX_WEIGHT, "HEALTHY") for a, v in now.items() if a != one
                )

            await poll_until(p1_floored, within=20)
            before_all = len(held.samples)

            # Every pod failing: the weights go back to equal, nothing is taken away.
            p2.probe_status = p3.probe_status = 503
            probes = {p.name: p.probes for p in (p1, p2, p3)}
            await poll_until(equal_and_healthy, within=20)
            settled = len(traffic.ok)

            async def served_everywhere() -> bool:
                await asyncio.sleep(0)
                bodies = [body for _, body in traffic.ok[settled:]]
                return all(bodies.count(p.name) >= 20 for p in (p1, p2, p3))

            await poll_until(served_everywhere, within=20)
            # Still failing, still probed (at the back-off's pace): this is not a stale view.
            assert all(p.probes > probes[p.name] for p in (p1, p2, p3))

            # Every pod looks failing to the weigher: errors, and a penalised latency that
            # climbs above the policy's latencyThreshold (100 ms) as failures go on (how many
            # it takes depends on the back-off's pace): hot, all of them, none singled out.
            async def all_hot() -> bool:
                await asyncio.sleep(0)
                view = {e["address"]: e for e in cp.endpoints_view()}
                return all(
                    view[a]["error_rate"] > 0 and view[a]["latency_ms"] > 100 for a in addresses
                )

            await poll_until(all_hot, within=20)
            assert (await weights(admin)) == dict.fromkeys(addresses, (MAX_WEIGHT, "HEALTHY"))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            cp.stop()
            await run

    print(
        f"all probes failing: {len(traffic.ok)} requests OK, {len(traffic.failed)} failed; "
        f"{len(held.samples)} samples of Envoy's hosts"
    )
    assert traffic.failed == [], traffic.failed[:3]
    # Never an empty cluster, never every host at the floor, never more than the one failing
    # pod taken out (DEGRADED), never a host UNHEALTHY.
    for sample in held.samples:
        assert set(sample) == set(addresses), sample
        assert {h for _, h in sample.values()} <= {"HEALTHY", "DEGRADED"}, sample
        assert sum(h == "HEALTHY" for _, h in sample.values()) >= 2, sample
        assert any(w > FLOOR for w, _ in sample.values()), sample
    assert len(held.samples) > before_all
