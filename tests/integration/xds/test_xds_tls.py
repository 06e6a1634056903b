"""xDS over TLS and mutual TLS with real gRPC clients (issue 14): a client without a valid
certificate is refused in the handshake; certificates are re-read when their files change, a
bad rotation keeps the previous ones; an allow-list of node ids refuses the others."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client import CollectorRegistry

from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.limits import StreamLimits
from aviator.xds.server import AdsServer, ServerLimits, ServerTls
from aviator.xds.snapshot import build_snapshot
from tests.integration.xds.certs import Pair, make_ca, make_leaf
from tests.integration.xds.test_ads_grpc import IDENTIFIER, workload

TIMEOUT = 10


class Pki:
    def __init__(self, d: Path) -> None:
        self.ca = make_ca(d, "ca")
        self.server = make_leaf(d, "server", self.ca, server=True)
        self.client = make_leaf(d, "client", self.ca, server=False)
        self.other_ca = make_ca(d, "other-ca")
        self.stranger = make_leaf(d, "stranger", self.other_ca, server=False)
        self.other_server = make_leaf(d, "other-server", self.other_ca, server=True)
        # What the server reads: copies it can be told to rotate.
        self.live = Pair(d / "live.crt", d / "live.key")
        self.install(self.server)

    def install(self, pair: Pair) -> None:
        """Replace the server's files as cert-manager does: write aside, rename over."""
        for src, dst in ((pair.cert, self.live.cert), (pair.key, self.live.key)):
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


async def _server(
    pki: Pki, *, mutual: bool = True, nodes: frozenset[str] | None = None
) -> AdsServer:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    ads = AdsServer(
        cache,
        identifier=IDENTIFIER,
        metrics_registry=CollectorRegistry(),
        gateway=None,
        tls=ServerTls(str(pki.live.cert), str(pki.live.key), str(pki.ca.cert) if mutual else None),
        limits=ServerLimits(stream=StreamLimits(allowed_nodes=nodes)),
    )
    await ads.start("127.0.0.1:0")
    return ads


@pytest.fixture
async def ads(pki: Pki) -> AsyncIterator[AdsServer]:
    server = await _server(pki)
    yield server
    await server.stop(0)


def _credentials(ca: Path, client: Pair | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def _cds(port: int, *, ca: Path | None, client: Pair | None, node: str = "n") -> str:
    """One CDS request (over TLS unless ``ca`` is None): the response's type URL, or the
    gRPC status code name."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if ca is None
        else grpc.aio.secure_channel(target, _credentials(ca, client))
    )
    async with channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        try:
            async with asyncio.timeout(TIMEOUT):
                await call.write(
                    discovery_pb2.DiscoveryRequest(type_url=r.CLUSTER_TYPE, node={"id": node})
                )
                response = await call.read()
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        finally:
            call.cancel()
    return str(response.type_url)


async def test_mutual_tls_serves_a_client_with_a_valid_certificate_only(
    ads: AdsServer, pki: Pki
) -> None:
    assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client) == r.CLUSTER_TYPE
    assert await _cds(ads.port, ca=pki.ca.cert, client=None) == "UNAVAILABLE"
    assert await _cds(ads.port, ca=pki.ca.cert, client=pki.stranger) == "UNAVAILABLE"
    assert await _cds(ads.port, ca=None, client=None) == "UNAVAILABLE"  # plaintext
    # The server itself does not trust a client that cannot check it.
    assert await _cds(ads.port, ca=pki.other_ca.cert, client=pki.client) == "UNAVAILABLE"
    assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client) == r.CLUSTER_TYPE


async def test_the_certificate_is_reloaded_when_its_files_change(ads: AdsServer, pki: Pki) -> None:
    assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client) == r.CLUSTER_TYPE
    pki.install(pki.other_server)
    # New connections get the new certificate: clients trusting its CA are served now...
    assert await _cds(ads.port, ca=pki.other_ca.cert, client=pki.client) == r.CLUSTER_TYPE
    assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client) == "UNAVAILABLE"
    assert ads.certificates is not None
    assert ads.certificates.reloads == 1
    # ...and a broken rotation (the key of another certificate) keeps the one in use.
    shutil.copyfile(pki.server.key, pki.live.key)
    assert await _cds(ads.port, ca=pki.other_ca.cert, client=pki.client) == r.CLUSTER_TYPE
    assert ads.certificates.reloads == 1


async def test_a_server_does_not_start_without_readable_certificates(pki: Pki) -> None:
    ads = AdsServer(
        Cache(),
        identifier=IDENTIFIER,
        tls=ServerTls(str(pki.server.cert), str(pki.client.key)),  # not its key
    )
    with pytest.raises(OSError, match="cannot load the xDS TLS files"):
        await ads.start("127.0.0.1:0")


async def test_only_allowed_node_ids_are_served(pki: Pki) -> None:
    ads = await _server(pki, nodes=frozenset({"gw-1"}))
    try:
        assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client, node="gw-1") == (
            r.CLUSTER_TYPE
        )
        assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client, node="gw-2") == (
            "PERMISSION_DENIED"
        )
        assert await _cds(ads.port, ca=pki.ca.cert, client=pki.client, node="") == (
            "PERMISSION_DENIED"
        )
    finally:
        await ads.stop(0)
