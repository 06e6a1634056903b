"""The admin client reads what a real Envoy holds and did, after real traffic through it."""

from __future__ import annotations

import re

import aiohttp
import pytest
from aiohttp import web

from aviator.envoy.admin import EnvoyAdmin
from aviator.envoy.errors import EnvoyAdminError
from aviator.envoy.process import free_port
from tests.envoy_fixtures import (
    BackendFactory,
    EnvoyFactory,
    loopback_bootstrap,
    poll_until,
    static_cluster,
)

pytestmark = pytest.mark.envoy

REQUESTS = 12


async def test_counters_weights_and_health_after_real_requests(
    http_backends: BackendFactory, envoy_factory: EnvoyFactory
) -> None:
    healthy = [await http_backends(f"healthy-{i}") for i in range(3)]
    degraded = await http_backends("degraded")
    port = free_port()
    cluster = static_cluster(
        "shop/cart",
        [*healthy, degraded],
        weights=[3, 5, 2, 7],
        health=["HEALTHY", "HEALTHY", "HEALTHY", "DEGRADED"],
    )
    envoy = await envoy_factory(loopback_bootstrap(listen_port=port, cluster=cluster))
    admin = envoy.admin

    before = await admin.hosts("shop/cart")
    assert [h.rq_total for h in before] == [0, 0, 0, 0]

    async with aiohttp.ClientSession() as http:
        for i in range(REQUESTS):
            async with http.get(f"http://127.0.0.1:{port}/r{i}") as response:
                assert response.status == 200
                # Degraded hosts get traffic only when healthy ones are under 1/1.4 of all
                # (the default overprovisioning factor); here they are 3/4.
                assert (await response.text()).startswith("healthy-")

    async def settled() -> bool:
        # Envoy counts a request when its upstream exchange completes, which may be a moment
        # after the client has its response.
        return sum(h.rq_total for h in await admin.hosts("shop/cart")) == REQUESTS

    await poll_until(settled)
    by_port = {int(h.address.rsplit(":", 1)[1]): h for h in await admin.hosts("shop/cart")}
    assert [by_port[b.port].weight for b in healthy] == [3, 5, 2]
    for b in healthy:
        host = by_port[b.port]
        assert host.address == f"127.0.0.1:{b.port}"
        assert (host.eds_health, host.flags, host.healthy) == ("HEALTHY", (), True)
        # Each host's counters match what that backend really answered.
        assert host.rq_total == host.rq_success == b.hits
        assert (host.rq_error, host.rq_active) == (0, 0)
    assert sum(b.hits for b in healthy) == REQUESTS
    down = by_port[degraded.port]
    assert (down.weight, down.eds_health, down.degraded, down.rq_total) == (7, "DEGRADED", True, 0)
    assert degraded.hits == 0

    stats = await admin.stats()
    assert stats["cluster.shop/cart.upstream_rq_200"] == REQUESTS
    assert stats["http.ingress.downstream_rq_2xx"] == REQUESTS
    assert stats["server.concurrency"] == 1  # EnvoyProcess passes --concurrency 1
    filtered = await admin.stats(r"^cluster\.shop/cart\.upstream_rq_")
    assert filtered
    assert all(name.startswith("cluster.shop/cart.upstream_rq_") for name in filtered)


async def test_server_info_ready_and_config_dump(
    http_backends: BackendFactory, envoy_factory: EnvoyFactory
) -> None:
    backend = await http_backends("b")
    port = free_port()
    cluster = static_cluster("shop/cart", [backend], weights=[5])
    envoy = await envoy_factory(loopback_bootstrap(listen_port=port, cluster=cluster, node_id="x"))
    await envoy.wait_live()
    admin = envoy.admin

    info = await admin.server_info()
    assert info.state == "LIVE"
    assert "/1.40." in info.version
    assert (info.node_id, info.node_cluster) == ("x", "test")
    assert info.uptime_seconds >= 0
    assert await admin.ready() is True

    dump = await admin.config_dump()
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
    static_clusters = by_type["ClustersConfigDump"]["static_clusters"]
    assert "shop/cart" in [c["cluster"]["name"] for c in static_clusters]
    endpoint_configs = by_type["EndpointsConfigDump"]["static_endpoint_configs"]
    (cart,) = [
        e["endpoint_config"]
        for e in endpoint_configs
        if e["endpoint_config"]["cluster_name"] == "shop/cart"
    ]
    (lb,) = cart["endpoints"][0]["lb_endpoints"]
    assert lb["load_balancing_weight"] == 5
    assert lb["endpoint"]["address"]["socket_address"]["port_value"] == backend.port

    without_eds = await admin.config_dump(include_eds=False)
    types = {c["@type"].rsplit(".", 1)[-1] for c in without_eds["configs"]}
    assert "ClustersConfigDump" in types
    assert "EndpointsConfigDump" not in types


async def test_unreachable_admin_is_an_admin_error() -> None:
    async with EnvoyAdmin(f"http://127.0.0.1:{free_port()}", timeout=2) as admin:
        with pytest.raises(EnvoyAdminError, match=re.escape("GET http://127.0.0.1:")) as exc:
            await admin.stats()
    assert isinstance(exc.value.__cause__, aiohttp.ClientError)


async def test_error_status_and_bad_bodies_are_admin_errors() -> None:
    async def broken(request: web.Request) -> web.Response:
        if request.path == "/stats":
            return web.Response(status=500, text="boom")
        if request.path == "/ready":
            return web.Response(status=404, text="no such page")
        return web.Response(text="<html>not json</html>")

    app = web.Application()
    app.router.add_get("/{tail:.*}", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with EnvoyAdmin(url) as admin:
            with pytest.raises(EnvoyAdminError, match="HTTP 500: boom"):
                await admin.stats()
            with pytest.raises(EnvoyAdminError, match="body is not JSON") as exc:
                await admin.config_dump()
            assert isinstance(exc.value.__cause__, ValueError)
            with pytest.raises(EnvoyAdminError, match="/clusters"):
                await admin.clusters()
            with pytest.raises(EnvoyAdminError, match="HTTP 404: no such page"):
                await admin.ready()  # only 200 (LIVE) and 503 (not yet) mean something
    finally:
        await runner.cleanup()
