"""What a stream says its proxy holds, per name (issue 12: the operator's Programmed
condition): the EDS names it subscribes to, the version of each it ACKed, and Envoy's message
when the last response carrying a name was NACKed. SotW and delta, driven by the fakes."""

from __future__ import annotations

from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.snapshot import build_snapshot
from tests.unit.xds.fakes import DeltaProxy, SotwProxy, workload

A, B, C = "default/a", "default/b", "default/c"


def _cache(*workloads: object) -> Cache:
    cache = Cache()
    cache.publish(build_snapshot(workloads))  # type: ignore[arg-type]
    return cache


def _version(cache: Cache, name: str) -> str:
    entry = cache.get(r.ENDPOINT_TYPE, name)
    assert entry is not None
    return entry.version


def test_sotw_subscribed_names_are_those_asked_for_among_the_served() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    served = frozenset({A, B, C})
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, served) == frozenset()  # nothing asked yet
    proxy.request(r.ENDPOINT_TYPE, [A, "default/unknown"])
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, served) == {A}
    proxy.ack(proxy.take(r.ENDPOINT_TYPE), [A, B])
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, served) == {A, B}
    proxy.stream.close()
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, served) == frozenset()


def test_a_wildcard_subscription_covers_every_served_name() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    proxy.request(r.CLUSTER_TYPE, [])  # legacy wildcard (the fake accepts none for EDS)
    served = frozenset({A, B, C})
    assert proxy.stream.subscribed(r.CLUSTER_TYPE, served) == served
    delta = DeltaProxy(cache)
    delta.request(r.CLUSTER_TYPE)  # legacy wildcard: an empty first CDS request
    assert delta.stream.subscribed(r.CLUSTER_TYPE, served) == served
    assert delta.stream.subscribed(r.ENDPOINT_TYPE, served) == frozenset()


def test_sotw_held_version_is_the_acked_one_not_the_one_in_flight() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, [A, B])
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) is None  # sent, not ACKed
    first = _version(cache, A)
    proxy.ack(resp)
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == first
    cache.publish(build_snapshot([workload("a", 5), workload("b", 1)]))
    (update,) = proxy.flush()
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == first  # still in flight
    proxy.ack(update)
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == _version(cache, A) != first
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, B) == _version(cache, B)
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, C) is None
    assert proxy.stream.held_version(r.ROUTE_TYPE, A) is None  # a type never asked for


def test_sotw_rejection_names_the_rejected_cla_until_a_newer_version_is_acked() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, [A, B])[0])
    held_a = _version(cache, A)
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) is None
    cache.publish(build_snapshot([workload("a", 1, 2), workload("b", 1)]))
    (bad,) = proxy.flush()
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) is None  # in flight: not rejected yet
    proxy.nack(bad, "malformed IP address: 10.0.0.2")
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) == "malformed IP address: 10.0.0.2"
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, B) is None  # not in that response
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == held_a  # keeps the older one
    # A newer version of the name goes out: the old rejection is no longer the last word.
    cache.publish(build_snapshot([workload("a", 1, 2, 3), workload("b", 1)]))
    (fixed,) = proxy.flush()
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) is None
    proxy.ack(fixed)
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) is None
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == _version(cache, A)


def test_sotw_rejection_of_a_first_cla_then_the_latest_message_then_an_ack() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    (first,) = proxy.request(r.ENDPOINT_TYPE, [A])
    proxy.nack(first, "no")
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) == "no"  # holds nothing at all
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) is None
    assert proxy.request(r.ENDPOINT_TYPE) == []  # the rejected version is not sent again
    cache.publish(build_snapshot([workload("a", 2)]))
    proxy.nack(proxy.flush()[0], "still no")
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) == "still no"  # the latest word
    cache.publish(build_snapshot([workload("a", 3)]))
    proxy.ack(proxy.flush()[0])
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) is None
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == _version(cache, A)


def test_delta_holdings_rejection_and_initial_versions() -> None:
    cache = _cache(workload("a", 1), workload("b", 1))
    proxy = DeltaProxy(cache)
    (resp,) = proxy.request(r.ENDPOINT_TYPE, [A, B])
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, frozenset({A, C})) == {A}
    proxy.ack(resp)
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == _version(cache, A)
    before = _version(cache, A)
    cache.publish(build_snapshot([workload("a", 1, 2), workload("b", 1)]))
    (bad,) = proxy.flush()
    proxy.nack(bad, "bad endpoint")
    assert proxy.stream.rejection(r.ENDPOINT_TYPE, A) == "bad endpoint"
    assert proxy.stream.held_version(r.ENDPOINT_TYPE, A) == before
    proxy.request(r.ENDPOINT_TYPE, unsubscribe=[B])
    assert proxy.stream.subscribed(r.ENDPOINT_TYPE, frozenset({A, B})) == {A}
    # A reconnecting Envoy says what it holds: that is what it holds, nothing rejected.
    again = DeltaProxy(cache, "proxy-2")
    again.request(r.ENDPOINT_TYPE, [A], initial={A: before})
    assert again.stream.held_version(r.ENDPOINT_TYPE, A) == before
    assert again.stream.rejection(r.ENDPOINT_TYPE, A) is None


def test_requests_handled_moves_on_every_request() -> None:
    cache = _cache(workload("a", 1))
    proxy = SotwProxy(cache)
    assert proxy.stream.requests_handled == 0
    (resp,) = proxy.request(r.ENDPOINT_TYPE, [A])
    proxy.ack(resp)
    assert proxy.stream.requests_handled == 2
