"""A real Envoy next to hostile ADS streams, on a server whose connections are recycled
(issue 14): the Envoy keeps routing every request and keeps being sent every update.

The server here ages connections out after 2 s (30 min in production) so that the test sees
several GOAWAYs: each cuts Envoy's stream after the grace, Envoy reconnects, and no request
through it fails meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from aviator.envoy.bootstrap import XDS_CLUSTER
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer, ServerLimits
from aviator.xds.snapshot import build_snapshot
from tests.envoy_fixtures import BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    IDENTIFIER,
    GatewayFactory,
    dynamic_hosts,
    expected_hosts,
    holds,
    workload,
)

pytestmark = pytest.mark.envoy

SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


@pytest.fixture
async def aging_ads() -> AsyncIterator[AdsServer]:
    limits = ServerLimits(max_connection_age_s=2.0, max_connection_age_grace_s=0.5)
    server = AdsServer(
        Cache(), identifier=IDENTIFIER, metrics_registry=CollectorRegistry(), limits=limits
    )
    await server.start("127.0.0.1:0")
    yield server
    await server.stop(0)


async def _hostile(port: int) -> list[grpc.StatusCode]:
    """Garbage, a 100 KB node id and 100,000 names, each on its own stream."""
    codes = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        garbage = channel.stream_stream(
            SOTW, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )()
        await garbage.write(b"\x7f\xff\xfe-not-a-request")
        calls = [garbage]
        for request in (
            discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "N" * 100_000}),
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names=[f"x/{i}" for i in range(100_000)]
            ),
        ):
            call = channel.stream_stream(
                SOTW,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )()
            await call.write(request)
            calls.append(call)
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with asyncio.timeout(10):
                    await call.read()
            codes.append(info.value.code())
    return codes


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_envoy_serves_through_hostile_streams_and_connection_recycling(
    aging_ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    ads = aging_ads
    backends = [await http_backends("web-1"), await http_backends("web-2")]
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    ads.cache.publish(build_snapshot([workload("web", backends[:1])], gateway=gw.config))
    await poll_until(lambda: holds(gw.admin, expected_hosts([workload("web", backends[:1])])))

    failures: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal served
        while not stop.is_set():
            status, body = await gw.get("web.shop")
            if status != 200:
                failures.append(f"{status} {body}")
            served += 1
            await asyncio.sleep(0.01)

    load = asyncio.create_task(traffic())
    try:
        for _ in range(2):
            codes = await _hostile(ads.port)
            assert codes == [
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ]
        # Past two connection ages: Envoy was sent GOAWAY and reconnected at least once.
        await poll_until(lambda: _reconnects(gw.admin), within=20, interval=0.2)
        # And it is still sent updates: a second backend joins.
        after = workload("web", backends)
        ads.cache.publish(build_snapshot([after], gateway=gw.config))
        await poll_until(lambda: holds(gw.admin, expected_hosts([after])))
    finally:
        stop.set()
        await load
    assert failures == []
    assert served > 50
    assert (await dynamic_hosts(gw.admin)) == expected_hosts([after])
    assert [p.node_id for p in ads.proxies()] == [gw.node_id]


async def _reconnects(admin: object) -> bool:
    stats = await admin.stats()  # type: ignore[attr-defined]
    return bool(
        stats[f"cluster.{XDS_CLUSTER}.upstream_cx_total"] >= 2
        and stats["control_plane.connected_state"] == 1
    )
