"""Envoy balances with what Aviator pushed: the weights, the health, least request and outlier
detection, seen in /clusters and /config_dump and in where real requests land."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aviator.model import Health
from aviator.xds import resources as r
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot
from tests.envoy_fixtures import BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    GatewayFactory,
    address,
    expected_hosts,
    gated_backend,
    holds,
    rejections,
    workload,
)

pytestmark = pytest.mark.envoy

REQUESTS = 400


async def test_weights_and_health_reach_envoy_and_traffic_follows_them(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory
) -> None:
    light, heavy = await http_backends("light"), await http_backends("heavy")
    calm, hot = await http_backends("calm"), await http_backends("hot")
    workloads = [
        workload("web", [light, heavy], weights=[1, 3]),
        workload("cart", [calm, hot], weights=[10, 10], health=[Health.HEALTHY, Health.DEGRADED]),
    ]
    gw = await gateways(ads.port, delta=False)
    ads.cache.publish(build_snapshot(workloads, gateway=gw.config))
    await poll_until(lambda: holds(gw.admin, expected_hosts(workloads)))

    by_address = {h.address: h for h in await gw.admin.clusters()}
    assert [by_address[address(b)].weight for b in (light, heavy, calm, hot)] == [1, 3, 10, 10]
    assert [by_address[address(b)].eds_health for b in (light, heavy, calm, hot)] == [
        "HEALTHY",
        "HEALTHY",
        "HEALTHY",
        "DEGRADED",
    ]
    assert by_address[address(hot)].degraded
    assert not by_address[address(calm)].degraded

    # Weights 1:3, requests one at a time: least request follows its weighted schedule, so
    # "heavy" takes 3/4. Even if the picks were independent draws, a share 0.1 away from 3/4
    # over 400 requests is 4.6 standard deviations out: it fails with probability < 1e-5.
    web = await gw.spread("web.shop", REQUESTS)
    share = web["heavy"] / REQUESTS
    print(f"weights 1:3 → heavy took {share:.3f} of {REQUESTS} requests")
    assert set(web) == {"light", "heavy"}
    assert abs(share - 0.75) <= 0.1

    # A DEGRADED host takes only what the healthy ones cannot: with one healthy host of two
    # and the default overprovisioning factor 1.4, healthy hosts take 70% and degraded 30%.
    # Equal weights: 0.5 if Envoy ignored the health. Picks are random draws here; ±0.1
    # around 0.3 over 400 requests is 4.4 standard deviations: probability < 2e-5.
    cart = await gw.spread("cart.shop", REQUESTS)
    degraded_share = cart["hot"] / REQUESTS
    print(f"one DEGRADED host of two → it took {degraded_share:.3f} of {REQUESTS} requests")
    assert abs(degraded_share - 0.3) <= 0.1
    assert set((await rejections(gw.admin, ["shop/web", "shop/cart"])).values()) == {0}


def _dynamic_cluster(dump: dict[str, Any], name: str) -> dict[str, Any]:
    (clusters,) = [c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump")]
    (found,) = [
        c["cluster"] for c in clusters["dynamic_active_clusters"] if c["cluster"]["name"] == name
    ]
    return dict(found)


async def test_least_request_and_outlier_detection_are_in_force(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory
) -> None:
    light = await http_backends("light")
    async with gated_backend("heavy") as heavy:
        workloads = [workload("web", [light, heavy], weights=[1, 3])]
        gw = await gateways(ads.port, delta=False)
        ads.cache.publish(build_snapshot(workloads, gateway=gw.config))
        await poll_until(lambda: holds(gw.admin, expected_hosts(workloads)))

        # What Envoy holds: the typed policy list, least request first (Envoy takes the first
        # policy it supports), and the outlier detector Aviator configures.
        cluster = _dynamic_cluster(await gw.admin.config_dump(), "shop/web")
        assert "lb_policy" not in cluster  # no legacy enum that could take precedence
        policies = [
            p["typed_extension_config"] for p in cluster["load_balancing_policy"]["policies"]
        ]
        assert [p["name"] for p in policies] == [r.LEAST_REQUEST_POLICY, r.ROUND_ROBIN_POLICY]
        assert policies[0]["typed_config"]["@type"].endswith("least_request.v3.LeastRequest")
        outlier = cluster["outlier_detection"]
        assert outlier["consecutive_5xx"] == r.CONSECUTIVE_5XX
        assert outlier["max_ejection_percent"] == r.MAX_EJECTION_PERCENT
        assert outlier["enforcing_success_rate"] == 0

        # What Envoy does: least request divides a host's weight by its requests in flight
        # (active_request_bias 1). Park 6 requests on "heavy": its effective weight drops from
        # 3 to 3/7 against 1, so it gets about 30% of new requests, where any policy blind to
        # requests in flight (round robin, random) would keep giving it 75%.
        parked: list[asyncio.Task[tuple[int, str]]] = []
        while heavy.held < 6:
            task = asyncio.create_task(gw.get("web.shop", "/hold"))
            parked.append(task)
            before = heavy.held

            async def placed(task: asyncio.Task[tuple[int, str]] = task, n: int = before) -> bool:
                await asyncio.sleep(0)
                return task.done() or heavy.held > n  # "light" answered, or "heavy" holds it

            await poll_until(placed)
        spread = await gw.spread("web.shop", 200)
        share = spread["heavy"] / 200
        print(f"weights 1:3, 6 requests parked on heavy → heavy took {share:.3f} of 200")
        assert share < 0.5
        heavy.release()
        results = await asyncio.gather(*parked)
        assert {status for status, _ in results} == {200}

        # Outlier detection: 5 consecutive 5xx from "heavy" eject it (max 50% of the cluster
        # may be ejected: one host of two is allowed), and it leaves rotation.
        while heavy.failed < r.CONSECUTIVE_5XX:
            status, body = await gw.get("web.shop", "/fail")
            assert (status, body) in {(200, "light"), (503, "heavy failing")}

        async def ejected() -> bool:
            hosts = {h.address: h for h in await gw.admin.hosts("shop/web")}
            return "failed_outlier_check" in hosts[address(heavy)].flags

        await poll_until(ejected)
        assert (await gw.spread("web.shop", 20)) == {"light": 20}
        stats = await gw.admin.stats()
        assert stats["cluster.shop/web.outlier_detection.ejections_enforced_consecutive_5xx"] == 1
