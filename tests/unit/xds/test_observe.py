"""What the ADS server tells about itself: the push-delay and convergence histograms (on a
fake clock), and CSDS's per-resource status read from the streams' state."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, string_pb2
from prometheus_client import CollectorRegistry

from aviator.xds import csds
from aviator.xds import resources as r
from aviator.xds.cache import Cache
from aviator.xds.delta import DeltaStream
from aviator.xds.metrics import XdsMetrics
from aviator.xds.protocol import ProtocolStream
from aviator.xds.snapshot import build_snapshot
from aviator.xds.sotw import SotwStream
from tests.unit.xds.fakes import DeltaProxy, SotwProxy, workload


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: XdsMetrics, name: str, type_: str) -> float:
    return metrics.registry.get_sample_value(name, {"type": type_}) or 0.0


def _sotw(cache: Cache, metrics: XdsMetrics, clock: Clock, node: str = "proxy-1") -> SotwProxy:
    proxy = SotwProxy(cache, node, metrics=metrics)
    proxy.stream = SotwStream(cache, **proxy.stream_options, clock=clock)
    return proxy


def _connected(proxy: SotwProxy) -> None:
    """CDS and the EDS of every cluster, all ACKed."""
    (cds,) = proxy.request(r.CLUSTER_TYPE, [])
    proxy.ack(cds)
    (eds,) = proxy.request(r.ENDPOINT_TYPE, sorted(proxy.names(cds)))
    proxy.ack(eds)


def test_convergence_is_from_publish_to_ack_and_old_state_is_not_counted() -> None:
    clock = Clock()
    cache = Cache()
    metrics = XdsMetrics(CollectorRegistry(), cache=cache, clock=clock)
    cache.publish(build_snapshot([workload("a", 1), workload("b", 1)]))
    clock.now = 100.0  # the proxy connects long after: its initial fetch is no "change"
    proxy = _sotw(cache, metrics, clock)
    _connected(proxy)
    for name in ("aviator_xds_convergence_seconds_count", "aviator_xds_push_delay_seconds_count"):
        assert _sample(metrics, name, "cds") == _sample(metrics, name, "eds") == 0

    clock.now = 200.0
    cache.publish(build_snapshot([workload("a", 5), workload("b", 1)]))  # a's weights
    clock.now = 200.25
    (eds,) = proxy.flush()
    assert proxy.names(eds) == ["default/a"]
    clock.now = 201.0
    proxy.ack(eds)
    assert _sample(metrics, "aviator_xds_push_delay_seconds_count", "eds") == 1
    assert _sample(metrics, "aviator_xds_push_delay_seconds_sum", "eds") == pytest.approx(0.25)
    assert _sample(metrics, "aviator_xds_convergence_seconds_count", "eds") == 1
    assert _sample(metrics, "aviator_xds_convergence_seconds_sum", "eds") == pytest.approx(1.0)
    assert _sample(metrics, "aviator_xds_convergence_seconds_count", "cds") == 0

    # A response merging two publishes is timed from the older change it carries (b at 300),
    # a second proxy connected before the change converges on its own clock.
    late = _sotw(cache, metrics, clock, "proxy-2")
    _connected(late)
    clock.now = 300.0
    cache.publish(build_snapshot([workload("a", 5), workload("b", 2)]))
    clock.now = 300.5
    (eds,) = proxy.flush()
    clock.now = 301.0
    cache.publish(build_snapshot([workload("a", 6), workload("b", 2)]))  # while in flight
    clock.now = 302.0
    proxy.ack(eds)  # b only
    (eds,) = proxy.inbox  # a, pushed after the ACK
    clock.now = 303.0
    proxy.ack(eds)
    (eds_late,) = late.flush()
    assert sorted(late.names(eds_late)) == ["default/a", "default/b"]
    clock.now = 310.0
    late.ack(eds_late)
    assert _sample(metrics, "aviator_xds_convergence_seconds_count", "eds") == 4
    # 1 (first change) + 2 (b: 300 → 302) + 2 (a: 301 → 303) + 10 (both: from 300)
    assert _sample(metrics, "aviator_xds_convergence_seconds_sum", "eds") == pytest.approx(15.0)


def test_without_a_cache_the_histograms_stay_empty() -> None:
    cache = Cache()
    metrics = XdsMetrics(CollectorRegistry())  # not following any cache
    cache.publish(build_snapshot([workload("a", 1)]))
    proxy = SotwProxy(cache, metrics=metrics)
    _connected(proxy)
    cache.publish(build_snapshot([workload("a", 2)]))
    proxy.ack_all()
    assert _sample(metrics, "aviator_xds_convergence_seconds_count", "eds") == 0


# -- CSDS ----------------------------------------------------------------------------------------


def _status(stream: ProtocolStream[Any, Any]) -> dict[tuple[str, str], tuple[str, str, str]]:
    return {
        (r.TYPE_SHORT[c.type_url], c.name): (
            dump_pb2.ClientResourceStatus.Name(c.client_status),
            csds_pb2.ConfigStatus.Name(c.config_status),
            c.version_info,
        )
        for c in csds.resource_configs(stream, contents=False)
    }


def test_csds_status_follows_the_stream_acked_stale_nacked() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    proxy = SotwProxy(cache)
    (cds,) = proxy.request(r.CLUSTER_TYPE, [])
    # Sent, not answered yet: STALE; the proxy holds nothing yet: REQUESTED.
    assert _status(proxy.stream) == {("cds", "default/a"): ("REQUESTED", "STALE", "")}
    proxy.ack(cds)
    (eds,) = proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/missing"])
    proxy.ack(eds)
    v1 = cache.get(r.ENDPOINT_TYPE, "default/a")
    assert v1 is not None
    status = _status(proxy.stream)
    assert status[("eds", "default/a")] == ("ACKED", "SYNCED", v1.version)
    # Asked for, not in the cache: REQUESTED, nothing sent.
    assert status[("eds", "default/missing")] == ("REQUESTED", "NOT_SENT", "")

    cache.publish(build_snapshot([workload("a", 7)]))
    (eds,) = proxy.flush()
    assert _status(proxy.stream)[("eds", "default/a")] == ("ACKED", "STALE", v1.version)
    proxy.nack(eds, "weights out of range")
    v2 = cache.get(r.ENDPOINT_TYPE, "default/a")
    assert v2 is not None
    (config,) = [
        c for c in csds.resource_configs(proxy.stream) if c.type_url == r.ENDPOINT_TYPE
        and c.name == "default/a"
    ]  # fmt: skip
    assert dump_pb2.ClientResourceStatus.Name(config.client_status) == "NACKED"
    assert csds_pb2.ConfigStatus.Name(config.config_status) == "ERROR"
    assert config.version_info == v1.version  # what the proxy still holds
    assert config.error_state.version_info == v2.version
    assert config.error_state.details == "weights out of range"
    assert config.error_state.failed_configuration == v2.any
    assert config.xds_config == v2.any
    # A valid change is ACKed: SYNCED again, the NACK is history.
    cache.publish(build_snapshot([workload("a", 8)]))
    proxy.flush()
    proxy.ack_all()
    v3 = cache.get(r.ENDPOINT_TYPE, "default/a")
    assert v3 is not None
    assert _status(proxy.stream)[("eds", "default/a")] == ("ACKED", "SYNCED", v3.version)


def test_csds_delta_reports_names_that_do_not_exist() -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload("a", 1)]))
    proxy = DeltaProxy(cache)
    proxy.request(r.CLUSTER_TYPE, ["*"])
    proxy.ack_all()
    proxy.request(r.ENDPOINT_TYPE, ["default/a", "default/gone"])
    proxy.ack_all()
    assert isinstance(proxy.stream, DeltaStream)
    status = _status(proxy.stream)
    assert status[("eds", "default/gone")][:2] == ("DOES_NOT_EXIST", "NOT_SENT")
    assert status[("eds", "default/a")][:2] == ("ACKED", "SYNCED")
    assert status[("cds", "default/a")][:2] == ("ACKED", "SYNCED")


def _matcher(**kw: Any) -> node_pb2.NodeMatcher:
    return node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(**kw))


@pytest.mark.parametrize(
    ("matchers", "matches"),
    [
        ([], True),
        ([node_pb2.NodeMatcher()], True),
        ([_matcher(exact="gw-1")], True),
        ([_matcher(exact="GW-1")], False),
        ([_matcher(exact="GW-1", ignore_case=True)], True),
        ([_matcher(prefix="gw-")], True),
        ([_matcher(suffix="-1")], True),
        ([_matcher(contains="w-")], True),
        ([_matcher(exact="gw-2")], False),
        ([_matcher(exact="gw-2"), _matcher(prefix="gw")], True),  # OR
    ],
)
def test_node_matchers(matchers: list[node_pb2.NodeMatcher], matches: bool) -> None:
    assert csds.node_matches("gw-1", matchers) is matches


@pytest.mark.parametrize(
    ("matcher", "message"),
    [
        (_matcher(safe_regex={"regex": ".*"}), "safe_regex is not supported"),
        (
            node_pb2.NodeMatcher(node_metadatas=[{"path": [{"key": "x"}]}]),
            "node_metadatas is not supported",
        ),
    ],
)
def test_unsupported_matchers_are_refused_whoever_is_connected(
    matcher: node_pb2.NodeMatcher, message: str
) -> None:
    request = csds_pb2.ClientStatusRequest(node_matchers=[matcher])
    with pytest.raises(csds.CsdsRequestError, match=message) as info:
        csds.client_status([], request)
    assert info.value.code == "INVALID_ARGUMENT"


def test_too_many_resources_is_refused_with_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache()
    cache.publish(build_snapshot([workload(n, 1) for n in "abcde"]))
    proxy = SotwProxy(cache)
    _connected(proxy)
    monkeypatch.setattr(csds, "MAX_RESOURCES", 9)
    with pytest.raises(csds.CsdsRequestError, match="hold 10 resources") as info:
        csds.client_status([proxy.stream], csds_pb2.ClientStatusRequest())
    assert info.value.code == "RESOURCE_EXHAUSTED"
    narrow = csds_pb2.ClientStatusRequest(node_matchers=[_matcher(exact="nobody")])
    assert list(csds.client_status([proxy.stream], narrow).config) == []
