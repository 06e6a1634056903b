"""Aviator's bootstraps in a running Envoy, before any control plane answers."""

from __future__ import annotations

import aiohttp
import pytest

from aviator.envoy.bootstrap import CLUSTER_HEADER, XDS_CLUSTER, render_bootstrap
from aviator.envoy.process import free_port
from aviator.model import WorkloadKey
from tests.envoy_fixtures import BackendFactory, EnvoyFactory, poll_until, static_cluster

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize("delta", [False, True])
async def test_gateway_without_a_control_plane_starts_disconnected(
    envoy_factory: EnvoyFactory, delta: bool
) -> None:
    xds_port = free_port()  # nothing listens there
    envoy = await envoy_factory(
        render_bootstrap(
            xds_host="127.0.0.1", xds_port=xds_port, node_id="gw-1", admin_port=0, delta=delta
        )
    )
    admin = envoy.admin
    stats = await admin.stats()
    assert stats["control_plane.connected_state"] == 0
    assert stats["cluster_manager.cds.update_success"] == 0
    assert stats["listener_manager.lds.update_success"] == 0
    (xds,) = await admin.hosts(XDS_CLUSTER)
    assert xds.address == f"127.0.0.1:{xds_port}"
    assert {h.cluster for h in await admin.clusters()} == {XDS_CLUSTER}
    info = await admin.server_info()
    assert (info.node_id, info.node_cluster) == ("gw-1", "aviator")
    dump = await admin.config_dump()
    (boot,) = [c for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump")]
    ads = boot["bootstrap"]["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == ("DELTA_GRPC" if delta else "GRPC")
    assert boot["bootstrap"]["node"]["metadata"]["aviator.io/mode"] == "gateway"


async def test_sidecar_routes_by_host_and_by_header(
    envoy_factory: EnvoyFactory, http_backends: BackendFactory
) -> None:
    cart = await http_backends("cart")
    listen = free_port()
    boot = render_bootstrap(
        xds_host="127.0.0.1",
        xds_port=free_port(),  # no control plane: the cluster comes from a static stand-in
        node_id="pod-1",
        mode="sidecar",
        listen_port=listen,
        admin_port=0,
        workloads=[WorkloadKey("shop", "cart"), WorkloadKey("shop", "api")],
        # Listeners accept only once initialisation ends; do not wait 15 s for a CDS answer.
        initial_fetch_timeout=0.2,
    )
    # Stands in for the cluster CDS would deliver: same name, same shape of traffic.
    boot["static_resources"]["clusters"].append(static_cluster("shop/cart", [cart]))
    envoy = await envoy_factory(boot)
    await envoy.wait_live()
    url = f"http://127.0.0.1:{listen}/path"

    async def call(headers: dict[str, str]) -> tuple[int, str]:
        async with http.get(url, headers=headers) as response:
            return response.status, await response.text()

    async with aiohttp.ClientSession() as http:
        # Named hosts, with and without a port (ignore_port_in_host_matching).
        assert await call({"Host": "cart.shop"}) == (200, "cart")
        assert await call({"Host": f"cart.shop.svc:{listen}"}) == (200, "cart")
        assert await call({"Host": "cart.shop.svc.cluster.local:80"}) == (200, "cart")
        # The upstream sees the Host as the client sent it, port included.
        assert cart.seen[-1]["Host"] == "cart.shop.svc.cluster.local:80"
        # A listed workload whose cluster has not arrived yet: no cluster, 503.
        status, _ = await call({"Host": "api.shop"})
        assert status == 503
        # Any workload by header; the header is not passed on.
        assert await call({"Host": "example", CLUSTER_HEADER: "shop/cart"}) == (200, "cart")
        assert CLUSTER_HEADER not in {k.lower() for k in cart.seen[-1]}
        # The header cannot reach the control plane's cluster, and unknown hosts get 404.
        status, body = await call({"Host": "example", CLUSTER_HEADER: XDS_CLUSTER})
        assert (status, body.startswith("aviator sidecar: no route")) == (404, True)
        status, _ = await call({"Host": "example"})
        assert status == 404
    assert cart.hits == 4

    async def counted() -> bool:
        stats = await envoy.admin.stats(r"^cluster\.shop/cart\.upstream_rq_200$")
        return stats.get("cluster.shop/cart.upstream_rq_200") == 4

    await poll_until(counted)
