"""Snapshots: consistency checks, content-hash versions, one serialisation per resource."""

from __future__ import annotations

import hashlib

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.snapshot import (
    ResourceEntry,
    Snapshot,
    SnapshotError,
    build_snapshot,
    content_version,
)
from tests.unit.xds.fakes import workload


def test_build_snapshot_has_a_cluster_and_endpoints_per_workload() -> None:
    snap = build_snapshot([workload("a", 1), workload("b", 2, 3)])
    assert set(snap.of_type(r.CLUSTER_TYPE)) == {"default/a", "default/b"}
    assert set(snap.of_type(r.ENDPOINT_TYPE)) == {"default/a", "default/b"}
    assert not snap.of_type(r.LISTENER_TYPE)
    assert not snap.of_type(r.ROUTE_TYPE)
    snap.check()


def test_gateway_snapshot_is_consistent() -> None:
    gateway = r.GatewayConfig()
    snap = build_snapshot([workload("a", 1)], gateway=gateway, grpc_api_listeners=True)
    assert set(snap.of_type(r.LISTENER_TYPE)) == {
        gateway.listener_name,
        "a.default",
        "a.default:8080",
    }
    assert set(snap.of_type(r.ROUTE_TYPE)) == {gateway.route_name, r.GRPC_ROUTE_NAME}
    assert snap.problems() == []


def test_duplicate_workloads_are_rejected() -> None:
    with pytest.raises(SnapshotError, match="default/a appears twice"):
        build_snapshot([workload("a", 1), workload("a", 2)])


def test_duplicate_resource_names_are_rejected() -> None:
    cluster = r.build_cluster(WorkloadKey("default", "a"))
    with pytest.raises(SnapshotError, match="duplicate cds resource 'default/a'"):
        Snapshot.from_messages(clusters=[cluster, cluster])


def test_every_broken_reference_is_reported() -> None:
    gateway = r.GatewayConfig()
    cla = r.build_load_assignment(workload("orphan", 1))
    zero = r.build_load_assignment(workload("zero", 1))
    zero.endpoints[0].lb_endpoints[0].load_balancing_weight.value = 0
    snap = Snapshot.from_messages(
        clusters=[
            r.build_cluster(WorkloadKey("default", "lonely")),
            r.build_cluster(WorkloadKey("default", "zero")),
        ],
        endpoints=[cla, zero],
        listeners=[r.build_listener(gateway)],
        routes=[
            r.build_route_configuration(r.GatewayConfig(route_name="other"), [workload("ghost", 1)])
        ],
    )
    with pytest.raises(SnapshotError) as exc:
        snap.check()
    assert exc.value.problems == (
        "cluster 'default/lonely' uses EDS name 'default/lonely' with no endpoints",
        "endpoints 'default/orphan' belong to no EDS cluster",
        "endpoints 'default/zero' carry load_balancing_weight 0",
        "route configuration 'other' routes to unknown cluster 'default/ghost'",
        "listener 'aviator-gateway-0.0.0.0-10000' uses unknown route configuration "
        "'aviator-gateway'",
    )


def test_entry_serialises_once_and_versions_by_content_hash() -> None:
    cla = r.build_load_assignment(workload("a", 5))
    entry = ResourceEntry.from_message(r.ENDPOINT_TYPE, cla)
    data = cla.SerializeToString(deterministic=True)
    assert entry.any.type_url == r.ENDPOINT_TYPE
    assert entry.any.value == data
    assert entry.version == hashlib.blake2b(data, digest_size=8).hexdigest()
    assert entry.delta_resource.name == "default/a"
    assert entry.delta_resource.version == entry.version
    assert entry.delta_resource.resource.value == data
    # Same content, new objects: same version. Different content: different version.
    again = ResourceEntry.from_message(r.ENDPOINT_TYPE, r.build_load_assignment(workload("a", 5)))
    other = ResourceEntry.from_message(r.ENDPOINT_TYPE, r.build_load_assignment(workload("a", 6)))
    assert again.version == entry.version
    assert other.version != entry.version


def test_entry_rejects_wrong_type_and_missing_name() -> None:
    with pytest.raises(TypeError, match=r"is not a envoy\.config\.cluster\.v3\.Cluster"):
        ResourceEntry.from_message(
            r.CLUSTER_TYPE, endpoint_pb2.ClusterLoadAssignment(cluster_name="x")
        )
    with pytest.raises(ValueError, match="without a name"):
        ResourceEntry.from_message(r.ENDPOINT_TYPE, endpoint_pb2.ClusterLoadAssignment())


def test_type_version_is_stable_across_builds_and_tracks_content() -> None:
    a = build_snapshot([workload("a", 1), workload("b", 2)])
    b = build_snapshot([workload("b", 2), workload("a", 1)])  # another order, another "boot"
    c = build_snapshot([workload("a", 1), workload("b", 3)])
    for t in (r.CLUSTER_TYPE, r.ENDPOINT_TYPE):
        assert a.type_version(t) == b.type_version(t)
    assert a.type_version(r.CLUSTER_TYPE) == c.type_version(r.CLUSTER_TYPE)  # clusters equal
    assert a.type_version(r.ENDPOINT_TYPE) != c.type_version(r.ENDPOINT_TYPE)


def test_content_version_distinguishes_removals_and_types() -> None:
    items = [("a", "v1")]
    assert content_version(r.CLUSTER_TYPE, items) != content_version(r.ENDPOINT_TYPE, items)
    assert content_version(r.CLUSTER_TYPE, items) != content_version(r.CLUSTER_TYPE, items, ["b"])
    assert content_version(r.CLUSTER_TYPE, [("a", "v1"), ("b", "v2")]) == content_version(
        r.CLUSTER_TYPE, [("b", "v2"), ("a", "v1")]
    )
    assert content_version(r.CLUSTER_TYPE, []) != content_version(r.CLUSTER_TYPE, [("", "")])


def test_snapshot_is_frozen() -> None:
    snap = build_snapshot([workload("a", 1)])
    with pytest.raises(AttributeError):
        snap.resources = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.resources[r.CLUSTER_TYPE] = {}  # type: ignore[index]
