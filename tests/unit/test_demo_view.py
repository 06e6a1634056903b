"""The demo's pure parts: percentiles, frames, the summary and its verdict, its plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from aviator.demo.scenario import (
    PODS,
    SLOWED_POD,
    WORKLOAD,
    demo_backends,
    pick_addresses,
    write_objects,
)
from aviator.demo.session import DemoOptions
from aviator.demo.view import (
    Completion,
    DemoPod,
    Phase,
    Slowdown,
    build_frame,
    percentile,
    render_frame,
    render_summary,
    summarize,
)
from aviator.k8s.resolve import resolve_state, serving
from aviator.source.directory import load_directory

PODS_3 = (
    DemoPod("web-a", "127.0.0.2:8080", 15.0),
    DemoPod("web-b", "127.0.0.3:8080", 25.0),
    DemoPod("web-c", "127.0.0.4:8080", 10.0),
)
SLOW = Slowdown("web-c", 10.0, 20.0, 10.0)


def traffic(per_second: dict[int, dict[str, int]], latency_s: float = 0.01) -> list[Completion]:
    """``count`` requests answered by each pod in each second, spread over the second."""
    out = []
    for second, counts in per_second.items():
        for pod, n in counts.items():
            for i in range(n):
                sent = second + i / n
                out.append(Completion(sent, sent + latency_s, pod, None))
    return out


def run_shares(
    before: dict[str, int], during: dict[str, int], after: dict[str, int]
) -> dict[int, dict[str, int]]:
    return {
        **dict.fromkeys(range(10), before),
        **dict.fromkeys(range(10, 20), during),
        **dict.fromkeys(range(20, 30), after),
    }


# -- percentile -------------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 0)


def test_completion_cannot_end_before_it_is_sent() -> None:
    with pytest.raises(ValueError, match="before it is sent"):
        Completion(2.0, 1.0, "web-a", None)
    assert Completion(1.0, 1.25, "web-a", None).latency_s == pytest.approx(0.25)


def test_slowdown_phases() -> None:
    assert SLOW.phase_at(0.0) is Phase.BEFORE
    assert SLOW.phase_at(9.99) is Phase.BEFORE
    assert SLOW.phase_at(10.0) is Phase.DURING
    assert SLOW.phase_at(20.0) is Phase.AFTER
    with pytest.raises(ValueError, match="start_s < end_s"):
        Slowdown("web-c", 5.0, 5.0, 2.0)


# -- summary ----------------------------------------------------------------------------------


def test_summary_shares_per_phase_and_verdict_when_traffic_leaves() -> None:
    done = traffic(
        run_shares(
            before={"web-a": 30, "web-b": 20, "web-c": 50},
            during={"web-a": 60, "web-b": 36, "web-c": 4},
            after={"web-a": 35, "web-b": 25, "web-c": 40},
        )
    )
    s = summarize(done, pods=PODS_3, slowdown=SLOW, duration_s=30, ran_s=30, rate=100)
    share = {p.pod: p.share for p in s.pods}
    assert share["web-c"] == {Phase.BEFORE: 0.5, Phase.DURING: 0.04, Phase.AFTER: 0.4}
    assert share["web-a"][Phase.DURING] == pytest.approx(0.6)
    assert s.requests == len(done) == s.ok
    assert s.errors == {}
    assert s.traffic_left
    assert s.reaction_s == 1.0  # the first second of the slowdown already had 4%
    assert s.verdict == (
        "traffic left the slowed backend web-c: 50% → 4% (within 1 s), 40% after the slowdown"
    )
    assert len(s.slowed_share_by_second) == 30
    assert s.slowed_share_by_second[0] == 0.5
    assert s.slowed_share_by_second[15] == 0.04
    text = render_summary(s)
    assert s.verdict in text
    assert "50% (10 ms)" in text  # web-c before: share and p99


def test_reaction_time_is_the_first_second_below_half_the_share() -> None:
    per_second = run_shares(
        before={"web-a": 50, "web-c": 50},
        during={"web-a": 90, "web-c": 10},
        after={"web-a": 50, "web-c": 50},
    )
    per_second[10] = {"web-a": 50, "web-c": 50}  # no change in the first two seconds
    per_second[11] = {"web-a": 60, "web-c": 40}
    s = summarize(traffic(per_second), pods=PODS_3, slowdown=SLOW, duration_s=30, ran_s=30, rate=1)
    assert s.traffic_left
    assert s.reaction_s == 3.0


def test_verdict_when_traffic_stays() -> None:
    done = traffic(
        run_shares(
            before={"web-a": 34, "web-b": 33, "web-c": 33},
            during={"web-a": 40, "web-b": 30, "web-c": 30},
            after={"web-a": 34, "web-b": 33, "web-c": 33},
        )
    )
    s = summarize(done, pods=PODS_3, slowdown=SLOW, duration_s=30, ran_s=30, rate=100)
    assert not s.traffic_left
    assert s.reaction_s is None
    assert s.verdict.startswith("traffic did NOT leave the slowed backend web-c: 33% → 30%")


def test_errors_count_but_are_no_pods_share() -> None:
    done = traffic({0: {"web-a": 3, "web-c": 1}, 12: {"web-a": 4}})
    done += [
        Completion(1.0, 6.0, None, "timeout"),
        Completion(1.5, 1.6, None, "http_503"),
        Completion(2.0, 2.1, "web-c", "http_503"),  # a pod's own error is its traffic
    ]
    s = summarize(done, pods=PODS_3, slowdown=SLOW, duration_s=30, ran_s=30, rate=10)
    assert s.errors == {"http_503": 2, "timeout": 1}
    assert s.ok == len(done) - 3
    share = {p.pod: p.share for p in s.pods}
    assert share["web-c"][Phase.BEFORE] == pytest.approx(2 / 5)
    assert share["web-b"][Phase.BEFORE] == 0.0
    assert share["web-a"][Phase.AFTER] is None  # nothing was sent after t=20
    assert s.p99_ms == 5000.0  # the timeout counts in the clients' latency


def test_summary_of_nothing() -> None:
    s = summarize([], pods=PODS_3, slowdown=SLOW, duration_s=30, ran_s=3, rate=10, interrupted=True)
    assert s.requests == 0
    assert s.p99_ms is None
    assert not s.traffic_left
    assert s.verdict.startswith("not enough traffic to judge")
    assert "(interrupted)" in render_summary(s)
    assert s.to_json()["interrupted"] is True


# -- frames -----------------------------------------------------------------------------------


def test_frame_joins_clients_aviator_and_envoy() -> None:
    ended = traffic({14: {"web-a": 6, "web-b": 3, "web-c": 1}})
    ended.append(Completion(14.0, 14.5, "web-c", None))  # web-c's slow request
    ended.append(Completion(14.2, 14.3, None, "http_503"))
    frame = build_frame(
        t_s=15.0,
        duration_s=30,
        interval_s=2,
        rate=100,
        slowdown=SLOW,
        pods=PODS_3,
        ended=ended,
        aviator=[
            {"address": "127.0.0.2:8080", "latency_ms": 11.0, "rif": 0.5, "weight": 1000,
             "health": "HEALTHY", "hot": False},
            {"address": "127.0.0.4:8080", "latency_ms": 120.0, "rif": 6.0, "weight": 50,
             "health": "HEALTHY", "hot": True},
        ],
        envoy={"127.0.0.2:8080": {"weight": 1000, "rq_active": 2},
               "127.0.0.4:8080": {"weight": 50, "rq_active": 5}},
    )  # fmt: skip
    assert frame.phase is Phase.DURING
    assert frame.ended == 12
    assert frame.errors == 1
    rows = {p.pod: p for p in frame.pods}
    assert rows["web-a"].share == pytest.approx(6 / 11)
    assert rows["web-c"].share == pytest.approx(2 / 11)
    assert rows["web-c"].p99_ms == 500.0
    assert rows["web-c"].slowed
    assert not rows["web-a"].slowed
    assert (rows["web-c"].weight, rows["web-c"].envoy_weight, rows["web-c"].hot) == (50, 50, True)
    assert (rows["web-b"].weight, rows["web-b"].envoy_weight) == (None, None)
    text = render_frame(frame)
    assert "SLOWDOWN: web-c serves 10x slower until t=20s" in text
    line_c = next(line for line in text.splitlines() if line.startswith("web-c"))
    for expected in ("120.0 ms", "18%", "500.0 ms", "HEALTHY hot <- slowed"):
        assert expected in line_c
    line_b = next(line for line in text.splitlines() if line.startswith("web-b"))
    assert " - " in line_b  # unknown values are shown as '-', not 0


# -- the plan ---------------------------------------------------------------------------------


def test_pick_addresses_skips_busy_ones() -> None:
    busy = {"127.0.0.2", "127.0.0.4"}
    picked = pick_addresses(3, first="127.0.0.2", port=8080, is_free=lambda h, p: h not in busy)
    assert picked == ["127.0.0.3", "127.0.0.5", "127.0.0.6"]


def test_pick_addresses_errors() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.N"):
        pick_addresses(3, first="10.0.0.2")
    with pytest.raises(ValueError, match=r"busy: 127\.0\.0\.253, 127\.0\.0\.254"):
        pick_addresses(3, first="127.0.0.253", is_free=lambda h, p: False)


def test_options_checks() -> None:
    assert DemoOptions().slowdown == Slowdown(SLOWED_POD, 13.3, 26.7, 10.0)
    assert DemoOptions(duration_s=15).slowdown.start_s == 5.0
    with pytest.raises(ValueError, match="--duration"):
        DemoOptions(duration_s=3)
    with pytest.raises(ValueError, match="--rate"):
        DemoOptions(rate=0)
    with pytest.raises(ValueError, match="--interval"):
        DemoOptions(interval_s=0.05)


def test_objects_resolve_to_one_endpoint_per_backend(tmp_path: Path) -> None:
    hosts = ["127.0.0.7", "127.0.0.8", "127.0.0.9"]
    backends = demo_backends(hosts, port=8081, slowdown=(5.0, 10.0))
    write_objects(tmp_path, backends)
    state = load_directory(tmp_path)
    assert not state.problems
    served = serving(resolve_state(state))
    assert list(served) == [WORKLOAD]
    endpoints = served[WORKLOAD].endpoints
    assert sorted(str(e.address) for e in endpoints) == [f"{h}:8081" for h in hosts]
    assert sorted(e.pod for e in endpoints) == [name for name, _ in PODS]
    slowed = next(b for b in backends if b.name == SLOWED_POD)
    assert [p.start_s for p in slowed.profile.phases] == [0.0, 5.0, 10.0]
    assert slowed.profile.phase_at(7).mean_service_s == pytest.approx(
        10 * slowed.profile.phase_at(0).mean_service_s
    )
    steady = demo_backends(hosts, slowdown=None)
    assert all(len(b.profile.phases) == 1 for b in steady)
