"""Pod annotations and the hot-avoiding Service, decided (pure)."""

from __future__ import annotations

from typing import Any

import pytest
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
    desired_annotations,
    hold_latency,
    material,
    patch_body,
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
    assert got[PodKey("shop", "web-1")] == PodAnnotations(50, 300.0, 50)
    assert min(got, key=lambda k: got[k].deletion_cost) == PodKey("shop", "web-1")
    assert got[PodKey("shop", "web-2")].annotations() == {
        WEIGHT_ANNOTATION: "800", DELETION_COST_ANNOTATION: "800", LATENCY_ANNOTATION: "20.1",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, PodAnnotations(5, 1.0, 5), True),
        (PodAnnotations(5, 1.0, 5), None, True),
        (PodAnnotations(5, 10.0, 5), PodAnnotations(6, 10.0, 6), True),  # weight moved
        (PodAnnotations(5, 10.0, 5), PodAnnotations(5, 12.0, 5), False),  # 20%: noise
        (PodAnnotations(5, 10.0, 5), PodAnnotations(5, 13.0, 5), True),  # 30% and 3 ms
        (PodAnnotations(5, 1.0, 5), PodAnnotations(5, 1.9, 5), False),  # 90%, under 1 ms
        (PodAnnotations(5, None, 5), PodAnnotations(5, 3.0, 5), True),
    ],
)
def test_material_changes(
    old: PodAnnotations | None, new: PodAnnotations | None, expected: bool
) -> None:
    assert material(old, new) is expected


def test_noisy_latency_is_held_until_it_jumps_or_a_refresh_is_due() -> None:
    written = PodAnnotations(800, 10.0, 800)
    noisy = PodAnnotations(800, 17.0, 800)  # 70 %: material, but noise
    assert hold_latency(written, noisy, refresh_due=False) == written
    assert not material(written, hold_latency(written, noisy, refresh_due=False))
    assert hold_latency(written, noisy, refresh_due=True) == noisy
    jumped = PodAnnotations(800, 25.0, 800)  # 2.5x
    assert hold_latency(written, jumped, refresh_due=False) == jumped
    reweighed = PodAnnotations(500, 12.0, 500)  # a weight change carries the latency along
    assert hold_latency(written, reweighed, refresh_due=False) == reweighed
    tiny = PodAnnotations(800, 0.1, 800)
    assert hold_latency(PodAnnotations(800, 0.9, 800), tiny, refresh_due=False).latency_ms == 0.9
    assert hold_latency(None, noisy, refresh_due=False) == noisy


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
