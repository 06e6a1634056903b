"""Limits of one ADS stream, without gRPC: the request queue is bounded, a refused stream
says which field and which limit, and the server's gRPC options fit the bootstrap's."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from aviator.envoy.bootstrap import XDS_CLUSTER, render_bootstrap
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.limits import StreamLimits, StreamRefusedError, shown
from aviator.xds.server import ServerLimits, run_stream
from aviator.xds.snapshot import build_snapshot
from aviator.xds.sotw import SotwStream
from tests.unit.xds.fakes import IDENTIFIER, workload


async def test_the_request_queue_of_a_stream_is_bounded() -> None:
    """A client sending without end, while the stream's responses are not taken (the write
    to the proxy is blocked): at most ``max_queued`` requests are read ahead."""
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    stream = SotwStream(cache, identifier=IDENTIFIER)
    pulled = itertools.count()

    async def flood() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        for i in pulled:
            # A new name list each time: every request needs handling (only the first
            # names a workload that exists: it is answered).
            yield discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names=["default/a", f"default/w{i}"]
            )
            await asyncio.sleep(0)

    responses = run_stream(stream, flood(), max_queued=8)
    async with asyncio.timeout(5):
        first = await anext(responses)  # then nobody takes the next one
    assert first.message().type_url == r.ENDPOINT_TYPE
    for _ in range(200):
        await asyncio.sleep(0)
    read = next(pulled)
    await responses.aclose()
    # 8 queued, one being handled, one the reader holds while it waits for room.
    assert 8 <= read <= 11, read


def test_a_refused_stream_names_the_field_and_the_limit() -> None:
    stream = SotwStream(Cache(), identifier=IDENTIFIER, limits=StreamLimits(max_names=3))
    with pytest.raises(StreamRefusedError) as info:
        stream.handle(
            discovery_pb2.DiscoveryRequest(
                type_url=r.ENDPOINT_TYPE, resource_names=["a", "b", "c", "d"]
            )
        )
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert info.value.message == (
        "resource_names: 4 eds names subscribed; at most 3 are allowed per type and stream"
    )


def test_client_strings_are_shown_only_when_short_and_printable() -> None:
    assert shown("type.googleapis.com/x.y") == "type.googleapis.com/x.y"
    assert shown("\x1b[2Jhello") == "<9 bytes, not shown>"
    assert shown("é" * 10) == "<20 bytes, not shown>"
    assert shown("x" * 129) == "<129 bytes, not shown>"


def test_the_server_accepts_the_keepalive_pings_of_the_bootstraps_it_goes_with() -> None:
    """gRPC sends GOAWAY ("too_many_pings") to a client pinging more often than
    ``min_client_ping_interval_s`` without data: Envoy's interval must not be shorter."""
    bootstrap = render_bootstrap(xds_host="127.0.0.1", xds_port=18000, node_id="n")
    [xds] = [c for c in bootstrap["static_resources"]["clusters"] if c["name"] == XDS_CLUSTER]
    options = xds["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    interval = float(options["interval"].removesuffix("s"))
    assert interval >= ServerLimits().min_client_ping_interval_s
    # And the server's own pings give up on a dead peer well before the connection's age.
    limits = ServerLimits()
    assert limits.max_connection_age_s is not None
    assert limits.keepalive_time_s + limits.keepalive_timeout_s < limits.max_connection_age_s
