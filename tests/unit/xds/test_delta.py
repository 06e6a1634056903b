"""The delta (incremental) state machine, driven by a fake proxy that checks every response."""

from __future__ import annotations

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.protocol import StreamKind
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot
from tests.unit.xds.fakes import DeltaProxy, workload

GW = r.GatewayConfig()


def _cache(*workloads: object, gateway: r.GatewayConfig | None = None) -> Cache:
    cache = Cache()
    cache.publish(build_snapshot(workloads, gateway=gateway))  # type: ignore[arg-type]
    return cache


def _versions(cache: Cache, type_url: str) -> dict[str, str]:
    return {n: e.version for n, e in cache.resources(type_url).items()}


def test_legacy_wildcard_and_explicit_star() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    legacy, star = DeltaProxy(cache, "l"), DeltaProxy(cache, "s")
    (r1,) = legacy.request(r.CLUSTER_TYPE)
    (r2,) = star.request(r.CLUSTER_TYPE, ["*"])
    assert sorted(legacy.names(r1)) == sorted(star.names(r2)) == ["default/a", "default/b"]
    assert r1.system_version_info == r2.system_version_info


def test_first_wildcard_request_is_answered_even_when_empty() -> None:
    cache = Cache()
    cache.publish(Snapshot())
    proxy = DeltaProxy(cache)
    (resp,) = proxy.request(r.CLUSTER_TYPE)
    assert list(resp.resources) == []
    assert list(resp.removed_resources) == []


def test_nothing_is_answered_before_the_first_publish() -> None:
    cache = Cache()  # a restarted control plane that has not read its source yet
    proxy = DeltaProxy(cache)
    held = _versions(_cache(workload("a", 1)), r.CLUSTER_TYPE)
    assert proxy.request(r.CLUSTER_TYPE, initial=held) == []  # not "everything is gone"
    assert proxy.request(r.ENDPOINT_TYPE, ["default/a"]) == []
    assert proxy.flush() == []
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    cds, eds = proxy.flush()  # the owed answers: what the proxy lacks, nothing it holds
    assert proxy.names(cds) == ["default/b"]
    assert list(cds.removed_resources) == []
    assert proxy.names(eds) == ["default/a"]


def test_only_changed_resources_are_sent() -> None:
    cache = _cache(workload("a", 1), workload("b", 1), workload("c", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b", "default/c"])[0])
    cache.publish(build_snapshot([workload("a", 1), workload("b", 7), workload("c", 1)]))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/b"]
    assert list(resp.removed_resources) == []
    assert resp.resources[0].version == cache.get(r.ENDPOINT_TYPE, "default/b").version  # type: ignore[union-attr]


def test_removed_resource_is_reported_removed() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    cache.publish(build_snapshot([workload("a", 1)]))
    (resp,) = proxy.flush()
    assert list(resp.resources) == []
    assert list(resp.removed_resources) == ["default/b"]


def test_nonexistent_name_is_reported_once_then_sent_when_it_appears() -> None:
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/later"])
    assert list(resp.removed_resources) == ["default/later"]  # "does not exist"
    proxy.ack(resp)
    assert proxy.flush() == []
    cache.publish(build_snapshot([workload("a", 1), workload("later", 3)]))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/later"]
    proxy.ack(resp)
    cache.publish(build_snapshot([workload("a", 1)]))
    (gone,) = proxy.flush()
    assert list(gone.removed_resources) == ["default/later"]


def test_initial_resource_versions_are_not_resent() -> None:
    cache = _cache(workload("a", 1), workload("b", 1), workload("c", 1))
    held = _versions(cache, r.CLUSTER_TYPE)
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))  # c went away
    # a reconnecting proxy holds a and b at current versions, c (gone) and a stale z.
    held["default/z"] = "0000"
    proxy = DeltaProxy(cache)
    (resp,) = proxy.request(r.CLUSTER_TYPE, initial=held)
    assert proxy.names(resp) == []  # nothing it holds at the same version is resent
    assert sorted(resp.removed_resources) == ["default/c", "default/z"]


def test_initial_versions_that_differ_are_resent() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    held = _versions(cache, r.ENDPOINT_TYPE)
    held["default/b"] = "older"
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"], initial=held)
    assert proxy.names(resp) == ["default/b"]


def test_reconnect_holding_everything_sends_nothing_for_eds() -> None:
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    assert (
        proxy.request(r.ENDPOINT_TYPE, ["default/a"], initial=_versions(cache, r.ENDPOINT_TYPE))
        == []
    )


def test_subscriptions_are_honoured_on_a_stale_nonce() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    (first,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    proxy.ack(first)
    cache.publish(build_snapshot([workload("a", 2), workload("b", 1)]))
    (second,) = proxy.flush()
    # Stale nonce (first's), subscribing b: the subscription counts, the ACK does not.
    assert proxy.request(r.ENDPOINT_TYPE, ["default/b"], nonce=first.nonce) == []
    (eds,) = proxy.stream.status().types
    assert eds.subscribed == ("default/a", "default/b")
    assert eds.waiting_for_ack  # the stale nonce did not ACK `second`
    (third,) = proxy.ack(second)
    assert proxy.names(third) == ["default/b"]


def test_stale_nack_is_ignored() -> None:
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    (first,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    proxy.ack(first)
    cache.publish(build_snapshot([workload("a", 2)]))
    proxy.flush()
    proxy.request(r.ENDPOINT_TYPE, nonce=first.nonce, error="late complaint")
    assert proxy.journal.all() == ()


def test_nack_is_recorded_and_not_resent_until_the_state_changes() -> None:
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache, "sidecar-1")
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    bad = r.build_cluster(WorkloadKey("default", "a"))
    bad.connect_timeout.seconds = -1
    snap = build_snapshot([workload("a", 1)])
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.CLUSTER_TYPE]
    cache.publish(
        Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, bad)])
    )
    (resp,) = proxy.flush()
    assert proxy.nack(resp, "Invalid duration") == []
    (record,) = proxy.journal.for_node("sidecar-1")
    assert (record.kind, record.type, record.rejected_version, record.message) == (
        StreamKind.DELTA,
        "cds",
        resp.system_version_info,
        "Invalid duration",
    )
    assert proxy.flush() == []
    assert proxy.request(r.CLUSTER_TYPE) == []
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    (next_,) = proxy.flush()
    # The good `a` is what the proxy kept when it rejected the bad one: only b is new.
    assert proxy.names(next_) == ["default/b"]


def test_resubscribe_resends_what_the_proxy_dropped() -> None:
    # go-control-plane #583: unsubscribe then subscribe again must send the resource again.
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    assert proxy.request(r.ENDPOINT_TYPE, unsubscribe=["default/a"]) == []
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    assert proxy.names(resp) == ["default/a"]


def test_resubscribe_of_a_held_name_resends_it() -> None:
    # Envoy re-subscribes an EDS name when it re-creates the cluster: it expects an answer.
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    assert proxy.names(resp) == ["default/a"]


def test_unsubscribed_names_get_no_updates() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"])[0])
    proxy.request(r.ENDPOINT_TYPE, unsubscribe=["default/a"])
    cache.publish(build_snapshot([workload("a", 5), workload("b", 1)]))
    assert proxy.flush() == []
    cache.publish(build_snapshot([workload("b", 1)]))
    assert proxy.flush() == []  # no removal for a name it no longer wants


def test_warming_after_cluster_change_resends_endpoints() -> None:
    cache = _cache(workload("a", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    snap = build_snapshot([workload("a", 1)])
    cluster = r.build_cluster(WorkloadKey("default", "a"))
    cluster.connect_timeout.seconds = 2
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.CLUSTER_TYPE]
    cache.publish(
        Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, cluster)])
    )
    # Envoy's delta client sends no EDS request for a name it already subscribes to (and holds
    # the CDS ACK until the cluster is warm): the CLA follows the clusters unasked.
    cds, eds = proxy.flush()
    assert (cds.type_url, eds.type_url) == (r.CLUSTER_TYPE, r.ENDPOINT_TYPE)
    assert proxy.names(eds) == ["default/a"]
    proxy.ack(eds)
    assert proxy.request(r.ENDPOINT_TYPE) == []  # sent once, not again on the next request


def test_cla_removal_waits_for_the_cluster_removal_ack() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"])[0])
    cache.publish(build_snapshot([workload("a", 1)]))
    sent = proxy.flush()
    assert [r.TYPE_SHORT[x.type_url] for x in sent] == ["cds"]  # EDS removal waits
    after = proxy.ack(proxy.take(r.CLUSTER_TYPE))
    (eds,) = after
    assert list(eds.removed_resources) == ["default/b"]


def test_gateway_add_and_remove_in_make_before_break_order() -> None:
    cache = _cache(workload("a", 1), gateway=GW)
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    proxy.ack(proxy.request(r.LISTENER_TYPE)[0])
    proxy.ack(proxy.request(r.ROUTE_TYPE, [GW.route_name])[0])
    # Add b: clusters first; the route follows the CDS ACK.
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)], gateway=GW))
    assert [r.TYPE_SHORT[x.type_url] for x in proxy.flush()] == ["cds"]
    (released,) = proxy.ack(proxy.take(r.CLUSTER_TYPE))
    assert released.type_url == r.ROUTE_TYPE
    (eds,) = proxy.request(r.ENDPOINT_TYPE, ["default/b"])  # Envoy asks for the new cluster's CLA
    assert proxy.names(eds) == ["default/b"]
    proxy.ack_all()
    # Remove b: the route first; the cluster goes after the RDS ACK, its CLA after that.
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW))
    assert [r.TYPE_SHORT[x.type_url] for x in proxy.flush()] == ["rds"]
    (cds,) = proxy.ack(proxy.take(r.ROUTE_TYPE))
    assert list(cds.removed_resources) == ["default/b"]
    (eds,) = proxy.ack(cds)
    assert list(eds.removed_resources) == ["default/b"]
    proxy.ack(eds)
    assert proxy.flush() == []


def test_route_removal_waits_for_the_listener_removal() -> None:
    # A gRPC client's API listener, subscribed by name, and the route it uses.
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)], grpc_api_listeners=True))
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE)[0])
    proxy.ack(proxy.request(r.LISTENER_TYPE, ["a.default"])[0])
    proxy.ack(proxy.request(r.ROUTE_TYPE, [r.GRPC_ROUTE_NAME])[0])
    cache.publish(build_snapshot([workload("a", 1)]))  # API listeners off
    sent = proxy.flush()
    assert [r.TYPE_SHORT[x.type_url] for x in sent] == ["lds"]
    (rds,) = proxy.ack(proxy.take(r.LISTENER_TYPE))
    assert list(rds.removed_resources) == [r.GRPC_ROUTE_NAME]


def test_change_reaches_only_subscribed_delta_streams() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    on_a, on_b = DeltaProxy(cache, "a"), DeltaProxy(cache, "b")
    on_a.ack(on_a.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    on_b.ack(on_b.request(r.ENDPOINT_TYPE, ["default/b"])[0])
    cache.publish(build_snapshot([workload("a", 3), workload("b", 1)]))
    assert on_b.stream._dirty == set()
    assert len(on_a.flush()) == 1
    assert on_b.flush() == []
