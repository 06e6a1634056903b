"""CSDS on the ADS port, asked about a real Envoy: what it holds, then a NACK with Envoy's own
message; and the same through ``aviator inspect --csds``."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2

from aviator.xds import resources as r
from aviator.xds.csds import SERVICE
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import build_snapshot
from tests.envoy_fixtures import BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    GatewayFactory,
    cluster_name,
    expected_hosts,
    holds,
    versions,
    workload,
)
from tests.integration.envoy_xds.test_nack import with_bad_cluster

pytestmark = pytest.mark.envoy

Status = dict[tuple[str, str], tuple[str, str, str]]


@pytest.fixture
async def csds(ads: AdsServer) -> AsyncIterator[csds_pb2_grpc.ClientStatusDiscoveryServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ads.port}") as channel:
        yield csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)


def statuses(config: csds_pb2.ClientConfig) -> Status:
    """(type, name) → (client status, config status, version) of one node."""
    assert all(c.type_url in r.TYPE_SHORT for c in config.generic_xds_configs)
    return {
        (r.TYPE_SHORT[c.type_url], c.name): (
            dump_pb2.ClientResourceStatus.Name(c.client_status),
            csds_pb2.ConfigStatus.Name(c.config_status),
            c.version_info,
        )
        for c in config.generic_xds_configs
    }


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_csds_shows_what_envoy_holds_and_what_it_rejected(
    ads: AdsServer,
    gateways: GatewayFactory,
    http_backends: BackendFactory,
    csds: csds_pb2_grpc.ClientStatusDiscoveryServiceStub,
    kind: StreamKind,
) -> None:
    web = await http_backends("web-1")
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    good = [workload("web", [web])]
    snapshot = build_snapshot(good, gateway=gw.config)
    ads.cache.publish(snapshot)
    await poll_until(lambda: holds(gw.admin, expected_hosts(good)))

    response = await csds.FetchClientStatus(csds_pb2.ClientStatusRequest())
    (config,) = response.config
    assert config.node.id == gw.node_id
    web_cluster = cluster_name("web")
    listener = gw.config.listener_name
    cla = snapshot.of_type(r.ENDPOINT_TYPE)[web_cluster]
    expected = {
        ("cds", web_cluster): snapshot.of_type(r.CLUSTER_TYPE)[web_cluster].version,
        ("eds", web_cluster): cla.version,
        ("lds", listener): snapshot.of_type(r.LISTENER_TYPE)[listener].version,
        ("rds", gw.config.route_name): snapshot.of_type(r.ROUTE_TYPE)[gw.config.route_name].version,
    }
    assert statuses(config) == {
        key: ("ACKED", "SYNCED", version) for key, version in expected.items()
    }
    # Contents by default: the CLA Envoy holds, as sent.
    eds = next(c for c in config.generic_xds_configs if c.type_url == r.ENDPOINT_TYPE)
    assert eds.xds_config == cla.any
    # ... and none when asked so; a matcher naming another node gets no node.
    bare = await csds.FetchClientStatus(
        csds_pb2.ClientStatusRequest(exclude_resource_contents=True)
    )
    assert not any(c.HasField("xds_config") for c in bare.config[0].generic_xds_configs)
    other = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(exact="someone-else"))
    none = await csds.FetchClientStatus(csds_pb2.ClientStatusRequest(node_matchers=[other]))
    assert list(none.config) == []

    # A cluster Envoy rejects: CSDS says NACKED, with Envoy's message and the rejected version.
    accepted = (await versions(gw.admin))["cluster_manager.cds.version_text"]
    bad = with_bad_cluster(snapshot, web_cluster)
    ads.cache.publish(bad)
    await poll_until(lambda: asyncio.sleep(0, len(ads.nacks()) == 1))
    assert (await versions(gw.admin))["cluster_manager.cds.version_text"] == accepted
    prefix = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(prefix=gw.node_id[:3]))
    (config,) = (
        await csds.FetchClientStatus(csds_pb2.ClientStatusRequest(node_matchers=[prefix]))
    ).config
    cds = next(
        c
        for c in config.generic_xds_configs
        if (c.type_url, c.name) == (r.CLUSTER_TYPE, web_cluster)
    )
    assert dump_pb2.ClientResourceStatus.Name(cds.client_status) == "NACKED"
    assert csds_pb2.ConfigStatus.Name(cds.config_status) == "ERROR"
    assert cds.version_info == expected[("cds", web_cluster)]  # what Envoy still runs
    rejected = bad.of_type(r.CLUSTER_TYPE)[web_cluster]
    assert cds.error_state.version_info == rejected.version
    assert "Expected positive duration" in cds.error_state.details
    assert cds.error_state.details == ads.nacks()[0].message
    assert cds.error_state.failed_configuration == rejected.any
    # Everything else is still held as it was.
    rest = statuses(config)
    del rest[("cds", web_cluster)]
    assert set(rest.values()) <= {("ACKED", "SYNCED", v) for v in expected.values()}

    # The same through the command line, as a table and as JSON.
    table = await _inspect("--csds", f"127.0.0.1:{ads.port}")
    assert gw.node_id in table
    line = next(ln for ln in table.splitlines() if " cds " in f" {ln} ")
    assert "NACKED" in line
    assert "Expected positive duration" in table
    report = json.loads(await _inspect("--csds", f"127.0.0.1:{ads.port}", "--json"))
    (node,) = report["nodes"]
    assert node["node"] == gw.node_id
    by_key = {(x["type"], x["name"]): x for x in node["resources"]}
    assert by_key[("cds", web_cluster)]["status"] == "NACKED"
    assert by_key[("eds", web_cluster)] == {
        "type": "eds",
        "name": web_cluster,
        "status": "ACKED",
        "config_status": "SYNCED",
        "version": cla.version,
        "error": None,
    }


async def test_csds_refuses_what_it_does_not_support(
    ads: AdsServer, csds: csds_pb2_grpc.ClientStatusDiscoveryServiceStub
) -> None:
    regex = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(safe_regex={"regex": "(a+)+$"}))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await csds.FetchClientStatus(csds_pb2.ClientStatusRequest(node_matchers=[regex]))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "safe_regex is not supported" in (info.value.details() or "")
    # Bytes that are not a request: refused, with the size and no traceback.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ads.port}") as channel:
        raw = channel.unary_unary(f"/{SERVICE}/FetchClientStatus")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff garbage")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "a request of 11 bytes is not a ClientStatusRequest"
    # The streaming RPC answers each request, and refuses the same way.
    call = csds.StreamClientStatus()
    await call.write(csds_pb2.ClientStatusRequest())
    assert list((await call.read()).config) == []
    await call.write(csds_pb2.ClientStatusRequest(node_matchers=[regex]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def _inspect(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aviator", "inspect", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()
