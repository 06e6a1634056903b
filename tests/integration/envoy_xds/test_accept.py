"""A real Envoy accepts every resource type Aviator serves, over SotW and delta ADS, and routes
gateway traffic by Host to the workload's real backends."""

from __future__ import annotations

import aiohttp
import pytest

from aviator.envoy.bootstrap import XDS_CLUSTER, render_bootstrap
from aviator.envoy.process import free_port
from aviator.xds import resources as r
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot
from tests.envoy_fixtures import BackendFactory, EnvoyFactory, poll_until
from tests.integration.envoy_xds.harness import (
    IDENTIFIER,
    RDS_PREFIX,
    GatewayFactory,
    dynamic_hosts,
    expected_hosts,
    holds,
    rejections,
    sample,
    versions,
    workload,
)

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_every_resource_type_is_accepted(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    web = [await http_backends("web-1"), await http_backends("web-2")]
    cart = [await http_backends("cart-1")]
    workloads = [workload("web", web, weights=[2, 5]), workload("cart", cart)]
    # The listener port is only known once the gateway's bootstrap is rendered: publish after.
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    ads.cache.publish(build_snapshot(workloads, gateway=gw.config))
    admin = gw.admin

    await poll_until(lambda: holds(admin, expected_hosts(workloads)))
    stats = await admin.stats()
    assert stats["control_plane.connected_state"] == 1
    assert stats["cluster_manager.warming_clusters"] == 0
    assert stats["cluster_manager.cds.update_success"] >= 1
    assert stats["listener_manager.lds.update_success"] >= 1
    assert stats[f"{RDS_PREFIX}.update_success"] >= 1
    for name in ("shop/web", "shop/cart"):
        assert stats[f"cluster.{name}.update_success"] >= 1
    assert set((await rejections(admin, ["shop/web", "shop/cart"])).values()) == {0}
    assert (await admin.text_readouts())["control_plane.identifier"] == IDENTIFIER
    assert await admin.ready()

    # Envoy holds exactly the versions Aviator saw it ACK.
    (proxy,) = ads.proxies()
    assert (proxy.node_id, proxy.kind) == (gw.node_id, kind)
    acked = {t.type: t.acked_version for t in proxy.types}
    assert not any(t.waiting_for_ack for t in proxy.types)
    held = await versions(admin)
    assert held["cluster_manager.cds.version_text"] == acked["cds"]
    assert held["listener_manager.lds.version_text"] == acked["lds"]
    assert held[f"{RDS_PREFIX}.version_text"] == acked["rds"]
    if kind is StreamKind.SOTW:
        # Full-state types: the version is the server's version of the whole type.
        assert acked["cds"] == ads.cache.type_version(r.CLUSTER_TYPE)
        assert acked["lds"] == ads.cache.type_version(r.LISTENER_TYPE)
    assert ads.nacks() == ()
    for t in ("cds", "eds", "lds", "rds"):
        assert sample(ads, "aviator_xds_nacks_total", type=t, kind=str(kind)) == 0
        assert sample(ads, "aviator_xds_acks_total", type=t, kind=str(kind)) >= 1

    # Real requests reach real backends through every resource type (LDS → RDS → CDS → EDS).
    assert await gw.get("cart.shop") == (200, "cart-1")
    status, body = await gw.get("web.shop")
    assert (status, body in {"web-1", "web-2"}) == (200, True)
    # Nothing else was added: only Aviator's two clusters besides the static xDS one.
    clusters = {h.cluster for h in await admin.clusters()}
    assert clusters == {XDS_CLUSTER, "shop/web", "shop/cart"}


async def test_gateway_routes_every_kubernetes_host_form_to_the_workload(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory
) -> None:
    web, cart = await http_backends("web-1"), await http_backends("cart-1")
    workloads = [workload("web", [web]), workload("cart", [cart])]
    gw = await gateways(ads.port, delta=False)
    ads.cache.publish(build_snapshot(workloads, gateway=gw.config))
    await poll_until(lambda: holds(gw.admin, expected_hosts(workloads)))

    for host in (
        "web.shop",
        "web.shop.svc",
        "web.shop.svc.cluster.local",
        "web.shop.svc.cluster.local:8080",  # the workload's port
        f"web.shop:{gw.port}",  # the gateway's own port, as a client dialling it sends
        "web.shop:80",  # the port of a Service or load balancer in front of the gateway
    ):
        assert await gw.get(host, "/some/path") == (200, "web-1"), host
    assert web.seen[-1]["Host"] == "web.shop:80"  # passed on as the client sent it
    assert await gw.get("cart.shop.svc.cluster.local:8080") == (200, "cart-1")
    # Routing is by Host, not a catch-all: other names (on any port) find no route.
    for host in ("unknown.shop", "web.other", "web.other:8080", "web", "web:8080"):
        status, _ = await gw.get(host)
        assert status == 404, host
    assert web.hits == 6


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_sidecar_takes_clusters_and_endpoints_and_routes_by_host(
    ads: AdsServer, envoy_factory: EnvoyFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    web, cart = await http_backends("web-1"), await http_backends("cart-1")
    workloads = [workload("web", [web]), workload("cart", [cart])]
    ads.cache.publish(build_snapshot(workloads))  # no gateway: the sidecar's listener is static
    port = free_port()
    envoy = await envoy_factory(
        render_bootstrap(
            xds_host="127.0.0.1",
            xds_port=ads.port,
            node_id="sidecar-1",
            mode="sidecar",
            listen_port=port,
            admin_port=0,
            workloads=[w.key for w in workloads],
            delta=kind is StreamKind.DELTA,
        )
    )
    admin = envoy.admin

    async def accepted() -> bool:
        stats = await admin.stats()
        return (
            await dynamic_hosts(admin) == expected_hosts(workloads)
            and stats["cluster_manager.warming_clusters"] == 0
            and await admin.ready()
        )

    await poll_until(accepted)
    stats = await admin.stats()
    assert stats["control_plane.connected_state"] == 1
    assert stats["cluster_manager.cds.update_rejected"] == 0
    assert stats["cluster.shop/web.update_rejected"] == 0
    assert stats["cluster.shop/cart.update_rejected"] == 0
    assert "listener_manager.lds.update_success" not in stats  # no LDS subscription at all
    (proxy,) = ads.proxies()
    assert {t.type for t in proxy.types} == {"cds", "eds"}
    assert ads.nacks() == ()
    async with aiohttp.ClientSession() as http:
        for host, body in (("web.shop", "web-1"), ("cart.shop.svc.cluster.local:8080", "cart-1")):
            async with http.get(f"http://127.0.0.1:{port}/", headers={"Host": host}) as response:
                assert (response.status, await response.text()) == (200, body), host
