"""Changes reach a real Envoy well before its warming timeout, and a delta reconnect to a
restarted server resends nothing Envoy already holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from prometheus_client import CollectorRegistry

from aviator.envoy.admin import EnvoyAdmin
from aviator.model import WeightedWorkload
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind, TypeStatus
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot
from tests.envoy_fixtures import BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    IDENTIFIER,
    GatewayFactory,
    address,
    cluster_name,
    expected_hosts,
    holds,
    rejections,
    sample,
    versions,
    workload,
)

pytestmark = pytest.mark.envoy

# Well under Envoy's default initial_fetch_timeout (15 s), which is how long a cluster whose
# endpoints never come stays warming. A deadline, not a measurement: the figure is printed.
DEADLINE_S = 5.0
CDS_VERSION = "cluster_manager.cds.version_text"


def _status(server: AdsServer, type_: str) -> TypeStatus:
    (proxy,) = server.proxies()
    return next(t for t in proxy.types if t.type == type_)


def _with_cluster(snapshot: Snapshot, cluster: cluster_pb2.Cluster) -> Snapshot:
    kept = [
        e
        for t, es in snapshot.resources.items()
        for e in es.values()
        if not (t == r.CLUSTER_TYPE and e.name == cluster.name)
    ]
    return Snapshot.from_entries([*kept, ResourceEntry.from_message(r.CLUSTER_TYPE, cluster)])


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_cluster_changes_converge_well_before_the_warming_timeout(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    web, cart = await http_backends("web-1"), await http_backends("cart-1")
    # Envoy's default initial_fetch_timeout (15 s): a server that stays silent after a cluster
    # change leaves that cluster warming that long.
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    admin = gw.admin
    loop = asyncio.get_running_loop()
    first = [workload("web", [web])]
    ads.cache.publish(build_snapshot(first, gateway=gw.config))
    await poll_until(lambda: holds(admin, expected_hosts(first)))

    async def measure(what: str, snapshot: Snapshot, workloads: list[WeightedWorkload]) -> None:
        """Publish ``snapshot``; seconds until Envoy runs the CDS version the server sent for
        it (ACKed: in SotW Envoy ACKs a cluster change only once its clusters are warm) and
        holds every workload's hosts with nothing warming."""
        before = _status(ads, "cds").sent_version
        started = loop.time()
        ads.cache.publish(snapshot)

        async def converged() -> bool:
            cds = _status(ads, "cds")
            return (
                cds.sent_version != before
                and not cds.waiting_for_ack
                and cds.acked_version == cds.sent_version
                and (await versions(admin)).get(CDS_VERSION) == cds.sent_version
                and await holds(admin, expected_hosts(workloads))
            )

        await poll_until(converged, within=DEADLINE_S, interval=0.01)
        took = loop.time() - started
        print(f"{kind}: {what} converged in {took * 1000:.0f} ms (deadline {DEADLINE_S:.0f} s)")

    # 1. A new workload: a new cluster (which warms until its endpoints come) and a route.
    second = [workload("web", [web]), workload("cart", [cart])]
    await measure("new workload", build_snapshot(second, gateway=gw.config), second)
    assert await gw.get("cart.shop") == (200, "cart-1")

    # 2. A changed cluster: Envoy re-warms it and holds the CDS ACK until its endpoints come.
    # SotW Envoy re-requests them with a request that looks exactly like its last ACK; delta
    # Envoy asks nothing (it already subscribes to that name). Either way the server must send
    # them, or the cluster warms for 15 s.
    changed = cluster_pb2.Cluster()
    changed.CopyFrom(r.build_cluster(second[0].key))
    changed.connect_timeout.seconds = 2
    snapshot = _with_cluster(build_snapshot(second, gateway=gw.config), changed)
    await measure("changed cluster", snapshot, second)
    dump = await admin.config_dump()
    (clusters_dump,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
    active = {c["cluster"]["name"]: c["cluster"] for c in clusters_dump["dynamic_active_clusters"]}
    assert active[cluster_name("web")]["connect_timeout"] == "2s"
    assert "dynamic_warming_clusters" not in clusters_dump
    assert await gw.get("web.shop") == (200, "web-1")
    assert set((await rejections(admin, ["shop/web", "shop/cart"])).values()) == {0}


@contextlib.asynccontextmanager
async def restarted(port: int, snapshot: Snapshot) -> AsyncIterator[AdsServer]:
    """A new server process's worth of state (cache, streams, metrics) on ``port``."""
    cache = Cache()
    cache.publish(snapshot)
    server = AdsServer(cache, identifier=IDENTIFIER, metrics_registry=CollectorRegistry())
    await server.start(f"127.0.0.1:{port}")
    try:
        yield server
    finally:
        await server.stop(0)


async def reconnected(server: AdsServer) -> bool:
    """Envoy re-subscribed every type on the new server and nothing is in flight."""
    proxies = server.proxies()
    if len(proxies) != 1:
        return False
    types = proxies[0].types
    return {t.type for t in types} == {"cds", "eds", "lds", "rds"} and not any(
        t.waiting_for_ack for t in types
    )


def resources_sent(server: AdsServer) -> dict[str, float]:
    """Resources carried by the server's delta responses, by type (its own metric)."""
    return {
        t: sample(server, "aviator_xds_resources_sent_total", type=t, kind="delta")
        for t in ("cds", "eds", "lds", "rds")
    }


# Envoy-side counters that move when Envoy applies a resource it was sent.
APPLIED = (
    "cluster_manager.cluster_added",
    "cluster_manager.cluster_modified",
    "listener_manager.listener_added",
    "listener_manager.listener_modified",
    "http.aviator_gateway.rds.aviator-gateway.update_success",
    "cluster.shop/web.update_success",
    "cluster.shop/cart.update_success",
)


async def test_delta_reconnect_resends_only_what_changed(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory
) -> None:
    web = [await http_backends("web-1"), await http_backends("web-2")]
    cart = await http_backends("cart-1")
    gw = await gateways(ads.port, delta=True)
    admin = gw.admin
    workloads = [workload("web", web, weights=[1, 1]), workload("cart", [cart])]
    snapshot = build_snapshot(workloads, gateway=gw.config)
    ads.cache.publish(snapshot)
    await poll_until(lambda: holds(admin, expected_hosts(workloads)))
    port = ads.port

    # 1. Same content: Envoy reconnects with initial_resource_versions for everything it holds;
    # the new server sends no resource at all.
    before = await admin.stats()
    await ads.stop(0)
    await poll_until(lambda: connected(admin, 0))
    async with restarted(port, snapshot) as second:
        await poll_until(lambda: connected(admin, 1))
        await poll_until(lambda: reconnected(second))
        sent = resources_sent(second)
        print(f"reconnect, same content: resources re-sent {sent}")
        assert sent == {"cds": 0, "eds": 0, "lds": 0, "rds": 0}
        after = await admin.stats()
        assert {k: after[k] for k in APPLIED} == {k: before[k] for k in APPLIED}
        assert await holds(admin, expected_hosts(workloads))
        assert await gw.get("cart.shop") == (200, "cart-1")

        # 2. One workload's weights changed while the server was down: only its CLA goes out.
        reweighted = [workload("web", web, weights=[1, 4]), workload("cart", [cart])]
        before = await admin.stats()
    await poll_until(lambda: connected(admin, 0))
    async with restarted(port, build_snapshot(reweighted, gateway=gw.config)) as third:
        await poll_until(lambda: connected(admin, 1))
        await poll_until(lambda: reconnected(third))

        async def reweighed() -> bool:
            hosts = {h.address: h.weight for h in await admin.hosts("shop/web")}
            return hosts == {address(web[0]): 1, address(web[1]): 4}

        await poll_until(reweighed)
        sent = resources_sent(third)
        print(f"reconnect, one CLA changed: resources re-sent {sent}")
        assert sent == {"cds": 0, "eds": 1, "lds": 0, "rds": 0}
        after = await admin.stats()
        changed = {k for k in APPLIED if after[k] != before[k]}
        assert changed == {"cluster.shop/web.update_success"}
        assert (
            after["cluster.shop/web.update_success"]
            == before["cluster.shop/web.update_success"] + 1
        )
        assert set((await rejections(admin, ["shop/web", "shop/cart"])).values()) == {0}


async def connected(admin: EnvoyAdmin, state: int) -> bool:
    return (await admin.stats())["control_plane.connected_state"] == state
