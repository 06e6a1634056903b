"""The servicer methods driven directly: async request iterator, fake context, fake time.

Every response is checked on arrival: fresh unique nonce, identifier set, and never a version
the test proxy has NACKed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry

from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot
from tests.unit.xds.fakes import IDENTIFIER, decode, workload


class FakeContext:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


class Client:
    """One stream through the servicer, checking every response."""

    def __init__(self, server: AdsServer, kind: StreamKind) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        method = (
            server.servicer.StreamAggregatedResources
            if kind is StreamKind.SOTW
            else server.servicer.DeltaAggregatedResources
        )
        self.responses: AsyncIterator[Any] = method(self._iterate(), FakeContext())
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        # Pump the generator from its own task: cancelling a pending anext() would close it.
        self.pump = asyncio.ensure_future(self._pump())
        self.nonces: set[str] = set()
        self.nacked: set[tuple[str, str]] = set()

    async def _pump(self) -> None:
        try:
            async for resp in self.responses:
                # The servicer yields shared bodies with a nonce: parse the bytes gRPC sends.
                self.inbox.put_nowait(resp.message())
        finally:
            self.inbox.put_nowait(None)  # end of stream

    async def _iterate(self) -> AsyncIterator[Any]:
        while (request := await self.requests.get()) is not None:
            yield request

    def send(self, request: Any) -> None:
        self.requests.put_nowait(request)

    async def receive(self) -> Any:
        """The next response; fails after 5 s of (fake) loop time."""
        async with asyncio.timeout(5):
            resp = await self.inbox.get()
        assert resp is not None, "stream ended"
        assert resp.nonce
        assert resp.nonce not in self.nonces
        self.nonces.add(resp.nonce)
        assert resp.control_plane.identifier == IDENTIFIER
        version = getattr(resp, "version_info", "") or getattr(resp, "system_version_info", "")
        assert (resp.type_url, version) not in self.nacked
        return resp

    async def nothing(self) -> None:
        """No response within 5 s of (fake) loop time."""
        with pytest.raises(TimeoutError):
            await self.receive()


def _server(cache: Cache) -> AdsServer:
    return AdsServer(cache, identifier=IDENTIFIER, metrics_registry=CollectorRegistry())


@pytest.mark.looptime
async def test_sotw_stream_through_the_servicer() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    server = _server(cache)
    client = Client(server, StreamKind.SOTW)
    client.send(
        discovery_pb2.DiscoveryRequest(
            type_url=r.ENDPOINT_TYPE, resource_names=["default/a"], node={"id": "n1"}
        )
    )
    first = await client.receive()
    assert first.type_url == r.ENDPOINT_TYPE
    (proxy,) = server.proxies()
    assert (proxy.node_id, proxy.kind) == ("n1", StreamKind.SOTW)
    assert (
        server.metrics.registry.get_sample_value("aviator_xds_connected_proxies", {"kind": "sotw"})
        == 1
    )
    client.send(
        discovery_pb2.DiscoveryRequest(
            type_url=r.ENDPOINT_TYPE,
            resource_names=["default/a"],
            version_info=first.version_info,
            response_nonce=first.nonce,
        )
    )
    await client.nothing()  # an ACK is not answered
    cache.publish(build_snapshot([workload("a", 2)]))
    pushed = await client.receive()  # the cache woke the stream
    assert pushed.version_info != first.version_info
    # NACK it; the same content published again is not resent.
    client.nacked.add((r.ENDPOINT_TYPE, pushed.version_info))
    client.send(
        discovery_pb2.DiscoveryRequest(
            type_url=r.ENDPOINT_TYPE,
            resource_names=["default/a"],
            version_info=first.version_info,
            response_nonce=pushed.nonce,
            error_detail=status_pb2.Status(code=3, message="no"),
        )
    )
    await client.nothing()
    (nack,) = server.nacks("n1")
    assert nack.rejected_version == pushed.version_info
    assert nack.accepted_version == first.version_info
    cache.publish(build_snapshot([workload("a", 3)]))
    assert (await client.receive()).version_info not in {first.version_info, pushed.version_info}
    # The client half-closes: the stream ends and forgets its watches.
    client.send(None)
    assert await asyncio.wait_for(client.inbox.get(), 5) is None
    await client.pump
    assert server.proxies() == ()
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 0
    assert (
        server.metrics.registry.get_sample_value("aviator_xds_connected_proxies", {"kind": "sotw"})
        == 0
    )
    assert server.nacks("n1") == (nack,)  # the record outlives the stream


@pytest.mark.looptime
async def test_delta_stream_through_the_servicer() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    server = _server(cache)
    client = Client(server, StreamKind.DELTA)
    client.send(discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": "d1"}))
    cds = await client.receive()
    assert sorted(x.name for x in cds.resources) == ["default/a", "default/b"]
    client.send(
        discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, response_nonce=cds.nonce)
    )
    client.send(
        discovery_pb2.DeltaDiscoveryRequest(
            type_url=r.ENDPOINT_TYPE, resource_names_subscribe=["default/a"]
        )
    )
    eds = await client.receive()
    assert [x.name for x in eds.resources] == ["default/a"]
    client.send(
        discovery_pb2.DeltaDiscoveryRequest(type_url=r.ENDPOINT_TYPE, response_nonce=eds.nonce)
    )
    await client.nothing()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 9)]))  # b: not subscribed to EDS
    await client.nothing()
    (proxy,) = server.proxies()
    assert proxy.kind is StreamKind.DELTA
    assert {t.type: t.acked_version for t in proxy.types} == {
        "cds": cds.system_version_info,
        "eds": eds.system_version_info,
    }
    client.pump.cancel()  # what grpc does when the peer goes away
    with pytest.raises(asyncio.CancelledError):
        await client.pump
    assert server.proxies() == ()
    assert cache.watcher_count(r.CLUSTER_TYPE) == 1  # the server's ChangeTimes (metrics)


@pytest.mark.looptime
async def test_stream_is_cleaned_up_when_cancelled() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    server = _server(cache)
    client = Client(server, StreamKind.SOTW)
    client.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE))
    await client.receive()
    assert len(server.proxies()) == 1
    await asyncio.sleep(1)
    client.pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client.pump
    assert server.proxies() == ()
    assert cache.watcher_count(r.CLUSTER_TYPE) == 1  # the server's ChangeTimes (metrics)


@pytest.mark.looptime
async def test_read_error_ends_the_stream_with_that_error() -> None:
    cache = Cache()
    cache.publish(build_snapshot([]))
    server = _server(cache)

    async def broken() -> AsyncIterator[Any]:
        yield discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE)
        raise ConnectionResetError("peer went away")

    responses = server.servicer.StreamAggregatedResources(broken(), FakeContext())
    first = await anext(responses)
    assert first.message().type_url == r.CLUSTER_TYPE
    with pytest.raises(ConnectionResetError, match="peer went away"):
        await anext(responses)
    assert server.proxies() == ()


def test_server_needs_an_identifier() -> None:
    with pytest.raises(ValueError, match="identifier"):
        AdsServer(Cache(), identifier="")


def test_two_servers_have_separate_metrics() -> None:
    one, two = AdsServer(Cache(), identifier="x"), AdsServer(Cache(), identifier="y")
    assert one.metrics.registry is not two.metrics.registry


def _hello(kind: StreamKind, node_id: str, meta: dict[str, Any], type_url: str) -> Any:
    metadata = struct_pb2.Struct()
    metadata.update(meta)
    node = base_pb2.Node(id=node_id, metadata=metadata)
    if kind is StreamKind.SOTW:
        return discovery_pb2.DiscoveryRequest(type_url=type_url, node=node)
    return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, node=node)


async def _ended(client: Client) -> None:
    client.send(None)
    while await asyncio.wait_for(client.inbox.get(), 5) is not None:
        pass
    await client.pump


@pytest.mark.looptime
async def test_the_server_tells_which_gateway_listeners_its_nodes_want() -> None:
    gw = r.GatewayConfig(address="127.0.0.1", port=10000)
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)], gateway=gw))
    told: list[frozenset[r.ListenSpec]] = []
    server = AdsServer(
        cache,
        identifier=IDENTIFIER,
        metrics_registry=CollectorRegistry(),
        gateway=gw,
        on_listeners=told.append,
    )
    a = r.ListenSpec("127.0.0.1", 44639)
    port_a = {r.META_MODE: "gateway", r.META_LISTEN_PORT: a.port}
    one = Client(server, StreamKind.SOTW)
    one.send(_hello(StreamKind.SOTW, "gw-1", port_a, r.CLUSTER_TYPE))
    await one.receive()
    assert told == [frozenset({a})]
    two = Client(server, StreamKind.DELTA)  # a second gateway on the same port: no news
    two.send(_hello(StreamKind.DELTA, "gw-2", port_a, r.CLUSTER_TYPE))
    await two.receive()
    sidecar = Client(server, StreamKind.SOTW)  # a sidecar wants no gateway listener
    sidecar.send(_hello(StreamKind.SOTW, "sc", {r.META_MODE: "sidecar"}, r.CLUSTER_TYPE))
    await sidecar.receive()
    assert told == [frozenset({a})]
    plain = Client(server, StreamKind.SOTW)  # no metadata: the default
    plain.send(_hello(StreamKind.SOTW, "gw-3", {}, r.CLUSTER_TYPE))
    await plain.receive()
    assert told[-1] == server.wanted_listeners() == frozenset({a, gw.default})
    await _ended(one)  # gw-2 still wants it
    assert len(told) == 2
    two.pump.cancel()
    with pytest.raises(asyncio.CancelledError):
        await two.pump
    assert told[-1] == server.wanted_listeners() == frozenset({gw.default})
    await _ended(plain)
    await _ended(sidecar)
    assert told[-1] == server.wanted_listeners() == frozenset()


@pytest.mark.looptime
@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_a_gateway_gets_its_listener_once_the_producer_builds_it(kind: StreamKind) -> None:
    """What the control plane does: told a node wants a listener, it builds it in."""
    cache = Cache()
    workloads = [workload("a", 1)]
    cache.publish(build_snapshot(workloads, gateway=r.GatewayConfig()))

    def rebuild(listeners: frozenset[r.ListenSpec]) -> None:
        cache.publish(build_snapshot(workloads, gateway=r.GatewayConfig(), listeners=listeners))

    server = AdsServer(
        cache, identifier=IDENTIFIER, metrics_registry=CollectorRegistry(), on_listeners=rebuild
    )
    client = Client(server, kind)
    client.send(_hello(kind, "gw", {r.META_LISTEN_PORT: 44639}, r.LISTENER_TYPE))
    lds = await client.receive()
    if kind is StreamKind.SOTW:
        names = [
            r.resource_name(r.LISTENER_TYPE, decode(r.LISTENER_TYPE, x)) for x in lds.resources
        ]
    else:
        names = [x.name for x in lds.resources]
    assert names == ["aviator-gateway-0.0.0.0-44639"]
    await _ended(client)
    assert set(cache.resources(r.LISTENER_TYPE)) == {"aviator-gateway-0.0.0.0-10000"}
