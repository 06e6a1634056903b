"""Answers cost what changed, not what is subscribed (found with ``aviator bench xds``).

- SotW EDS responses carry only the CLAs the proxy does not hold yet; forced answers (new
  names, warming) carry every subscribed name.
- After a publish, a stream looks only at the names that publish changed (the cache tells it
  which); when it cannot know, it looks at everything.
"""

from __future__ import annotations

from collections.abc import Callable

from envoy.service.discovery.v3 import discovery_pb2

from aviator.model import WeightedWorkload
from aviator.xds import resources as r
from aviator.xds.bodies import ResponseBodies
from aviator.xds.cache import Cache
from aviator.xds.snapshot import build_snapshot
from aviator.xds.sotw import SotwStream
from tests.unit.xds.fakes import IDENTIFIER, DeltaProxy, SotwProxy, workload

NAMES = ["default/a", "default/b", "default/c"]


def _fleet(**weights: int) -> list[WeightedWorkload]:
    base = {"a": 1, "b": 1, "c": 1} | weights
    return [workload(name, w) for name, w in sorted(base.items())]


def _cache() -> Cache:
    cache = Cache()
    cache.publish(build_snapshot(_fleet()))
    return cache


def _sotw(cache: Cache) -> SotwProxy:
    proxy = SotwProxy(cache)
    (first,) = proxy.request(r.ENDPOINT_TYPE, NAMES)
    assert sorted(proxy.names(first)) == NAMES
    assert proxy.ack(first) == []
    return proxy


def test_sotw_eds_response_carries_only_the_changed_cla() -> None:
    cache = _cache()
    proxy = _sotw(cache)
    cache.publish(build_snapshot(_fleet(b=7)))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/b"]
    assert proxy.ack(resp) == []
    # The proxy holds every name, each at the cache's version.
    held = {
        n: m.SerializeToString(deterministic=True) for n, m in proxy.held[r.ENDPOINT_TYPE].items()
    }
    assert held == {n: e.any.value for n, e in cache.resources(r.ENDPOINT_TYPE).items()}


def test_sotw_changes_during_a_response_in_flight_follow_the_ack() -> None:
    cache = _cache()
    proxy = _sotw(cache)
    cache.publish(build_snapshot(_fleet(a=2)))
    (first,) = proxy.flush()
    cache.publish(build_snapshot(_fleet(a=3, c=4)))
    cache.publish(build_snapshot(_fleet(a=3, c=5)))
    assert proxy.flush() == []  # one response in flight
    (merged,) = proxy.ack(first)
    assert sorted(proxy.names(merged)) == ["default/a", "default/c"]
    assert proxy.ack(merged) == []


def test_sotw_new_name_gets_a_full_answer() -> None:
    cache = _cache()
    proxy = SotwProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, NAMES[:2])[0])
    (resp,) = proxy.request(r.ENDPOINT_TYPE, NAMES)  # Envoy added a cluster
    assert sorted(proxy.names(resp)) == NAMES


def test_sotw_rejected_cla_is_not_resent_with_the_next_change() -> None:
    cache = _cache()
    proxy = _sotw(cache)
    cache.publish(build_snapshot(_fleet(a=2)))
    (bad,) = proxy.flush()
    assert proxy.nack(bad, "rejected a") == []
    cache.publish(build_snapshot(_fleet(a=2, b=3)))
    (resp,) = proxy.flush()
    # Resending a's rejected version with b would have the whole response rejected again.
    assert proxy.names(resp) == ["default/b"]


def test_delta_change_sends_only_the_changed_cla_and_removals() -> None:
    cache = _cache()
    proxy = DeltaProxy(cache)
    proxy.ack(proxy.request(r.ENDPOINT_TYPE, NAMES)[0])
    cache.publish(build_snapshot(_fleet(c=9)))
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/c"]
    proxy.ack(resp)
    cache.publish(build_snapshot([workload("a", 1), workload("c", 9)]))  # b is gone
    (gone,) = proxy.flush()
    assert proxy.names(gone) == []
    assert list(gone.removed_resources) == ["default/b"]


def test_cache_tells_watchers_which_names_changed_only_during_a_publish() -> None:
    cache = _cache()
    seen: list[frozenset[str] | None] = []

    class Watcher:
        def resources_changed(self, type_url: str) -> None:
            seen.append(cache.changed_names(type_url))

    cache.watch(Watcher(), r.ENDPOINT_TYPE, ["default/b"])
    cache.publish(build_snapshot(_fleet(a=2, b=2)))
    assert seen == [frozenset({"default/a", "default/b"})]
    assert cache.changed_names(r.ENDPOINT_TYPE) is None


def test_a_wake_without_names_makes_the_stream_look_at_everything() -> None:
    cache = _cache()
    proxy = _sotw(cache)
    # Change the cache behind the stream's back: no notification, then a bare wake-up (as
    # the first publish of a cache does for every watcher).
    cache._snapshot = build_snapshot(_fleet(b=6))
    proxy.stream.resources_changed(r.ENDPOINT_TYPE)
    (resp,) = proxy.flush()
    assert proxy.names(resp) == ["default/b"]


def test_streams_of_one_server_copy_one_body_per_content() -> None:
    cache = _cache()
    bodies = ResponseBodies()
    built: list[tuple[str, str, str]] = []
    original = bodies.get

    def counting(key: tuple[str, str, str], build: Callable[[], object]) -> object:
        return original(key, lambda: built.append(key) or build())

    bodies.get = counting  # type: ignore[method-assign]
    one = SotwStream(cache, identifier=IDENTIFIER, bodies=bodies)
    two = SotwStream(cache, identifier=IDENTIFIER, bodies=bodies)
    request = discovery_pb2.DiscoveryRequest(type_url=r.ENDPOINT_TYPE, resource_names=NAMES)
    (first,) = one.handle(request)
    (second,) = two.handle(request)
    assert len(built) == 1  # assembled once
    first.ClearField("nonce")
    second.ClearField("nonce")
    assert first == second
    assert first.control_plane.identifier == IDENTIFIER
    # Bounded: the oldest bodies go.
    small = ResponseBodies(size=2)
    for i in range(3):
        small.get(("sotw", "t", str(i)), discovery_pb2.DiscoveryResponse)
    rebuilt: list[int] = []
    small.get(("sotw", "t", "0"), lambda: rebuilt.append(0) or discovery_pb2.DiscoveryResponse())
    assert rebuilt == [0]
