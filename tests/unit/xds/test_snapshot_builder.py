"""SnapshotBuilder: the same snapshots as build_snapshot, rebuilding only what changed."""

from __future__ import annotations

import pytest

from aviator.model import WeightedWorkload
from aviator.xds import resources as r
from aviator.xds.snapshot import (
    Snapshot,
    SnapshotBuilder,
    SnapshotError,
    build_snapshot,
    content_version,
    entries_version,
)
from tests.unit.xds.fakes import workload

GW = r.GatewayConfig()


def _versions(snapshot: Snapshot) -> dict[str, dict[str, str]]:
    return {t: {n: e.version for n, e in es.items()} for t, es in snapshot.resources.items()}


def _build(builder: SnapshotBuilder, workloads: list[WeightedWorkload]) -> Snapshot:
    return builder.build(workloads, gateway=GW, grpc_api_listeners=True)


def test_builds_what_build_snapshot_builds() -> None:
    builder = SnapshotBuilder()
    first = [workload("a", 1, 2), workload("b", 3)]
    second = [workload("a", 5, 2), workload("b", 3), workload("c", 1, namespace="other")]
    for workloads in (first, second, first):
        built = _build(builder, workloads)
        expected = build_snapshot(workloads, gateway=GW, grpc_api_listeners=True)
        assert _versions(built) == _versions(expected)
        assert built.problems() == []


def test_unchanged_workloads_keep_their_entries() -> None:
    builder = SnapshotBuilder()
    before = _build(builder, [workload("a", 1, 2), workload("b", 3)])
    # Equal but not identical workload objects, as a producer re-creates them each time.
    after = _build(builder, [workload("a", 1, 2), workload("b", 4)])
    same = before.of_type(r.ENDPOINT_TYPE)["default/a"]
    assert after.of_type(r.ENDPOINT_TYPE)["default/a"] is same
    changed = after.of_type(r.ENDPOINT_TYPE)["default/b"]
    assert changed is not before.of_type(r.ENDPOINT_TYPE)["default/b"]
    assert changed.version != before.of_type(r.ENDPOINT_TYPE)["default/b"].version
    # Clusters, listeners and routes do not depend on weights.
    for type_url in (r.CLUSTER_TYPE, r.LISTENER_TYPE, r.ROUTE_TYPE):
        for name, entry in after.of_type(type_url).items():
            assert entry is before.of_type(type_url)[name], (type_url, name)


def test_routes_follow_the_set_of_workloads() -> None:
    builder = SnapshotBuilder()
    before = _build(builder, [workload("a", 1)])
    after = _build(builder, [workload("a", 1), workload("b", 1)])
    assert (
        after.of_type(r.ROUTE_TYPE)[GW.route_name]
        is not before.of_type(r.ROUTE_TYPE)[GW.route_name]
    )
    assert "default/b" in after.of_type(r.ROUTE_TYPE)[GW.route_name].refs
    removed = _build(builder, [workload("b", 1)])
    assert set(removed.of_type(r.CLUSTER_TYPE)) == {"default/b"}
    assert "default/a" not in removed.of_type(r.ROUTE_TYPE)[GW.route_name].refs


def test_a_failed_build_keeps_the_previous_entries() -> None:
    builder = SnapshotBuilder()
    before = _build(builder, [workload("a", 1)])
    with pytest.raises(SnapshotError, match="appears twice"):
        _build(builder, [workload("a", 1), workload("a", 2)])
    again = _build(builder, [workload("a", 1)])
    assert (
        again.of_type(r.ENDPOINT_TYPE)["default/a"] is before.of_type(r.ENDPOINT_TYPE)["default/a"]
    )


def test_entries_version_is_the_content_version() -> None:
    snapshot = build_snapshot([workload("a", 1), workload("b", 2), workload("c", 3)])
    entries = sorted(snapshot.of_type(r.ENDPOINT_TYPE).items())
    pairs = [(n, e.version) for n, e in entries]
    assert entries_version(r.ENDPOINT_TYPE, (e for _, e in entries)) == content_version(
        r.ENDPOINT_TYPE, pairs
    )
    removed = ["default/x", "default/w"]
    assert entries_version(r.ENDPOINT_TYPE, [], removed) == content_version(
        r.ENDPOINT_TYPE, [], removed
    )
    assert entries_version(r.ENDPOINT_TYPE, (e for _, e in entries[1:])) != content_version(
        r.ENDPOINT_TYPE, pairs
    )
