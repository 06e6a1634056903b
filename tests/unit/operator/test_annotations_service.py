"""Pod annotations and the hot-avoiding Service, decided (pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from aviator.k8s.objects import parse_pod, parse_workload
from aviator.k8s.policy import parse_policy_entry
from aviator.k8s.resolve import PolicyResolution, resolve
from aviator.model import EndpointAddress, Health, WeightedEndpoint
from aviator.operator.annotations import (
    DELETION_COST_ANNOTATION,
    LATENCY_ANNOTATION,
    MANAGED_LABEL,
    WEIGHT_ANNOTATION,
    PodAnnotations,
    PodKey,
    deletion_cost,
    desired_annotations,
    material,
    patch_body,
    settle,
)
from aviator.operator.service import (
    HotSetHysteresis,
    ServiceKey,
    desired_service,
    endpoint_ip_allowed,
    hot_cap,
    owned_by,
    service_name,
)
from aviator.probing.weigher import WeighResult
from tests.unit.k8s.builders import pod_doc, policy_doc, workload_doc


def resolution(n: int = 3, **spec: Any) -> PolicyResolution:
    (r,) = resolve(
        [parse_policy_entry(policy_doc(**spec))],
        [parse_workload(workload_doc())],
        [parse_pod(pod_doc(f"web-{i}", f"10.0.0.{i + 1}")) for i in range(n)],
    )
    return r


def result(r: PolicyResolution, weights: list[int], hot: tuple[int, ...] = ()) -> WeighResult:
    addresses = [e.address for e in r.endpoints]
    return WeighResult(
        {
            a: WeightedEndpoint(a, w, Health.HEALTHY)
            for a, w in zip(addresses, weights, strict=True)
        },
        hot=frozenset(addresses[i] for i in hot),
    )


# --- annotations ------------------------------------------------------------------------------


def test_annotations_only_for_opted_in_policies() -> None:
    r = resolution()
    assert desired_annotations(r, result(r, [1000, 50, 800]), {}) == {}


def test_the_slowest_pod_has_the_lowest_deletion_cost() -> None:
    r = resolution(annotatePods=True)
    lat = {e.address: s for e, s in zip(r.endpoints, [0.004, 0.3, 0.0201], strict=True)}
    got = desired_annotations(r, result(r, [1000, 50, 800], hot=(1,)), lat)
    assert got[PodKey("shop", "web-1")] == PodAnnotations(50, 300.0, 17)
    assert min(got, key=lambda k: got[k].deletion_cost) == PodKey("shop", "web-1")
    assert got[PodKey("shop", "web-2")].annotations() == {
        WEIGHT_ANNOTATION: "800", DELETION_COST_ANNOTATION: "29", LATENCY_ANNOTATION: "20.1",
    }  # fmt: skip


def test_deletion_costs_are_log_buckets_of_the_weight() -> None:
    assert [deletion_cost(w) for w in (1, 50, 800, 1000)] == [0, 17, 29, 30]
    costs = [deletion_cost(w) for w in range(1, 1001)]
    assert costs == sorted(costs)  # monotone: a lower weight never costs more


def test_settle_holds_what_is_written_unless_it_moved_a_lot() -> None:
    written = PodAnnotations(935, 10.0, deletion_cost(935))
    assert written.deletion_cost == 30

    def s(weight: int, latency: float, *, due: bool = False) -> PodAnnotations:
        return settle(written, PodAnnotations(weight, latency, deletion_cost(weight)),
                      refresh_due=due)  # fmt: skip

    assert s(920, 10.4) == written  # the noise of a weigher fed noisy latencies
    assert s(1000, 17.0) == written  # same bucket (30: 808..1009), a 1.7x latency
    assert s(790, 10.0) == written  # bucket 29 by the weight, but within the 10 % margin
    moved = s(600, 10.0)  # out of the bucket and its margin: new cost, new weight
    assert (moved.weight, moved.deletion_cost, moved.latency_ms) == (600, 28, 10.0)
    hot = s(50, 300.0)  # turned hot: everything at once
    assert hot == PodAnnotations(50, 300.0, 17)
    assert s(935, 25.0).latency_ms == 25.0  # a 2.5x latency jump
    assert s(935, 13.0).latency_ms == 10.0  # 1.3x: held...
    assert s(935, 13.0, due=True).latency_ms == 13.0  # ...until the pod's refresh
    assert s(935, 12.0, due=True).latency_ms == 10.0  # 1.2x is noise even then
    assert s(1200, 10.0, due=True).weight == 1200  # 1.28x at a refresh
    assert settle(None, hot, refresh_due=False) == hot
    assert settle(PodAnnotations(5, None, 7), PodAnnotations(5, 3.0, 7), refresh_due=False) == (
        PodAnnotations(5, 3.0, 7)
    )


@given(
    st.integers(60, 1000),
    st.floats(0.5, 500.0),
    st.lists(st.tuples(st.floats(1 / 1.09, 1.09), st.floats(1 / 1.9, 1.9)), max_size=50),
)
def test_noise_never_makes_a_write(
    base: int, latency: float, noise: list[tuple[float, float]]
) -> None:
    written = PodAnnotations(base, latency, deletion_cost(base))
    for w, lat in noise:
        weight = max(1, round(base * w))
        if not 1 / 1.09 <= weight / base <= 1.09:
            continue  # rounding took it past the factor: not noise any more
        desired = PodAnnotations(weight, latency * lat, deletion_cost(weight))
        assert not material(written, settle(written, desired, refresh_due=False))


def test_the_patch_sets_or_removes_only_aviators_keys() -> None:
    set_ = patch_body(PodAnnotations(7, None, 7))
    assert set_["metadata"]["annotations"] == {
        WEIGHT_ANNOTATION: "7", DELETION_COST_ANNOTATION: "7", LATENCY_ANNOTATION: None,
    }  # fmt: skip
    assert set_["metadata"]["labels"] == {MANAGED_LABEL: "true"}
    removed = patch_body(None)
    assert set(removed["metadata"]["annotations"].values()) == {None}
    assert removed["metadata"]["labels"] == {MANAGED_LABEL: None}


# --- the Service ------------------------------------------------------------------------------


def test_service_names_are_dns_1035_labels() -> None:
    assert service_name("web") == "web-aviator"
    assert service_name("api.v2") == "api-v2-aviator"
    assert service_name("9lives") == "s-9lives-aviator"
    long = service_name("a" * 80)
    assert len(long) == 63
    assert long.endswith("-aviator")
    assert long != service_name("a" * 81)


@given(st.integers(1, 200), st.floats(0.5, 0.99))
def test_hot_cap_matches_the_weighers_rule(n: int, q: float) -> None:
    cap = hot_cap(n, q)
    assert 1 <= cap <= n


def addr(i: int) -> EndpointAddress:
    return EndpointAddress(f"10.0.0.{i}", 8080)


ALL = [addr(i) for i in range(1, 7)]  # 6 endpoints; cap at the default quantile: 1


def test_hysteresis_out_when_hot_back_after_rejoin_delay() -> None:
    h, k = HotSetHysteresis(), ServiceKey("shop", "web-aviator")
    listed, at = h.listed(k, ALL, frozenset({addr(2)}), hot_quantile=0.84, now=0, rejoin_after=3)
    assert listed == frozenset(ALL) - {addr(2)}
    assert at is None  # hot: no rejoin scheduled
    listed, at = h.listed(k, ALL, frozenset(), hot_quantile=0.84, now=10, rejoin_after=3)
    assert addr(2) not in listed  # cold since 10: still out
    assert at == 13
    listed, _ = h.listed(k, ALL, frozenset({addr(2)}), hot_quantile=0.84, now=11, rejoin_after=3)
    listed, at = h.listed(k, ALL, frozenset(), hot_quantile=0.84, now=12, rejoin_after=3)
    assert at == 15  # hot again at 11: the delay restarts
    listed, at = h.listed(k, ALL, frozenset(), hot_quantile=0.84, now=15, rejoin_after=3)
    assert listed == frozenset(ALL)
    assert at is None


def test_never_fewer_than_the_cap_leaves_and_never_none() -> None:
    h, k = HotSetHysteresis(), ServiceKey("shop", "web-aviator")
    over = frozenset(ALL[:2])  # 2 hot of 6, cap 1: overloaded, list all
    assert h.listed(k, ALL, over, hot_quantile=0.84, now=0, rejoin_after=3)[0] == frozenset(ALL)
    every = frozenset(ALL)
    assert h.listed(k, ALL, every, hot_quantile=0.5, now=0, rejoin_after=3)[0] == frozenset(ALL)
    # One held out while recovering, another turns hot: holding both would exceed the cap.
    h.listed(k, ALL, frozenset({addr(1)}), hot_quantile=0.84, now=0, rejoin_after=3)
    listed, _ = h.listed(k, ALL, frozenset({addr(3)}), hot_quantile=0.84, now=1, rejoin_after=3)
    assert listed == frozenset(ALL) - {addr(3)}
    one = [addr(1)]
    assert h.listed(k, one, frozenset(one), hot_quantile=0.84, now=0, rejoin_after=3)[0] == {
        addr(1)
    }


@given(
    st.lists(st.integers(1, 20), min_size=1, max_size=20, unique=True),
    st.lists(st.tuples(st.sets(st.integers(1, 20)), st.floats(0, 5)), max_size=10),
    st.floats(0.5, 0.95),
)
def test_listed_is_never_below_what_the_cap_leaves(
    members: list[int], steps: list[tuple[set[int], float]], q: float
) -> None:
    h, k = HotSetHysteresis(), ServiceKey("n", "s")
    candidates = [addr(i) for i in members]
    now = 0.0
    for hot, dt in steps:
        now += dt
        listed, _ = h.listed(k, candidates, frozenset(addr(i) for i in hot), hot_quantile=q,
                             now=now, rejoin_after=2.0)  # fmt: skip
        assert listed <= set(candidates)
        assert len(listed) >= len(candidates) - hot_cap(len(candidates), q)
        assert listed


def test_the_desired_service_lists_what_it_is_told_with_the_targets_ports() -> None:
    r = resolution(publishService=True)
    listed = frozenset(e.address for e in r.endpoints[:2])
    s = desired_service(r, listed)
    assert s is not None
    assert s.key == ServiceKey("shop", "web-aviator")
    assert [(p.name, p.port) for p in s.ports] == [("http", 8080)]
    assert [e.pod for e in s.endpoints] == ["web-0", "web-1"]
    assert s.left_out == ("web-2",)
    body = s.endpoints_body()
    (subset,) = body["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == ["10.0.0.1", "10.0.0.2"]
    assert subset["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    svc = s.service_body()
    assert "selector" not in svc["spec"]
    assert owned_by(svc)
    assert desired_service(resolution(), listed) is None  # not opted in


def test_addresses_the_api_refuses_in_endpoints_are_left_out() -> None:
    assert not endpoint_ip_allowed("127.0.0.1")
    assert not endpoint_ip_allowed("169.254.1.1")
    assert not endpoint_ip_allowed("::1")
    assert endpoint_ip_allowed("10.0.0.1")
    assert endpoint_ip_allowed("fd00::1")


def test_owned_by_checks_the_label_and_the_owner() -> None:
    mine = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "aviator"},
                         "ownerReferences": [{"kind": "AviatorPolicy", "uid": "u1"}]}}  # fmt: skip
    assert owned_by(mine, "u1")
    assert not owned_by(mine, "u2")
    assert not owned_by({"metadata": {"labels": {}}})
