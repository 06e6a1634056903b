"""The control plane builds the listeners its connected gateways ask for, over real gRPC: a
gateway that connects before the source is read changes nothing until then (an empty snapshot
would withdraw every cluster a restarted control plane's Envoys hold), and gets its listener
with the first snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from aviator.controlplane import ControlPlane, Settings
from aviator.source.directory import DirectorySource
from aviator.source.store import Store
from aviator.xds import resources as r
from aviator.xds.protocol import StreamKind
from tests.envoy_fixtures import poll_until
from tests.integration.xds.test_ads_grpc import IDENTIFIER, TIMEOUT, AdsClient, _names

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "web"


class GatedSource:
    """A directory source that starts reading only when :attr:`gate` is set."""

    def __init__(self, path: Path) -> None:
        self.inner = DirectorySource(str(path))
        self.gate = asyncio.Event()

    @property
    def name(self) -> str:
        return self.inner.name

    async def run(self, store: Store) -> None:
        await self.gate.wait()
        await self.inner.run(store)


@contextlib.asynccontextmanager
async def running(cp: ControlPlane) -> AsyncIterator[None]:
    started = asyncio.Event()
    task = asyncio.create_task(cp.run(started=started))
    await started.wait()
    try:
        yield
    finally:
        cp.stop()
        await task


def gateway_node(node_id: str, port: int) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({r.META_MODE: "gateway", r.META_LISTEN_PORT: port})
    return base_pb2.Node(id=node_id, metadata=metadata)


async def test_a_gateway_connecting_before_the_source_is_read_changes_nothing_until_then(
    tmp_path: Path,
) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "web")
    source = GatedSource(tmp_path / "web")
    gateway = r.GatewayConfig(address="127.0.0.1", port=10000)
    cp = ControlPlane(
        Settings(
            source="dir:unused",
            xds_address="127.0.0.1:0",
            admin_address="127.0.0.1:0",
            gateway=gateway,
            identifier=IDENTIFIER,
        ),
        source=source,
    )
    wanted = r.ListenSpec("127.0.0.1", 44639)
    async with running(cp):
        assert cp.xds_port is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
            client = AdsClient(channel, StreamKind.SOTW)
            try:
                client.send(
                    discovery_pb2.DiscoveryRequest(
                        type_url=r.CLUSTER_TYPE, node=gateway_node("gw-1", wanted.port)
                    )
                )
                client.send(discovery_pb2.DiscoveryRequest(type_url=r.LISTENER_TYPE))

                async def told() -> bool:
                    await asyncio.sleep(0)
                    return cp.ads.wanted_listeners() == {wanted}

                await poll_until(told, within=TIMEOUT)
                cp.publisher.publish_now()  # whatever the news caused, published now
                assert not cp.cache.ready  # nothing was: no snapshot before the state

                source.gate.set()
                cds = await client.receive()
                assert cds.type_url == r.CLUSTER_TYPE
                assert _names(cds) == ["shop/web"]
                client.send(
                    discovery_pb2.DiscoveryRequest(
                        type_url=r.CLUSTER_TYPE,
                        version_info=cds.version_info,
                        response_nonce=cds.nonce,
                    )
                )
                lds = await client.receive()
                assert lds.type_url == r.LISTENER_TYPE
                assert _names(lds) == [wanted.listener_name]  # its own, not the default
                assert set(cp.cache.resources(r.LISTENER_TYPE)) == {
                    wanted.listener_name,
                    gateway.listener_name,
                }
            finally:
                client.close()
