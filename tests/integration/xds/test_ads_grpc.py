"""The ADS server over real gRPC on loopback: SotW and delta clients (grpc.aio).

No test here waits for "nothing happened": where silence matters, a later request whose answer
must come next proves that nothing was sent in between.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from aviator.model import EndpointAddress, WeightedEndpoint, WeightedWorkload, WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot

IDENTIFIER = "aviator-it"
GW = r.GatewayConfig(address="127.0.0.1", port=10000)
TIMEOUT = 10  # generous bound for a loopback round trip on a busy 2-core machine


def workload(name: str, *weights: int) -> WeightedWorkload:
    return WeightedWorkload(
        WorkloadKey("default", name),
        8080,
        tuple(
            WeightedEndpoint(EndpointAddress(f"10.0.0.{i + 1}", 8080), w)
            for i, w in enumerate(weights)
        ),
    )


class AdsClient:
    """A grpc.aio ADS client (SotW or delta) checking nonces and the identifier."""

    def __init__(self, channel: grpc.aio.Channel, kind: StreamKind) -> None:
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        method = (
            stub.StreamAggregatedResources
            if kind is StreamKind.SOTW
            else stub.DeltaAggregatedResources
        )
        self.call = method(self._iterate())
        self.nonces: set[str] = set()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (request := await self._requests.get()) is not None:
            yield request

    def send(self, request: Any) -> None:
        self._requests.put_nowait(request)

    async def receive(self) -> Any:
        async with asyncio.timeout(TIMEOUT):
            resp = await self.call.read()
        assert resp is not grpc.aio.EOF, "stream ended"
        assert resp.nonce
        assert resp.nonce not in self.nonces
        self.nonces.add(resp.nonce)
        assert resp.control_plane.identifier == IDENTIFIER
        return resp

    def close(self) -> None:
        self.call.cancel()
        # grpc.aio cancels its task that feeds the call from _iterate() only when cancel()
        # ends the call; after the call ended otherwise (the server stopped), only the
        # iterator's end stops that task.
        self._requests.put_nowait(None)


@pytest.fixture
async def server() -> AsyncIterator[AdsServer]:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 2)], gateway=GW))
    # The clients send no node metadata: they get the default listener of GW.
    ads = AdsServer(cache, identifier=IDENTIFIER, metrics_registry=CollectorRegistry(), gateway=GW)
    await ads.start("127.0.0.1:0")
    yield ads
    await ads.stop(0)


@pytest.fixture
async def channel(server: AdsServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def _names(resp: Any) -> list[str]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return sorted(x.name for x in resp.resources)
    out = []
    for packed in resp.resources:
        entry_type = resp.type_url
        from tests.unit.xds.fakes import decode

        out.append(r.resource_name(entry_type, decode(entry_type, packed)))
    return sorted(out)


def _sample(server: AdsServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_start_reports_the_bound_port_and_refuses_a_busy_one(server: AdsServer) -> None:
    assert server.port > 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT):
        pass
    other = AdsServer(Cache(), identifier="other")
    with pytest.raises(OSError, match="cannot listen"):
        await other.start(f"127.0.0.1:{server.port}")
    with pytest.raises(RuntimeError, match="already started"):
        await server.start("127.0.0.1:0")


async def test_sotw_gateway_session(server: AdsServer, channel: grpc.aio.Channel) -> None:
    client = AdsClient(channel, StreamKind.SOTW)
    try:
        client.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "gw-1"}))
        cds = await client.receive()
        assert _names(cds) == ["default/a", "default/b"]
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, version_info=cds.version_info, response_nonce=cds.nonce
            )
        )
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names=["default/a", "default/b"]
            )
        )
        eds = await client.receive()
        assert eds.type_url == r.ENDPOINT_TYPE
        assert _names(eds) == ["default/a", "default/b"]
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE,
                resource_names=["default/a", "default/b"],
                version_info=eds.version_info,
                response_nonce=eds.nonce,
            )
        )
        client.send(discovery_pb2.DiscoveryRequest(type_url=r.LISTENER_TYPE))
        lds = await client.receive()
        assert _names(lds) == [GW.listener_name]
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.LISTENER_TYPE, version_info=lds.version_info, response_nonce=lds.nonce
            )
        )
        client.send(
            discovery_pb2.DiscoveryRequest(type_url=r.ROUTE_TYPE, resource_names=[GW.route_name])
        )
        rds = await client.receive()
        assert _names(rds) == [GW.route_name]
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ROUTE_TYPE,
                resource_names=[GW.route_name],
                version_info=rds.version_info,
                response_nonce=rds.nonce,
            )
        )
        # A weight change: the next response is EDS only (nothing else was pending).
        server.cache.publish(build_snapshot([workload("a", 5), workload("b", 2)], gateway=GW))
        push = await client.receive()
        assert push.type_url == r.ENDPOINT_TYPE
        assert push.version_info != eds.version_info
        # Reject it: recorded per node, counted, visible in the proxies view.
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE,
                resource_names=["default/a", "default/b"],
                version_info=eds.version_info,
                response_nonce=push.nonce,
                error_detail=status_pb2.Status(code=3, message="weights rejected"),
            )
        )
        # Subscribing to one more name (not yet known) changes nothing now; when it appears,
        # the next EDS response carries it and a new version: the rejected one never came back.
        server.cache.publish(build_snapshot([workload("a", 5), workload("b", 2)], gateway=GW))
        server.cache.publish(build_snapshot([workload("a", 6), workload("b", 2)], gateway=GW))
        after = await client.receive()
        assert after.type_url == r.ENDPOINT_TYPE
        assert after.version_info not in {eds.version_info, push.version_info}
        (nack,) = server.nacks("gw-1")
        assert (nack.type, nack.rejected_version, nack.accepted_version, nack.message) == (
            "eds",
            push.version_info,
            eds.version_info,
            "weights rejected",
        )
        (proxy,) = server.proxies()
        assert proxy.node_id == "gw-1"
        assert proxy.kind is StreamKind.SOTW
        views = {t.type: t for t in proxy.types}
        assert views["cds"].acked_version == cds.version_info
        assert views["eds"].last_nack == nack
        assert views["rds"].acked_version == rds.version_info
        assert _sample(server, "aviator_xds_connected_proxies", kind="sotw") == 1
        assert _sample(server, "aviator_xds_nacks_total", type="eds", kind="sotw") == 1
        assert _sample(server, "aviator_xds_acks_total", type="cds", kind="sotw") == 1
        assert _sample(server, "aviator_xds_pushes_total", type="eds", kind="sotw") == 3
    finally:
        client.close()
    for _ in range(100):  # the server notices the cancelled stream asynchronously
        if not server.proxies():
            break
        await asyncio.sleep(0.05)
    assert server.proxies() == ()
    assert _sample(server, "aviator_xds_connected_proxies", kind="sotw") == 0


async def test_delta_session_and_reconnect(server: AdsServer, channel: grpc.aio.Channel) -> None:
    client = AdsClient(channel, StreamKind.DELTA)
    try:
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "sc-1"})
        )
        cds = await client.receive()
        assert _names(cds) == ["default/a", "default/b"]
        held_cds = {x.name: x.version for x in cds.resources}
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, response_nonce=cds.nonce)
        )
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names_subscribe=["default/a", "default/b"]
            )
        )
        eds = await client.receive()
        assert _names(eds) == ["default/a", "default/b"]
        for res in eds.resources:
            assert res.version == server.cache.get(r.ENDPOINT_TYPE, res.name).version  # type: ignore[union-attr]
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.ENDPOINT_TYPE, response_nonce=eds.nonce)
        )
        # One weight changes: only that CLA is sent.
        server.cache.publish(build_snapshot([workload("a", 1), workload("b", 3)], gateway=GW))
        push = await client.receive()
        assert _names(push) == ["default/b"]
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.ENDPOINT_TYPE, response_nonce=push.nonce)
        )
        held_eds = {"default/a": eds.resources[0].version, "default/b": push.resources[0].version}
        # A workload goes: cluster removal first (this client holds no routes), its CLA only
        # after the CDS ACK.
        server.cache.publish(build_snapshot([workload("a", 1)], gateway=GW))
        removal = await client.receive()
        assert removal.type_url == r.CLUSTER_TYPE
        assert list(removal.removed_resources) == ["default/b"]
        client.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.CLUSTER_TYPE, response_nonce=removal.nonce
            )
        )
        cla_removal = await client.receive()
        assert cla_removal.type_url == r.ENDPOINT_TYPE
        assert list(cla_removal.removed_resources) == ["default/b"]
    finally:
        client.close()

    # Reconnect (a new stream) holding everything at current versions: nothing is resent.
    server.cache.publish(build_snapshot([workload("a", 1), workload("b", 3)], gateway=GW))
    again = AdsClient(channel, StreamKind.DELTA)
    try:
        again.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.CLUSTER_TYPE, node={"id": "sc-1"}, initial_resource_versions=held_cds
            )
        )
        cds2 = await again.receive()
        assert list(cds2.resources) == []  # the initial answer says: you are up to date
        assert list(cds2.removed_resources) == []
        again.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, response_nonce=cds2.nonce)
        )
        again.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.ENDPOINT_TYPE,
                resource_names_subscribe=["default/a", "default/b"],
                initial_resource_versions=held_eds,
            )
        )
        # Then ask for a name that does not exist: the next response must be that report,
        # proving the EDS re-subscription above sent nothing.
        again.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names_subscribe=["default/nope"]
            )
        )
        report = await again.receive()
        assert report.type_url == r.ENDPOINT_TYPE
        assert list(report.resources) == []
        assert list(report.removed_resources) == ["default/nope"]
    finally:
        again.close()


async def test_sotw_and_delta_streams_side_by_side(
    server: AdsServer, channel: grpc.aio.Channel
) -> None:
    sotw, delta = AdsClient(channel, StreamKind.SOTW), AdsClient(channel, StreamKind.DELTA)
    try:
        sotw.send(
            discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=["default/a"])
        )
        delta.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names_subscribe=["default/a"]
            )
        )
        s1, d1 = await sotw.receive(), await delta.receive()
        assert _names(s1) == _names(d1) == ["default/a"]
        sotw.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE,
                resource_names=["default/a"],
                version_info=s1.version_info,
                response_nonce=s1.nonce,
            )
        )
        delta.send(
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.ENDPOINT_TYPE, response_nonce=d1.nonce)
        )
        # The same serialised CLA reaches both kinds of stream.
        server.cache.publish(build_snapshot([workload("a", 9), workload("b", 2)], gateway=GW))
        s2, d2 = await sotw.receive(), await delta.receive()
        assert s2.resources[0].value == d2.resources[0].resource.value
        kinds = sorted(str(p.kind) for p in server.proxies())
        assert kinds == ["delta", "sotw"]
    finally:
        sotw.close()
        delta.close()


async def test_stop_ends_open_streams() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    ads = AdsServer(cache, identifier=IDENTIFIER)
    port = await ads.start("127.0.0.1:0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        client = AdsClient(ch, StreamKind.SOTW)
        client.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE))
        await client.receive()
        await ads.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):
            async with asyncio.timeout(TIMEOUT):
                await client.call.read()
        client.close()
    assert ads.proxies() == ()
    await ads.stop(0)  # idempotent


async def test_nack_of_a_bad_cluster_over_grpc(
    server: AdsServer, channel: grpc.aio.Channel
) -> None:
    client = AdsClient(channel, StreamKind.SOTW)
    try:
        client.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "gw-2"}))
        good = await client.receive()
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, version_info=good.version_info, response_nonce=good.nonce
            )
        )
        snap = build_snapshot([workload("a", 1), workload("b", 2)], gateway=GW)
        bad = r.build_cluster(WorkloadKey("default", "b"))
        bad.connect_timeout.seconds = -1
        entries = [
            e
            for t, es in snap.resources.items()
            for e in es.values()
            if not (t == r.CLUSTER_TYPE and e.name == "default/b")
        ]
        server.cache.publish(
            Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, bad)])
        )
        rejected = await client.receive()
        client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE,
                version_info=good.version_info,
                response_nonce=rejected.nonce,
                error_detail=status_pb2.Status(code=13, message="Invalid duration"),
            )
        )
        # The repaired state (a new workload as well) is the next CDS response.
        server.cache.publish(
            build_snapshot([workload("a", 1), workload("b", 2), workload("c", 1)], gateway=GW)
        )
        repaired = await client.receive()
        assert repaired.version_info not in {good.version_info, rejected.version_info}
        assert _names(repaired) == ["default/a", "default/b", "default/c"]
        (nack,) = server.nacks("gw-2")
        assert nack.message == "Invalid duration"
        assert nack.error_code == 13
    finally:
        client.close()


def _with_bad_cluster_b(server: AdsServer) -> None:
    snap = build_snapshot([workload("a", 1), workload("b", 2)], gateway=GW)
    bad = r.build_cluster(WorkloadKey("default", "b"))
    bad.connect_timeout.seconds = -1
    entries = [
        e
        for t, es in snap.resources.items()
        for e in es.values()
        if not (t == r.CLUSTER_TYPE and e.name == "default/b")
    ]
    server.cache.publish(
        Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, bad)])
    )


async def test_a_nacked_version_is_not_resent_to_the_node_after_it_reconnects(
    server: AdsServer, channel: grpc.aio.Channel
) -> None:
    """The stream breaks after a NACK and the same node opens a new one, holding the version it
    accepted: the rejected version is not sent on the new stream. Silence is proven by the next
    answer (EDS) arriving first; another node does get the version; a change reaches both."""
    first = AdsClient(channel, StreamKind.SOTW)
    try:
        first.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "gw-9"}))
        good = await first.receive()
        first.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, version_info=good.version_info, response_nonce=good.nonce
            )
        )
        _with_bad_cluster_b(server)
        rejected = await first.receive()
        first.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE,
                version_info=good.version_info,
                response_nonce=rejected.nonce,
                error_detail=status_pb2.Status(code=13, message="Invalid duration"),
            )
        )

        # Requests are handled in order: this answer means the NACK was.
        first.send(
            discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=["default/a"])
        )
        assert (await first.receive()).type_url == r.ENDPOINT_TYPE
        assert len(server.nacks("gw-9")) == 1
    finally:
        first.close()  # the stream breaks

    again = AdsClient(channel, StreamKind.SOTW)
    other = AdsClient(channel, StreamKind.SOTW)
    try:
        again.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, version_info=good.version_info, node={"id": "gw-9"}
            )
        )
        again.send(
            discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=["default/a"])
        )
        eds = await again.receive()
        assert eds.type_url == r.ENDPOINT_TYPE  # no CDS response came before it

        other.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, version_info=good.version_info, node={"id": "gw-10"}
            )
        )
        assert (await other.receive()).version_info == rejected.version_info

        server.cache.publish(
            build_snapshot([workload("a", 1), workload("b", 2), workload("c", 1)], gateway=GW)
        )
        repaired = await again.receive()
        assert repaired.type_url == r.CLUSTER_TYPE
        assert repaired.version_info not in {good.version_info, rejected.version_info}
        assert _names(repaired) == ["default/a", "default/b", "default/c"]
        assert (
            _sample(server, "aviator_xds_nacked_resends_suppressed_total", type="cds", kind="sotw")
            >= 1
        )
    finally:
        again.close()
        other.close()


async def test_many_streams_share_a_small_budget_of_bytes_in_flight() -> None:
    """Every workload changes at once for 20 streams, with room for two responses in flight:
    every stream still gets every CLA, and no more than the budget is ever being written."""
    from aviator.xds.server import ServerLimits

    fleet = [workload(f"w{i:02d}", *range(1, 11)) for i in range(30)]
    snapshot = build_snapshot(fleet)
    cache = Cache()
    cache.publish(snapshot)
    # Room for two responses of every CLA (~6 KB each) at once.
    limit = 2 * sum(e.any.ByteSize() for e in snapshot.resources[r.ENDPOINT_TYPE].values())
    ads = AdsServer(
        cache,
        identifier=IDENTIFIER,
        metrics_registry=CollectorRegistry(),
        limits=ServerLimits(max_bytes_in_flight=limit),
    )
    await ads.start("127.0.0.1:0")
    names = sorted(f"default/w{i:02d}" for i in range(30))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ads.port}") as ch:
            clients = [AdsClient(ch, StreamKind.SOTW) for _ in range(20)]
            firsts = []
            for c in clients:
                c.send(
                    discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=names)
                )
            for c in clients:
                first = await c.receive()
                assert _names(first) == names
                firsts.append(first)
            for c, first in zip(clients, firsts, strict=True):
                c.send(
                    discovery_pb2.DiscoveryRequest(
                        type_url=r.ENDPOINT_TYPE,
                        resource_names=names,
                        version_info=first.version_info,
                        response_nonce=first.nonce,
                    )
                )
            ads.servicer.budget.peak = 0
            waited = ads.servicer.budget.waited
            cache.publish(build_snapshot([workload(f"w{i:02d}", *range(2, 12)) for i in range(30)]))
            for c in clients:
                pushed = await c.receive()
                assert _names(pushed) == names
            assert ads.servicer.budget.peak <= limit
            assert ads.servicer.budget.waited > waited  # some had to wait their turn
            # Every share is given back (the server sees its writes complete a little after
            # the clients read them).
            async with asyncio.timeout(TIMEOUT):
                while ads.servicer.budget.in_flight:  # noqa: ASYNC110 (no event for it)
                    await asyncio.sleep(0.01)
            for c in clients:
                c.close()
    finally:
        await ads.stop(0)
