"""Shared pieces of the real-Envoy xDS tests: workloads on real backends, a gateway Envoy fed by
Aviator's ADS server, and the checks that read Envoy's own view (stats, /clusters).

Every check here asks Envoy, never Aviator: Aviator's side (``AdsServer.proxies()``,
``nacks()``, metrics) is compared against it in the tests themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import yaml
from aiohttp import web

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.bootstrap import XDS_CLUSTER, render_bootstrap
from aviator.envoy.process import EnvoyProcess, free_port
from aviator.model import EndpointAddress, Health, WeightedEndpoint, WeightedWorkload, WorkloadKey
from aviator.xds.resources import GatewayConfig
from aviator.xds.server import AdsServer
from tests.envoy_fixtures import Backend, EnvoyFactory

NAMESPACE = "shop"
WORKLOAD_PORT = 8080  # the workload's own port, as Kubernetes would name it in a Service
IDENTIFIER = "aviator-envoy-it"
# Stats of the gateway's HTTP connection manager (stat_prefix) and route configuration.
RDS_PREFIX = "http.aviator_gateway.rds.aviator-gateway"

_node_ids = itertools.count(1)


class HasAddress(Protocol):
    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def address(backend: HasAddress) -> str:
    """``ip:port`` as Envoy's /clusters shows it."""
    return f"{backend.host}:{backend.port}"


def workload(
    name: str,
    backends: Sequence[HasAddress],
    *,
    weights: Sequence[int] | None = None,
    health: Sequence[Health] | None = None,
) -> WeightedWorkload:
    """Workload ``shop/<name>`` on ``backends`` (weight 1 and healthy unless given)."""
    return WeightedWorkload(
        WorkloadKey(NAMESPACE, name),
        WORKLOAD_PORT,
        tuple(
            WeightedEndpoint(
                EndpointAddress(b.host, b.port),
                weights[i] if weights is not None else 1,
                health[i] if health is not None else Health.HEALTHY,
            )
            for i, b in enumerate(backends)
        ),
    )


def cluster_name(name: str) -> str:
    return WorkloadKey(NAMESPACE, name).cluster_name


@dataclass
class Gateway:
    """A gateway Envoy: listener, routes, clusters and endpoints all come over ADS."""

    envoy: EnvoyProcess
    port: int  # the gateway listener's port (sent over LDS by the server)
    config: GatewayConfig
    node_id: str
    http: aiohttp.ClientSession

    @property
    def admin(self) -> EnvoyAdmin:
        return self.envoy.admin

    async def get(self, host: str, path: str = "/") -> tuple[int, str]:
        """One request through the gateway with ``Host: host``: (status, body)."""
        async with self.http.get(
            f"http://127.0.0.1:{self.port}{path}", headers={"Host": host}
        ) as response:
            return response.status, await response.text()

    async def spread(self, host: str, requests: int) -> Counter[str]:
        """Send ``requests`` requests one after the other; count the bodies (backend names).

        Sequential on purpose: no request is in flight when the next one is balanced, so least
        request degenerates to its weighted schedule and the shares follow the weights.
        """
        bodies: Counter[str] = Counter()
        for _ in range(requests):
            status, body = await self.get(host)
            assert status == 200, f"{host}: HTTP {status} {body!r}"
            bodies[body] += 1
        return bodies


class GatewayFactory(Protocol):
    async def __call__(
        self,
        xds_port: int,
        *,
        delta: bool,
        port: int | None = None,
        initial_fetch_timeout: float | None = None,
    ) -> Gateway: ...


@contextlib.asynccontextmanager
async def gateway_factory(envoy_factory: EnvoyFactory) -> AsyncIterator[GatewayFactory]:
    """Start gateway Envoys (each with its own node id and listener port); close them after."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        xds_port: int,
        *,
        delta: bool,
        port: int | None = None,
        initial_fetch_timeout: float | None = None,
    ) -> Gateway:
        """A gateway whose listener port is ``port`` (a free one by default); the server must
        send a listener on that port (:func:`gateway_config`)."""
        port = port if port is not None else free_port()
        node_id = f"gw-{next(_node_ids)}"
        envoy = await envoy_factory(
            render_bootstrap(
                xds_host="127.0.0.1",
                xds_port=xds_port,
                node_id=node_id,
                listen_port=port,
                listen_address="127.0.0.1",  # the node asks for the listener of gateway_config
                admin_port=0,
                delta=delta,
                initial_fetch_timeout=initial_fetch_timeout,
            )
        )
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        sessions.append(http)
        return Gateway(envoy, port, gateway_config(port), node_id, http)

    try:
        yield start
    finally:
        for session in sessions:
            await session.close()


def gateway_config(port: int, **kwargs: str) -> GatewayConfig:
    """The gateway listener on loopback only (the default 0.0.0.0 is for real gateways)."""
    return GatewayConfig(address="127.0.0.1", port=port, **kwargs)


async def dynamic_hosts(admin: EnvoyAdmin) -> dict[str, set[str]]:
    """Envoy's clusters from ADS (``aviator-xds`` left out) → addresses of their hosts."""
    out: dict[str, set[str]] = {}
    for host in await admin.clusters():
        if host.cluster != XDS_CLUSTER:
            out.setdefault(host.cluster, set()).add(host.address)
    return out


def expected_hosts(workloads: Iterable[WeightedWorkload]) -> dict[str, set[str]]:
    return {w.key.cluster_name: {str(e.address) for e in w.endpoints} for w in workloads}


async def holds(admin: EnvoyAdmin, want: Mapping[str, set[str]]) -> bool:
    """True once Envoy holds exactly ``want`` (cluster → host addresses), nothing warming,
    and its listener and routes arrived."""
    if await dynamic_hosts(admin) != want:
        return False
    stats = await admin.stats()
    return (
        stats.get("cluster_manager.warming_clusters") == 0
        and stats.get("listener_manager.lds.update_success", 0) >= 1
        and stats.get(f"{RDS_PREFIX}.update_success", 0) >= 1
        and stats.get("listener_manager.total_listeners_warming") == 0
    )


REJECTION_COUNTERS = (
    "cluster_manager.cds.update_rejected",
    "listener_manager.lds.update_rejected",
    f"{RDS_PREFIX}.update_rejected",
)


async def rejections(admin: EnvoyAdmin, clusters: Iterable[str]) -> dict[str, int]:
    """Every ``update_rejected`` counter of the gateway's subscriptions (CDS, LDS, RDS, each
    cluster's EDS). A counter Envoy does not have is reported as -1 so a typo cannot pass."""
    stats = await admin.stats()
    names = [*REJECTION_COUNTERS, *(f"cluster.{c}.update_rejected" for c in clusters)]
    return {n: stats.get(n, -1) for n in names}


async def versions(admin: EnvoyAdmin) -> dict[str, str]:
    """The ``version_text`` of each subscription, by stat name."""
    return {k: v for k, v in (await admin.text_readouts()).items() if k.endswith(".version_text")}


def sample(server: AdsServer, metric: str, **labels: str) -> float:
    """A sample of the server's own Prometheus registry (0 when never incremented)."""
    return server.metrics.registry.get_sample_value(metric, labels) or 0.0


@dataclass
class GatedBackend:
    """A real HTTP backend that answers ``200 <name>`` except: ``/hold`` waits until
    :meth:`release`, ``/fail`` answers 503. Counts what it holds and what it failed."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    held: int = 0
    failed: int = 0
    _gate: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self._gate.set()

    async def handle(self, request: web.Request) -> web.Response:
        if request.path == "/hold":
            self.held += 1
            try:
                await self._gate.wait()
            finally:
                self.held -= 1
        elif request.path == "/fail":
            self.failed += 1
            return web.Response(status=503, text=f"{self.name} failing")
        return web.Response(text=self.name)


@contextlib.asynccontextmanager
async def gated_backend(name: str) -> AsyncIterator[GatedBackend]:
    backend = GatedBackend(name)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, backend.host, 0)
        await site.start()
        backend.port = runner.addresses[0][1]
        yield backend
    finally:
        backend.release()
        await runner.cleanup()


def http_port(port: int) -> dict[str, Any]:
    return {"name": "http", "containerPort": port}


def manifests(backends: list[Backend]) -> list[dict[str, Any]]:
    """AviatorPolicy, Deployment ``shop/web`` and one ready Pod per backend. Every backend
    listens on 127.0.0.1 at its own port, declared as the pod's container port ``http``."""
    meta = {"name": "web", "namespace": "shop"}
    policy = {
        "apiVersion": "aviator.io/v1alpha1",
        "kind": "AviatorPolicy",
        "metadata": dict(meta),
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "port": "http",
            "pingInterval": "200ms",
            "latencyThreshold": "100ms",
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": dict(meta),
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "ports": [http_port(8080)]}]},
            },
        },
    }
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"web-{b.name}", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "ports": [http_port(b.port)]}]},
            "status": {
                "phase": "Running",
                "podIP": b.host,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for b in backends
    ]
    return [policy, deployment, *pods]


def write_source(directory: Path, backends: list[Backend]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".web.yaml.tmp"  # dot file: the source skips it
    tmp.write_text(yaml.safe_dump_all(manifests(backends), sort_keys=False))
    tmp.replace(directory / "web.yaml")  # atomic: never read half-written


__all__ = [
    "IDENTIFIER",
    "RDS_PREFIX",
    "Backend",
    "GatedBackend",
    "Gateway",
    "GatewayFactory",
    "address",
    "cluster_name",
    "dynamic_hosts",
    "expected_hosts",
    "gated_backend",
    "gateway_config",
    "gateway_factory",
    "holds",
    "rejections",
    "sample",
    "versions",
    "workload",
    "write_source",
]
