"""A rejected version is remembered per node, not per stream (XDS-CHECKLIST: "do not send that
same version again"): a proxy that reconnects is not sent again what it rejected; another node
is; any change of the desired state is.

Each reconnect here is a new protocol stream sharing the server's :class:`RejectedVersions`,
as two ADS streams of one server do.
"""

from __future__ import annotations

import pytest

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.nacks import RejectedVersions
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot
from tests.unit.xds.fakes import DeltaProxy, SotwProxy, workload


def _bad() -> Snapshot:
    """Workload ``a`` whose cluster Envoy rejects (negative connect timeout)."""
    snap = build_snapshot([workload("a", 1)])
    cluster = r.build_cluster(WorkloadKey("default", "a"))
    cluster.connect_timeout.seconds = -1
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.CLUSTER_TYPE]
    return Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, cluster)])


def _suppressed(proxy: SotwProxy | DeltaProxy, kind: str) -> float:
    labels = {"type": "cds", "kind": kind}
    value = proxy.metrics.registry.get_sample_value(
        "aviator_xds_nacked_resends_suppressed_total", labels
    )
    return value or 0.0


def test_sotw_a_reconnected_node_is_not_sent_what_it_rejected() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    rejected = RejectedVersions()
    first = SotwProxy(cache, "gw-7", rejected=rejected)
    (good,) = first.request(r.CLUSTER_TYPE, [])
    first.ack(good)
    cache.publish(_bad())
    (bad,) = first.flush()
    first.nack(bad, "Invalid duration")
    first.stream.close()  # the stream breaks; Envoy reconnects

    # Back with what it holds (SotW: the version it accepted): the rejected one is withheld.
    again = SotwProxy(cache, "gw-7", rejected=rejected)
    again.nacked = {r.CLUSTER_TYPE: {bad.version_info}}  # the fake checks it is never sent
    assert again.request(r.CLUSTER_TYPE, [], version=good.version_info) == []
    assert _suppressed(again, "sotw") == 1
    # A request for another type is answered: the stream is alive, only that version is held.
    (eds,) = again.request(r.ENDPOINT_TYPE, ["default/a"], version="")
    assert again.names(eds) == ["default/a"]

    # Another node has rejected nothing: it gets the current state.
    other = SotwProxy(cache, "gw-8", rejected=rejected)
    (sent,) = other.request(r.CLUSTER_TYPE, [], version=good.version_info)
    assert sent.version_info == bad.version_info

    # The desired state changes: the reconnected node gets the new version.
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    (fixed,) = again.flush()
    assert sorted(again.names(fixed)) == ["default/a", "default/b"]
    again.ack(fixed)
    # And going back to the rejected content is withheld from it again.
    cache.publish(_bad())
    assert again.flush() == []


def test_sotw_a_restarted_proxy_with_nothing_gets_the_current_state() -> None:
    """A fresh Envoy (no version_info) holds no cluster at all: withholding would leave it with
    none, while Envoy applies the valid clusters of a response it rejects."""
    cache = Cache()
    cache.publish(_bad())
    rejected = RejectedVersions()
    first = SotwProxy(cache, "gw-7", rejected=rejected)
    (bad,) = first.request(r.CLUSTER_TYPE, [])
    first.nack(bad)
    first.stream.close()
    restarted = SotwProxy(cache, "gw-7", rejected=rejected)
    (resp,) = restarted.request(r.CLUSTER_TYPE, [])  # version_info ""
    assert resp.version_info == bad.version_info
    # Rejected again on this stream: not sent again on it.
    restarted.nack(resp)
    assert restarted.request(r.CLUSTER_TYPE, []) == []


def test_delta_a_reconnected_node_is_not_sent_what_it_rejected() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    rejected = RejectedVersions()
    first = DeltaProxy(cache, "sc-1", rejected=rejected)
    first.ack(first.request(r.CLUSTER_TYPE)[0])
    held = dict(first.versions[r.CLUSTER_TYPE])
    cache.publish(_bad())
    (bad,) = first.flush()
    first.nack(bad)
    first.stream.close()

    # Back with what it holds (delta: initial_resource_versions): withheld.
    again = DeltaProxy(cache, "sc-1", rejected=rejected)
    again.nacked = {r.CLUSTER_TYPE: {bad.system_version_info}}
    assert again.request(r.CLUSTER_TYPE, initial=held) == []
    assert _suppressed(again, "delta") == 1
    # Another node holding the same is sent it.
    other = DeltaProxy(cache, "sc-2", rejected=rejected)
    (sent,) = other.request(r.CLUSTER_TYPE, initial=held)
    assert sent.system_version_info == bad.system_version_info
    # A fresh start of the same node is sent it too (it holds nothing).
    fresh = DeltaProxy(cache, "sc-1", rejected=rejected)
    (sent,) = fresh.request(r.CLUSTER_TYPE)
    assert [x.name for x in sent.resources] == ["default/a"]
    # A change reaches the reconnected node.
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    (fixed,) = again.flush()
    assert again.names(fixed) == ["default/b"]  # it holds the good a


def test_a_stream_without_a_node_id_shares_its_rejections_with_nobody() -> None:
    cache = Cache()
    cache.publish(_bad())
    rejected = RejectedVersions()
    first = SotwProxy(cache, "", rejected=rejected)
    (bad,) = first.request(r.CLUSTER_TYPE, [])
    first.nack(bad)
    second = SotwProxy(cache, "", rejected=rejected)
    (resp,) = second.request(r.CLUSTER_TYPE, [], version="anything")
    assert resp.version_info == bad.version_info


def test_rejected_versions_are_bounded() -> None:
    memory = RejectedVersions(per_type=2, max_nodes=2)
    for version in ("v1", "v2", "v3"):
        memory.add("n1", r.CLUSTER_TYPE, version)
    assert memory.of("n1", r.CLUSTER_TYPE) == ("v2", "v3")  # the oldest is forgotten
    memory.add("n1", r.LISTENER_TYPE, "l1")  # per type
    assert memory.of("n1", r.CLUSTER_TYPE) == ("v2", "v3")
    memory.add("n2", r.CLUSTER_TYPE, "w1")
    memory.add("n1", r.CLUSTER_TYPE, "v4")  # n1 rejected most recently
    memory.add("n3", r.CLUSTER_TYPE, "x1")  # a third node: the least recent (n2) goes
    assert len(memory) == 2
    assert memory.of("n2", r.CLUSTER_TYPE) == ()
    assert memory.of("n1", r.CLUSTER_TYPE) == ("v3", "v4")
    assert memory.of("n3", r.CLUSTER_TYPE) == ("x1",)
    with pytest.raises(ValueError, match="per_type >= 1"):
        RejectedVersions(per_type=0)
