"""XdsAcks: this replica's ACK counts read off real protocol streams (played by the fakes of
tests/unit/xds): subscribed, holding the current endpoints, rejected; weights alone never
un-program; a poll with nothing new costs nothing."""

from __future__ import annotations

from aviator.operator.acks import ClusterAcks
from aviator.operator.xds_acks import XdsAcks, cla_addresses
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.snapshot import build_snapshot
from tests.unit.xds.fakes import DeltaProxy, SotwProxy, workload

A = "default/a"


def _poll(acks: XdsAcks, cache: Cache, *proxies: SotwProxy | DeltaProxy) -> object:
    return acks.poll(cache.resources(r.ENDPOINT_TYPE), cache.publishes, [p.stream for p in proxies])


def test_counts_current_pending_and_rejected_across_sotw_and_delta() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1, 1)]))
    entry = cache.get(r.ENDPOINT_TYPE, A)
    assert entry is not None
    assert cla_addresses(entry.message) == {"10.0.0.1:8080", "10.0.0.2:8080"}
    sotw, delta = SotwProxy(cache, "gw-1"), DeltaProxy(cache, "gw-2")
    sotw.ack(sotw.request(r.ENDPOINT_TYPE, [A])[0])
    delta.request(r.ENDPOINT_TYPE, [A])  # sent, not ACKed yet
    acks = XdsAcks()
    assert _poll(acks, cache, sotw, delta) == {A: ClusterAcks(proxies=2, current=1)}
    assert _poll(acks, cache, sotw, delta) is None  # nothing happened since
    delta.ack(delta.take())
    assert _poll(acks, cache, sotw, delta) == {A: ClusterAcks(proxies=2, current=2)}

    # A weight change: until the proxies ACK it, what they hold still carries the endpoints.
    cache.publish(build_snapshot([workload("a", 5, 1)]))
    assert _poll(acks, cache, sotw, delta) == {A: ClusterAcks(proxies=2, current=2)}
    sotw.ack(sotw.flush()[0])
    delta.ack(delta.flush()[0])

    # A new pod: pending until ACKed; a NACK is counted with Envoy's message.
    cache.publish(build_snapshot([workload("a", 5, 1, 1)]))
    assert _poll(acks, cache, sotw, delta) == {A: ClusterAcks(proxies=2, current=0)}
    sotw.ack(sotw.flush()[0])
    delta.nack(delta.flush()[0], "endpoint rejected")
    assert _poll(acks, cache, sotw, delta) == {
        A: ClusterAcks(proxies=2, current=1, rejected=1, messages=("endpoint rejected",))
    }
    # The stream goes: its proxy is no longer counted.
    delta.stream.close()
    assert _poll(acks, cache, sotw) == {A: ClusterAcks(proxies=1, current=1)}


def test_two_streams_of_one_node_count_once_and_unserved_names_not_at_all() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    first, second = SotwProxy(cache, "gw"), SotwProxy(cache, "gw")
    first.ack(first.request(r.ENDPOINT_TYPE, [A, "default/gone"])[0])
    second.request(r.ENDPOINT_TYPE, [A])
    acks = XdsAcks()
    assert _poll(acks, cache, first, second) == {A: ClusterAcks(proxies=1, current=1)}
    cache.publish(build_snapshot([]))  # the workload is no longer served
    assert _poll(acks, cache, first, second) == {}
    assert A not in acks.versions
