"""Hostile and broken ADS streams over real gRPC (issue 14): each one is ended, or ignored,
with one log line that does not repeat what it sent, while a well-behaved client on the same
server keeps being sent every update.

Each test runs the well-behaved client (:class:`Watcher`) before, during and after the
hostile stream, and checks that it was answered a fresh update after the hostile stream was
dealt with: "the server did not notice" is shown, not assumed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import structlog
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from aviator.model import EndpointAddress, WeightedEndpoint, WeightedWorkload, WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.limits import StreamLimits
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer, ServerLimits
from aviator.xds.snapshot import build_snapshot
from tests.integration.xds.rawh2 import RawH2
from tests.integration.xds.test_ads_grpc import IDENTIFIER, AdsClient

TIMEOUT = 10
SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


def workload(name: str, weight: int, endpoints: int = 2) -> WeightedWorkload:
    return WeightedWorkload(
        WorkloadKey("default", name),
        8080,
        tuple(
            WeightedEndpoint(
                EndpointAddress(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", 8080), weight
            )
            for i in range(1, endpoints + 1)
        ),
    )


class Server:
    """An ADS server whose cache the test republishes (the weight of ``default/a`` moves)."""

    def __init__(self, ads: AdsServer, cache: Cache) -> None:
        self.ads, self.cache = ads, cache
        self.weight = 1
        self.extra: list[WeightedWorkload] = []

    def publish(self) -> int:
        self.weight += 1
        self.cache.publish(build_snapshot([workload("a", self.weight), *self.extra]))
        return self.weight

    def refused(self, kind: str, code: str) -> float:
        value = self.ads.metrics.registry.get_sample_value(
            "aviator_xds_streams_refused_total", {"kind": kind, "code": code}
        )
        return value or 0.0


async def start(limits: ServerLimits | None = None) -> Server:
    cache = Cache()
    ads = AdsServer(
        cache,
        identifier=IDENTIFIER,
        metrics_registry=CollectorRegistry(),
        gateway=None,
        limits=limits or ServerLimits(),
    )
    server = Server(ads, cache)
    server.publish()
    await ads.start("127.0.0.1:0")
    return server


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    # A short send timeout, for the stream that never reads (every other test is unaffected).
    s = await start(ServerLimits(send_timeout_s=1.0))
    yield s
    await s.ads.stop(0)


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ads.port}") as ch:
        yield ch


class Watcher:
    """A well-behaved SotW EDS client of ``default/a``: ACKs everything, records weights."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.client = AdsClient(channel, StreamKind.SOTW)
        self.weights: list[int] = []

    async def open(self) -> None:
        self.client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, node={"id": "good"}, resource_names=["default/a"]
            )
        )
        await self._take()

    async def _take(self) -> None:
        from tests.unit.xds.fakes import decode

        resp = await self.client.receive()
        cla = decode(r.ENDPOINT_TYPE, resp.resources[0])
        self.weights.append(cla.endpoints[0].lb_endpoints[0].load_balancing_weight.value)
        self.client.send(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE,
                version_info=resp.version_info,
                response_nonce=resp.nonce,
                resource_names=["default/a"],
            )
        )

    async def sees(self, server: Server) -> None:
        """A new weight published now reaches this client."""
        weight = server.publish()
        await self._take()
        assert self.weights[-1] == weight

    def close(self) -> None:
        self.client.close()


@pytest.fixture
async def watcher(channel: grpc.aio.Channel, server: Server) -> AsyncIterator[Watcher]:
    w = Watcher(channel)
    await w.open()
    yield w
    w.close()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


def raw_call(channel: grpc.aio.Channel, method: str) -> Any:
    """A stream call that sends bytes as they are (no serialiser)."""
    return channel.stream_stream(
        method, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )()


async def ended_with(call: Any) -> grpc.aio.AioRpcError:
    """The error that ends ``call`` (reading every response until then)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError as exc:
                return exc
            assert message is not grpc.aio.EOF, "the stream ended without an error"


def assert_not_logged(logs: list[dict[str, Any]], payload: str) -> None:
    for entry in logs:
        for value in entry.values():
            assert payload not in str(value), f"payload echoed in {entry['event']!r}"


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "ADS stream refused"]


async def test_garbage_ends_that_stream_with_invalid_argument(
    server: Server,
    channel: grpc.aio.Channel,
    watcher: Watcher,
    logs: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for method, kind in ((SOTW, "sotw"), (DELTA, "delta")):
        call = raw_call(channel, method)
        # Not a protobuf message: field 15, wire type 7 does not exist.
        garbage = b"\x7f\xff\xfeGARBAGE-PAYLOAD" * 100
        await call.write(garbage)
        error = await ended_with(call)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"a request of {len(garbage)} bytes is not a " + (
            "DiscoveryRequest" if kind == "sotw" else "DeltaDiscoveryRequest"
        )
        assert server.refused(kind, "INVALID_ARGUMENT") == 1
        await watcher.sees(server)
    # Invalid UTF-8 in a string field (type_url) is garbage too.
    call = raw_call(channel, SOTW)
    bad_utf8 = (
        discovery_pb2.DiscoveryRequest(type_url="x").SerializeToString().replace(b"x", b"\xff")
    )
    await call.write(bad_utf8)
    assert (await ended_with(call)).code() is grpc.StatusCode.INVALID_ARGUMENT
    await watcher.sees(server)
    assert len(refusals(logs)) == 3
    assert_not_logged(logs, "GARBAGE-PAYLOAD")
    # Nothing from gRPC itself: no "Exception deserializing request!" traceback.
    assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING], caplog.text


async def test_a_huge_node_id_ends_that_stream(
    server: Server, channel: grpc.aio.Channel, watcher: Watcher, logs: list[dict[str, Any]]
) -> None:
    node_id = "N" * 100_000
    for kind, request in (
        ("sotw", discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": node_id})),
        (
            "delta",
            discovery_pb2.DeltaDiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": node_id}),
        ),
    ):
        client = AdsClient(channel, StreamKind(kind))
        client.send(request)
        error = await ended_with(client.call)
        client.close()
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "node.id is 100000 bytes long; at most 1024 are allowed"
        await watcher.sees(server)
    assert [e["reason"] for e in refusals(logs)] == [error.details()] * 2
    assert_not_logged(logs, "N" * 200)
    assert server.ads.proxies()[0].node_id == "good"  # nothing of the refused ones is kept


async def test_100000_resource_names_end_that_stream(
    server: Server, channel: grpc.aio.Channel, watcher: Watcher, logs: list[dict[str, Any]]
) -> None:
    names = [f"default/w{i}" for i in range(100_000)]
    sotw = AdsClient(channel, StreamKind.SOTW)
    sotw.send(discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=names))
    error = await ended_with(sotw.call)
    sotw.close()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == (
        "resource_names: 100000 eds names subscribed; at most 16384 are allowed per type and stream"
    )
    await watcher.sees(server)
    # Delta: the limit holds across requests (each one small, together too many).
    delta = AdsClient(channel, StreamKind.DELTA)
    for i in range(0, 20_000, 5_000):
        delta.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names_subscribe=names[i : i + 5_000]
            )
        )
    error = await ended_with(delta.call)
    delta.close()
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details().startswith("resource_names: 20000 eds names subscribed")
    await watcher.sees(server)
    # One name of a megabyte.
    long = AdsClient(channel, StreamKind.SOTW)
    long.send(
        discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=["L" * 2**20])
    )
    error = await ended_with(long.call)
    long.close()
    assert (
        error.details() == "resource_names: a eds name of 1048576 bytes; at most 1024 are allowed"
    )
    await watcher.sees(server)
    assert len(refusals(logs)) == 3
    assert_not_logged(logs, "default/w1")
    assert_not_logged(logs, "L" * 200)


async def test_unknown_type_urls_are_ignored_then_the_stream_is_refused(
    server: Server, channel: grpc.aio.Channel, watcher: Watcher, logs: list[dict[str, Any]]
) -> None:
    client = AdsClient(channel, StreamKind.SOTW)
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    client.send(discovery_pb2.DiscoveryRequest(type_url=secret, node={"id": "curious"}))
    # Ignored, not answered: the next request, for clusters, gets the next (first) answer.
    client.send(discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE))
    cds = await client.receive()
    assert cds.type_url == r.CLUSTER_TYPE
    warned = [e for e in logs if e["event"].startswith("unsupported xDS type")]
    assert [(e["log_level"], e["type_url"]) for e in warned] == [("warning", secret)]
    await watcher.sees(server)
    # A hostile type URL is not written to the log, and many of them end the stream.
    for i in range(16):
        client.send(discovery_pb2.DiscoveryRequest(type_url=f"\x1b[2J-EVIL-{i}-" + "x" * 1000))
    error = await ended_with(client.call)
    client.close()
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(
        "type_url: 17 different unsupported types requested; at most 16 are ignored"
    )
    assert_not_logged(logs, "EVIL")
    await watcher.sees(server)


async def test_a_stream_that_never_reads_is_dropped(
    server: Server, watcher: Watcher, logs: list[dict[str, Any]]
) -> None:
    """A raw HTTP/2 client opens a stream with a flow-control window of 0 and never opens
    it, while its connection answers pings (so keepalive does not end it): the server's
    first response cannot be written, and after the send timeout the server drops the
    stream: its task, watches and gauge go, and the other stream is served throughout."""
    stalled = await RawH2.connect(server.ads.port)
    try:
        stalled.open_stream(
            1,
            SOTW,
            discovery_pb2.DiscoveryRequest(
                type_url=r.CLUSTER_TYPE, node={"id": "stalled"}
            ).SerializeToString(),
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while not refusals(logs):
            assert loop.time() < deadline, "the stalled stream was not dropped"
            await watcher.sees(server)  # updates keep flowing meanwhile
            await asyncio.sleep(0.05)
        [refusal] = refusals(logs)
        assert refusal["code"] == "UNAVAILABLE"
        assert refusal["node"] == "stalled"
        assert refusal["reason"] == (
            "the proxy took no response for 1 s (it stopped reading); reconnect"
        )
        await poll(lambda: [p.node_id for p in server.ads.proxies()] == ["good"])
        assert server.refused("sotw", "UNAVAILABLE") == 1
        await watcher.sees(server)
    finally:
        await stalled.close()


async def poll(check: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not check():
        assert loop.time() < deadline
        await asyncio.sleep(0.02)


def test_limits_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="max_names must be >= 1"):
        StreamLimits(max_names=0)
    with pytest.raises(ValueError, match="send_timeout_s must be > 0"):
        ServerLimits(send_timeout_s=0)
    with pytest.raises(ValueError, match="max_connection_age_s must be > 0 or None"):
        ServerLimits(max_connection_age_s=-1)
    assert ("grpc.max_connection_age_ms", 1_800_000) in ServerLimits().grpc_options()
    assert not any(
        k == "grpc.max_connection_age_ms"
        for k, _ in ServerLimits(max_connection_age_s=None).grpc_options()
    )
