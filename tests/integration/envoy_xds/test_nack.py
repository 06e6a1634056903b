"""A resource Envoy rejects: Envoy keeps the old version, Aviator records Envoy's reason and
never sends that version again, and the next valid change is accepted."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from aviator.xds import resources as r
from aviator.xds.protocol import StreamKind
from aviator.xds.server import AdsServer
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot
from tests.envoy_fixtures import BackendFactory, poll_until
from tests.integration.envoy_xds.harness import (
    RDS_PREFIX,
    GatewayFactory,
    cluster_name,
    expected_hosts,
    gateway_config,
    holds,
    rejections,
    sample,
    versions,
    workload,
)

pytestmark = pytest.mark.envoy

CDS_REJECTED = "cluster_manager.cds.update_rejected"
CDS_VERSION = "cluster_manager.cds.version_text"


def with_bad_cluster(snapshot: Snapshot, name: str) -> Snapshot:
    """``snapshot`` with cluster ``name`` replaced by one whose connect timeout is negative:
    well-formed protobuf (Aviator's checks pass), but Envoy rejects it."""
    bad = cluster_pb2.Cluster()
    bad.CopyFrom(snapshot.of_type(r.CLUSTER_TYPE)[name].message)
    bad.connect_timeout.seconds = -1
    kept = [
        e
        for t, es in snapshot.resources.items()
        for e in es.values()
        if not (t == r.CLUSTER_TYPE and e.name == name)
    ]
    return Snapshot.from_entries([*kept, ResourceEntry.from_message(r.CLUSTER_TYPE, bad)])


@pytest.mark.parametrize("kind", [StreamKind.SOTW, StreamKind.DELTA])
async def test_rejected_cluster_is_recorded_not_resent_and_recovery_is_accepted(
    ads: AdsServer, gateways: GatewayFactory, http_backends: BackendFactory, kind: StreamKind
) -> None:
    web, cart = await http_backends("web-1"), await http_backends("cart-1")
    gw = await gateways(ads.port, delta=kind is StreamKind.DELTA)
    admin = gw.admin
    good = [workload("web", [web])]
    ads.cache.publish(build_snapshot(good, gateway=gw.config))
    await poll_until(lambda: holds(admin, expected_hosts(good)))
    accepted_version = (await versions(admin))[CDS_VERSION]
    labels = {"type": "cds", "kind": str(kind)}

    # 1. A cluster Envoy rejects.
    bad = with_bad_cluster(build_snapshot(good, gateway=gw.config), cluster_name("web"))
    ads.cache.publish(bad)

    async def rejected_once() -> bool:
        return (await admin.stats())[CDS_REJECTED] == 1 and len(ads.nacks()) == 1

    await poll_until(rejected_once)
    assert (await versions(admin))[CDS_VERSION] == accepted_version  # Envoy kept the old one
    (nack,) = ads.nacks()
    (proxy,) = ads.proxies()
    cds = next(t for t in proxy.types if t.type == "cds")
    assert (nack.node_id, nack.kind, nack.type) == (gw.node_id, kind, "cds")
    assert nack.rejected_version == cds.sent_version != accepted_version
    assert cds.acked_version == accepted_version
    assert cds.last_nack == nack
    # Envoy's own reason, verbatim (protobuf varies the spacing of its messages).
    assert "Expected positive duration" in nack.message
    assert "seconds: -1" in nack.message
    assert ads.nacks(gw.node_id) == (nack,)
    assert sample(ads, "aviator_xds_nacks_total", **labels) == 1
    pushes = sample(ads, "aviator_xds_pushes_total", **labels)
    # Answering the NACK itself, the server found nothing but the rejected version to send.
    suppressed = sample(ads, "aviator_xds_nacked_resends_suppressed_total", **labels)
    assert suppressed >= 1
    # Envoy still serves with the cluster it accepted.
    assert await gw.get("web.shop") == (200, "web-1")

    # 2. Not sent again. A route change (new domains) is pushed and ACKed; the ACK makes the
    # server re-evaluate clusters, which are still exactly the rejected version: withheld.
    domain = "example.internal"
    ads.cache.publish(
        with_bad_cluster(
            build_snapshot(good, gateway=gateway_config(gw.port, cluster_domain=domain)),
            cluster_name("web"),
        )
    )

    async def route_acked_cds_withheld() -> bool:
        stats = await admin.stats()
        return (
            stats[f"{RDS_PREFIX}.update_success"] >= 2
            and sample(ads, "aviator_xds_nacked_resends_suppressed_total", **labels) > suppressed
        )

    await poll_until(route_acked_cds_withheld)
    assert await gw.get("web.shop.svc.example.internal") == (200, "web-1")
    assert sample(ads, "aviator_xds_pushes_total", **labels) == pushes
    assert (await admin.stats())[CDS_REJECTED] == 1
    assert len(ads.nacks()) == 1

    # 3. A valid change (the repaired cluster and a new workload) is accepted.
    repaired = [workload("web", [web]), workload("cart", [cart])]
    ads.cache.publish(build_snapshot(repaired, gateway=gw.config))
    await poll_until(lambda: holds(admin, expected_hosts(repaired)))
    new_version = (await versions(admin))[CDS_VERSION]
    assert new_version not in {accepted_version, nack.rejected_version}
    (proxy,) = ads.proxies()
    assert next(t for t in proxy.types if t.type == "cds").acked_version == new_version
    rejected = await rejections(admin, ["shop/web", "shop/cart"])
    assert rejected.pop(CDS_REJECTED) == 1
    assert set(rejected.values()) == {0}
    assert len(ads.nacks()) == 1
    assert await gw.get("cart.shop") == (200, "cart-1")
    assert await gw.get("web.shop") == (200, "web-1")
