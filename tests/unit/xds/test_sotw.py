"""The SotW state machine, driven by a fake proxy that checks every response.

Each test names the XDS-CHECKLIST.md item it covers.
"""

from __future__ import annotations

import pytest

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.nacks import NackJournal
from aviator.xds.protocol import StreamKind
from aviator.xds.snapshot import ResourceEntry, Snapshot, build_snapshot, content_version
from tests.unit.xds.fakes import EnvoyLikeSotwProxy, SotwProxy, workload

GW = r.GatewayConfig()


def _cache(*workloads: object, gateway: r.GatewayConfig | None = None) -> Cache:
    cache = Cache()
    cache.publish(build_snapshot(workloads, gateway=gateway))  # type: ignore[arg-type]
    return cache


def _metric(proxy: SotwProxy, name: str, type_: str) -> float:
    value = proxy.metrics.registry.get_sample_value(name, {"type": type_, "kind": "sotw"})
    return value or 0.0


# -- wildcard and full state -----------------------------------------------------------------


def test_empty_first_cds_request_is_a_wildcard() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.CLUSTER_TYPE, [])
    assert sorted(proxy.names(resp)) == ["default/a", "default/b"]
    assert resp.version_info == cache.type_version(r.CLUSTER_TYPE)
    proxy.ack(resp)
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1), workload("c", 1)]))
    (resp,) = proxy.flush()
    assert sorted(proxy.names(resp)) == ["default/a", "default/b", "default/c"]  # full state


def test_explicit_star_is_a_wildcard_and_names_narrow_it() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.CLUSTER_TYPE, ["*"])
    assert sorted(proxy.names(resp)) == ["default/a", "default/b"]
    (resp2,) = proxy.ack(resp, ["default/a"])  # now only one name: a new, smaller state
    assert proxy.names(resp2) == ["default/a"]


def test_first_cds_request_is_answered_even_when_there_is_nothing() -> None:
    cache = Cache()
    cache.publish(Snapshot())
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.CLUSTER_TYPE, [])
    assert list(resp.resources) == []  # "no clusters" ends Envoy's initial fetch


def test_nothing_is_answered_before_the_first_publish() -> None:
    cache = Cache()  # a restarted control plane that has not read its source yet
    proxy = SotwProxy(cache)
    # An empty answer here would make Envoy drop every cluster it holds.
    assert proxy.request(r.CLUSTER_TYPE, []) == []
    assert proxy.request(r.LISTENER_TYPE, []) == []
    assert proxy.flush() == []
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW))
    cds, lds = proxy.flush()  # the owed answers, in order
    assert (cds.type_url, lds.type_url) == (r.CLUSTER_TYPE, r.LISTENER_TYPE)
    assert proxy.names(cds) == ["default/a"]
    assert proxy.names(lds) == [GW.listener_name]


def test_removing_a_cluster_sends_the_smaller_full_state() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE, [])[0])
    cache.publish(build_snapshot([workload("a", 1)]))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/a"]


# -- versions and nonces ---------------------------------------------------------------------


def test_versions_are_per_type_and_server_not_per_stream() -> None:
    cache = _cache(workload("a", 1))
    one, two = SotwProxy(cache, "one"), SotwProxy(cache, "two")
    (r1,) = one.request(r.CLUSTER_TYPE, [])
    (r2,) = two.request(r.CLUSTER_TYPE, [])
    assert r1.version_info == r2.version_info == cache.type_version(r.CLUSTER_TYPE)
    (e1,) = one.request(r.ENDPOINT_TYPE, ["default/a"])
    assert e1.version_info != r1.version_info  # each type has its own version


def test_versions_do_not_repeat_across_restarts_for_other_content() -> None:
    # Contour #5482: a restarted server counting from "1" again is never answered.
    before = SotwProxy(_cache(workload("a", 1)))
    (old,) = before.request(r.ENDPOINT_TYPE, ["default/a"])
    restarted = SotwProxy(_cache(workload("a", 2)))  # new cache, new stream, other weights
    (new,) = restarted.request(r.ENDPOINT_TYPE, ["default/a"], version=old.version_info)
    assert new.version_info != old.version_info
    same = SotwProxy(_cache(workload("a", 1)))
    (again,) = same.request(r.ENDPOINT_TYPE, ["default/a"])
    assert again.version_info == old.version_info  # same content, same version


def test_nonces_are_fresh_on_every_response() -> None:
    cache = _cache(workload("a", 1), gateway=GW)
    proxy = EnvoyLikeSotwProxy(cache)
    proxy.start()
    proxy.ack_all()
    for weight in (2, 3, 4):
        cache.publish(build_snapshot([workload("a", weight)], gateway=GW))
        proxy.flush()
        proxy.ack_all()
    nonces = [x.nonce for x in proxy.received]
    assert len(nonces) == len(set(nonces)) >= 7  # the fake also checks on every response


def test_ack_is_not_answered() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    assert proxy.ack(resp) == []
    assert proxy.flush() == []
    status = proxy.stream.status()
    (eds,) = status.types
    assert eds.acked_version == resp.version_info
    assert not eds.waiting_for_ack
    assert _metric(proxy, "aviator_xds_acks_total", "eds") == 1


def test_one_response_in_flight_per_type_and_changes_merge() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    cache.publish(build_snapshot([workload("a", 2)]))
    cache.publish(build_snapshot([workload("a", 3)]))
    assert proxy.flush() == []  # waits for the ACK of the first response
    (latest,) = proxy.ack(resp)
    cla = proxy.stream._cache.get(r.ENDPOINT_TYPE, "default/a")
    assert latest.version_info == content_version(r.ENDPOINT_TYPE, [("default/a", cla.version)])


def test_stale_nonce_is_ignored() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (first,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    proxy.ack(first)
    cache.publish(build_snapshot([workload("a", 2), workload("b", 1)]))
    (second,) = proxy.flush()
    # A request carrying the superseded nonce, asking for more names: ignored.
    assert proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"], nonce=first.nonce) == []
    (eds,) = proxy.stream.status().types
    assert eds.waiting_for_ack
    assert eds.subscribed == ("default/a",)  # the stale request changed nothing
    # The ACK of the latest response is honoured, with its names.
    (third,) = proxy.ack(second, ["default/a", "default/b"])
    assert proxy.names(third) == ["default/a", "default/b"]


def test_request_with_foreign_nonce_on_a_new_stream_is_answered() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"], nonce="99-7", version="old")
    assert proxy.names(resp) == ["default/a"]


# -- NACKs -----------------------------------------------------------------------------------


def _bad_cluster_snapshot(name: str = "a") -> Snapshot:
    """Consistent, but Envoy would reject the cluster (negative connect timeout)."""
    snap = build_snapshot([workload(name, 1)])
    cluster = r.build_cluster(WorkloadKey("default", name))
    cluster.connect_timeout.seconds = -1
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.CLUSTER_TYPE]
    return Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, cluster)])


def test_nack_is_recorded_and_that_version_never_resent() -> None:
    cache = _cache(workload("a", 1))
    journal = NackJournal()
    proxy = SotwProxy(cache, "gw-7", journal=journal)
    (good,) = proxy.request(r.CLUSTER_TYPE, [])
    proxy.ack(good)
    cache.publish(_bad_cluster_snapshot())
    (bad,) = proxy.flush()
    assert proxy.nack(bad, "Invalid duration") == []
    # The record: node, type, rejected and accepted versions, message.
    (record,) = journal.for_node("gw-7")
    assert record.type == "cds"
    assert record.kind is StreamKind.SOTW
    assert record.rejected_version == bad.version_info
    assert record.accepted_version == good.version_info
    assert record.message == "Invalid duration"
    (cds,) = proxy.stream.status().types
    assert cds.last_nack == record
    assert cds.acked_version == good.version_info
    assert _metric(proxy, "aviator_xds_nacks_total", "cds") == 1
    # Not resent: not on flush, not on a new request, not on an identical publish.
    assert proxy.flush() == []
    assert proxy.request(r.CLUSTER_TYPE) == []
    cache.publish(_bad_cluster_snapshot())
    assert proxy.flush() == []
    assert _metric(proxy, "aviator_xds_nacked_resends_suppressed_total", "cds") >= 1
    # A real change is sent.
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    (fixed,) = proxy.flush()
    assert sorted(proxy.names(fixed)) == ["default/a", "default/b"]
    proxy.ack(fixed)
    # Going back to the rejected content is not sent either (fake checks the version).
    cache.publish(_bad_cluster_snapshot())
    assert proxy.flush() == []


def test_nack_then_return_to_the_accepted_state_sends_nothing() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE, [])[0])
    cache.publish(_bad_cluster_snapshot())
    proxy.nack(proxy.flush()[0])
    cache.publish(build_snapshot([workload("a", 1)]))  # the proxy already holds this
    assert proxy.flush() == []


def test_nack_names_added_in_the_nack_are_still_answered() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    proxy.in_flight.pop(r.ENDPOINT_TYPE)
    proxy.nacked.setdefault(r.ENDPOINT_TYPE, set()).add(resp.version_info)
    (more,) = proxy.request(
        r.ENDPOINT_TYPE, ["default/a", "default/b"], nonce=resp.nonce, error="bad a"
    )
    assert proxy.names(more) == ["default/a", "default/b"]  # other content, other version


# -- names: added, unknown, only subscribers woken -------------------------------------------


def test_added_name_is_answered_even_if_nothing_changed() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    (more,) = proxy.ack(resp, ["default/a", "default/b"])
    assert proxy.names(more) == ["default/a", "default/b"]


def test_unknown_name_is_remembered_and_sent_when_it_appears() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    assert proxy.request(r.ENDPOINT_TYPE, ["default/later"]) == []
    cache.publish(build_snapshot([workload("a", 1), workload("later", 4)]))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/later"]


def test_change_reaches_only_streams_subscribed_to_it() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    on_a, on_b = SotwProxy(cache, "pa"), SotwProxy(cache, "pb")
    on_a.ack(on_a.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    on_b.ack(on_b.request(r.ENDPOINT_TYPE, ["default/b"])[0])
    cache.publish(build_snapshot([workload("a", 9), workload("b", 1)]))
    assert on_b.stream._dirty == set()  # not even woken
    (resp,) = on_a.flush()
    assert on_a.names(resp) == ["default/a"]
    assert on_b.flush() == []


def test_unsubscribed_names_stop_updates() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"])
    assert proxy.ack(resp, ["default/b"]) == []
    cache.publish(build_snapshot([workload("a", 2), workload("b", 1)]))
    assert proxy.flush() == []
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 0


def test_streams_listing_the_same_names_share_one_subscription_and_one_watch() -> None:
    cache = _cache(workload("a", 1), workload("b", 1), workload("c", 1))
    proxies = [SotwProxy(cache, f"p{i}") for i in range(3)]
    for proxy in proxies:
        proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"])[0])
    held = [p.stream._types[r.ENDPOINT_TYPE].names for p in proxies]
    assert held[0] == {"default/a", "default/b"}
    assert held[0] is held[1] is held[2]
    assert len(cache._by_set[r.ENDPOINT_TYPE]) == 1
    cache.publish(build_snapshot([workload("a", 2), workload("b", 1), workload("c", 1)]))
    for proxy in proxies:
        (resp,) = proxy.flush()
        assert proxy.names(resp) == ["default/a"]
        proxy.ack(resp)
    # One proxy moves to other names: only it is woken by them, and no longer by the others.
    (resp,) = proxies[0].request(r.ENDPOINT_TYPE, ["default/c"])
    assert proxies[0].names(resp) == ["default/c"]
    proxies[0].ack(resp)
    cache.publish(build_snapshot([workload("a", 3), workload("b", 1), workload("c", 1)]))
    assert proxies[0].flush() == []
    assert [p.names(p.flush()[0]) for p in proxies[1:]] == [["default/a"]] * 2
    for proxy in proxies:
        proxy.stream.close()
    assert cache._by_set[r.ENDPOINT_TYPE] == {}
    assert cache.watcher_count(r.ENDPOINT_TYPE, "default/a") == 0


# -- warming ---------------------------------------------------------------------------------


def _changed_cluster_snapshot() -> Snapshot:
    snap = build_snapshot([workload("a", 1)])
    cluster = r.build_cluster(WorkloadKey("default", "a"))
    cluster.connect_timeout.seconds = 2  # same endpoints, other cluster
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.CLUSTER_TYPE]
    return Snapshot.from_entries([*entries, ResourceEntry.from_message(r.CLUSTER_TYPE, cluster)])


def test_eds_request_after_cluster_change_is_answered_even_if_it_looks_like_an_ack() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE, [])[0])
    (eds,) = proxy.request(r.ENDPOINT_TYPE, ["default/a"])
    proxy.ack(eds)
    # Without a cluster change, the same request again is a duplicate ACK: silence.
    assert proxy.request(r.ENDPOINT_TYPE) == []
    cache.publish(_changed_cluster_snapshot())
    (cds,) = proxy.flush()
    # Envoy re-requests endpoints for the new cluster with its last ACK, verbatim.
    (again,) = proxy.request(r.ENDPOINT_TYPE)
    assert again.version_info == eds.version_info  # same endpoints, answered anyway
    assert proxy.names(again) == ["default/a"]
    proxy.ack(cds)
    assert proxy.ack(again) == []  # and then quiet


def test_eds_warming_request_before_cds_ack_is_answered() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.CLUSTER_TYPE, [])[0])
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, ["default/a"])[0])
    cache.publish(_changed_cluster_snapshot())
    proxy.flush()  # CDS in flight, not yet ACKed (Envoy holds the ACK while warming)
    (again,) = proxy.request(r.ENDPOINT_TYPE)
    assert proxy.names(again) == ["default/a"]


# -- make before break -----------------------------------------------------------------------


def test_full_gateway_flow_settles_with_every_resource_held() -> None:
    cache = _cache(workload("a", 1), workload("b", 2), gateway=GW)
    proxy = EnvoyLikeSotwProxy(cache)
    proxy.start()
    proxy.ack_all()
    assert set(proxy.held[r.CLUSTER_TYPE]) == {"default/a", "default/b"}
    assert set(proxy.held[r.ENDPOINT_TYPE]) == {"default/a", "default/b"}
    assert set(proxy.held[r.LISTENER_TYPE]) == {GW.listener_name}
    assert set(proxy.held[r.ROUTE_TYPE]) == {GW.route_name}
    assert proxy.flush() == []


def test_new_route_waits_for_its_cluster_to_be_acked() -> None:
    cache = _cache(workload("a", 1), gateway=GW)
    proxy = EnvoyLikeSotwProxy(cache)
    proxy.start()
    proxy.ack_all()
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)], gateway=GW))
    sent = proxy.flush()
    assert [r.TYPE_SHORT[x.type_url] for x in sent] == ["cds"]  # the route waits
    cds = proxy.take(r.CLUSTER_TYPE)
    after_ack = proxy.ack(cds)
    kinds = [r.TYPE_SHORT[x.type_url] for x in after_ack]
    assert "rds" in kinds  # released by the CDS ACK
    routes = proxy.take(r.ROUTE_TYPE)
    assert "default/b" in r.references(r.ROUTE_TYPE, proxy_decode_route(routes))
    proxy.ack(routes)
    proxy.ack_all()


def proxy_decode_route(resp: object) -> object:
    from tests.unit.xds.fakes import decode

    (any_msg,) = resp.resources  # type: ignore[attr-defined]
    return decode(r.ROUTE_TYPE, any_msg)


def test_removed_cluster_stays_until_the_route_stops_naming_it() -> None:
    cache = _cache(workload("a", 1), workload("b", 1), gateway=GW)
    proxy = EnvoyLikeSotwProxy(cache)
    proxy.start()
    proxy.ack_all()
    cache.publish(build_snapshot([workload("a", 1)], gateway=GW))
    sent = proxy.flush()
    # The route drops b first; the cluster list still has b (or is not sent at all).
    cds_now = [x for x in sent if x.type_url == r.CLUSTER_TYPE]
    for resp in cds_now:
        assert "default/b" in proxy.names(resp)
    routes = proxy.take(r.ROUTE_TYPE)
    after = proxy.ack(routes)
    if cds_now:
        after += proxy.ack(proxy.take(r.CLUSTER_TYPE))
    (cds,) = [x for x in proxy.inbox if x.type_url == r.CLUSTER_TYPE]
    assert proxy.names(cds) == ["default/a"]  # removal only after the route ACK
    proxy.ack_all()
    assert set(proxy.held[r.CLUSTER_TYPE]) == {"default/a"}


def test_listener_and_route_order_on_the_first_connection() -> None:
    cache = _cache(workload("a", 1), gateway=GW)
    proxy = EnvoyLikeSotwProxy(cache)
    # RDS is only sent once asked for, i.e. after the listener naming it was accepted.
    (lds,) = proxy.request(r.LISTENER_TYPE, [])
    assert proxy.names(lds) == [GW.listener_name]
    assert not [x for x in proxy.inbox if x.type_url == r.ROUTE_TYPE]


def test_route_for_unknown_cluster_is_not_held_back_forever() -> None:
    # An unchecked snapshot (tests only) may route to a cluster that will never exist.
    snap = build_snapshot([workload("a", 1)], gateway=GW)
    routes = r.build_route_configuration(GW, [workload("a", 1), workload("ghost", 1)])
    entries = [e for t, es in snap.resources.items() for e in es.values() if t != r.ROUTE_TYPE]
    cache = Cache()
    cache.publish(
        Snapshot.from_entries([*entries, ResourceEntry.from_message(r.ROUTE_TYPE, routes)]),
        check=False,
    )
    proxy = EnvoyLikeSotwProxy(cache)
    proxy.start()
    proxy.ack_all()
    assert set(proxy.held[r.ROUTE_TYPE]) == {GW.route_name}


# -- status view, identifier, close ----------------------------------------------------------


def test_status_view_and_close() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache, "node-x")
    (resp,) = proxy.request(r.CLUSTER_TYPE, [])
    status = proxy.stream.status()
    assert status.node_id == "node-x"
    assert status.kind is StreamKind.SOTW
    (cds,) = status.types
    assert cds.wildcard
    assert cds.waiting_for_ack
    assert cds.sent_version == resp.version_info
    assert resp.control_plane.identifier == "aviator-test"
    assert cache.watcher_count(r.CLUSTER_TYPE) == 1
    proxy.stream.close()
    assert cache.watcher_count(r.CLUSTER_TYPE) == 0
    cache.publish(build_snapshot([workload("a", 2)]))
    assert proxy.stream._dirty == set()


def test_unsupported_type_is_ignored() -> None:
    proxy = SotwProxy(_cache(workload("a", 1)))
    secret = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert (
        proxy.stream.handle(
            __import__("envoy.service.discovery.v3.discovery_pb2", fromlist=["x"]).DiscoveryRequest(
                type_url=secret
            )
        )
        == []
    )


def test_streams_share_the_serialised_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _cache(workload("a", 1), workload("b", 2))
    calls: list[object] = []
    original = ResourceEntry.from_message
    monkeypatch.setattr(
        ResourceEntry, "from_message", classmethod(lambda cls, *a: calls.append(a) or original(*a))
    )
    proxies = [SotwProxy(cache, f"p{i}") for i in range(5)]
    bodies = set()
    for proxy in proxies:
        (resp,) = proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/b"])
        bodies.add(b"".join(x.value for x in resp.resources))
    assert calls == []  # nothing serialised while answering: done once, at snapshot build
    assert len(bodies) == 1
    entry = cache.get(r.ENDPOINT_TYPE, "default/a")
    assert entry is not None
    assert proxies[0].received[0].resources[0].value == entry.any.value
