"""ACK counting, the versions that carry a cluster's current endpoints, replica reports."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aviator.operator.acks import (
    MAX_MESSAGE_LENGTH,
    MAX_MESSAGES,
    ClusterAcks,
    EndpointVersions,
    ProxyHolding,
    ReportError,
    cluster_acks,
    decode_report,
    encode_report,
    merge_acks,
)

A = frozenset({"10.0.0.1:80", "10.0.0.2:80"})
B = frozenset({"10.0.0.1:80"})


def test_weight_only_versions_keep_carrying_the_current_endpoints() -> None:
    v = EndpointVersions()
    v.observe("shop/web", "v1", A)
    v.observe("shop/web", "v2", A)  # weights moved, same addresses
    assert v.carries_current("shop/web", "v1")
    assert v.carries_current("shop/web", "v2")
    v.observe("shop/web", "v3", B)  # a pod left
    assert not v.carries_current("shop/web", "v1")
    assert v.carries_current("shop/web", "v3")
    assert not v.carries_current("shop/web", None)
    assert not v.carries_current("shop/other", "v3")


def test_endpoint_versions_are_bounded_and_forget_clusters() -> None:
    v = EndpointVersions(keep=2)
    for i in range(5):
        v.observe("c", f"v{i}", A)
    assert [v.carries_current("c", f"v{i}") for i in range(5)] == [False] * 3 + [True] * 2
    v.retain([])
    assert "c" not in v


def test_holdings_count_per_node_and_cluster() -> None:
    v = EndpointVersions()
    v.observe("shop/web", "v2", A)
    v.observe("shop/db", "d1", B)
    holdings = [
        ProxyHolding("gw-1", "shop/web", "v2"),
        ProxyHolding("gw-1", "shop/web", None),  # a second stream of the same node
        ProxyHolding("gw-2", "shop/web", "v1", rejection="weight 0"),
        ProxyHolding("gw-3", "shop/web", "v1"),  # not ACKed the new one yet
        ProxyHolding("gw-1", "shop/db", "d1"),
    ]
    acks = cluster_acks(holdings, v)
    assert acks["shop/web"] == ClusterAcks(proxies=3, current=1, rejected=1, messages=("weight 0",))
    assert acks["shop/web"].pending == 1
    assert acks["shop/db"] == ClusterAcks(1, 1)


def test_merge_adds_replicas_and_bounds_messages() -> None:
    a = ClusterAcks(2, 1, 1, ("m1",))
    b = ClusterAcks(3, 3)
    c = ClusterAcks(4, 0, 4, ("m2", "m3", "m4", "m1"))
    merged = merge_acks(a, None, b, c)
    assert (merged.proxies, merged.current, merged.rejected) == (9, 4, 5)
    assert merged.messages == ("m1", "m2", "m3")[:MAX_MESSAGES]
    long = ClusterAcks(1, 0, 1, ("x" * 5000,))
    assert len(long.messages[0]) == MAX_MESSAGE_LENGTH


def test_counts_must_add_up() -> None:
    with pytest.raises(ValueError, match="current \\+ rejected > proxies"):
        ClusterAcks(1, 1, 1)
    with pytest.raises(ValueError, match=">= 0"):
        ClusterAcks(-1)


acks_strategy = st.builds(
    lambda p, c, r, m: ClusterAcks(p + c + r, c, r, tuple(m)),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(0, 50),
    st.lists(st.text(max_size=20), max_size=4),
)


@given(st.dictionaries(st.text(min_size=1, max_size=30), acks_strategy, max_size=30))
def test_reports_round_trip(acks: dict[str, ClusterAcks]) -> None:
    text, dropped = encode_report(acks)
    assert dropped == 0
    assert decode_report(text) == {k: a for k, a in acks.items() if a.proxies > 0}


def test_a_report_too_big_drops_the_clusters_with_fewest_proxies() -> None:
    acks = {f"ns/w{i:04d}": ClusterAcks(i + 1, i + 1) for i in range(2000)}
    text, dropped = encode_report(acks, limit_bytes=10_000)
    assert len(text) <= 10_000
    kept = decode_report(text)
    assert dropped == 2000 - len(kept) > 0
    assert min(a.proxies for a in kept.values()) > max(
        a.proxies for k, a in acks.items() if k not in kept
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nope", "not JSON"),
        (json.dumps({"v": 2, "clusters": {}}), '"v": 1'),
        (json.dumps({"v": 1, "clusters": []}), '"clusters" must be an object'),
        (json.dumps({"v": 1, "clusters": {"a": [1, 2]}}), "cluster 'a'"),
        (json.dumps({"v": 1, "clusters": {"a": [1, 2, 0, []]}}), "current \\+ rejected"),
        (json.dumps({"v": 1, "clusters": {"a": [1, True, 0, []]}}), "integers"),
    ],
)
def test_bad_reports_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ReportError, match=error):
        decode_report(text)
