"""Scenarios and capacity arithmetic of the latency benchmark (pure)."""

from __future__ import annotations

import pytest

from aviator.bench.scenarios import (
    SCENARIOS,
    Disturbance,
    FleetShape,
    Scenario,
    fleet_capacity,
    parse_scenarios,
    phase_capacity,
    plan,
    shift_profile,
)
from aviator.testbed.profile import Phase, Profile

SHAPE = FleetShape()  # 6 backends x 4 slots, 20 ms


def test_default_fleet_has_the_issue_capacity() -> None:
    # 6 backends, k=4, mean 20 ms -> 1,200 req/s.
    assert SHAPE.nominal_capacity == pytest.approx(1200.0)


def test_phase_capacity_takes_out_hidden_load_and_failures() -> None:
    assert phase_capacity(Phase(mean_service_s=0.02, capacity=4)) == pytest.approx(200.0)
    assert phase_capacity(Phase(mean_service_s=0.02, capacity=4, hidden_load=0.75)) == (
        pytest.approx(50.0)
    )
    assert phase_capacity(Phase(mean_service_s=0.02, capacity=4, error_rate=0.5)) == (
        pytest.approx(100.0)
    )
    # Hidden load above 100% leaves nothing, never a negative capacity.
    assert phase_capacity(Phase(mean_service_s=0.02, capacity=4, hidden_load=1.5)) == 0.0


@pytest.mark.parametrize(
    ("name", "capacity"),
    [
        ("static", 4 * 200 + 100 + 12.5),  # 16x and 2x slower backends
        ("antagonist", 5 * 200 + 20),  # one backend 10x slower at any time
        ("hidden", 4 * 200 + 50 + 100),  # 75% and 50% of two backends taken
        ("fastfail", 5 * 200 + 100),  # half of one backend's requests fail
        ("ramp", 1200),
    ],
)
def test_scenario_capacity_is_the_lowest_over_the_measured_window(
    name: str, capacity: float
) -> None:
    p = plan(SCENARIOS[name], SHAPE, load=0.7, duration_s=30, warmup_s=5)
    assert p.capacity == pytest.approx(capacity)
    if SCENARIOS[name].ramp is None:
        assert p.mean_rate == pytest.approx(0.7 * capacity)


def test_antagonist_moves_from_backend_to_backend_in_quarters_of_the_window() -> None:
    p = plan(SCENARIOS["antagonist"], SHAPE, load=0.7, duration_s=25, warmup_s=5)
    # Window 20 s: backend i is slow in [5 + 5i, 10 + 5i).
    for i in range(4):
        prof = p.profiles[i]
        assert prof.phase_at(5 + 5 * i - 0.01).mean_service_s == pytest.approx(0.02)
        assert prof.phase_at(5 + 5 * i + 0.01).mean_service_s == pytest.approx(0.2)
        assert prof.phase_at(10 + 5 * i - 0.01).mean_service_s == pytest.approx(0.2)
        if i < 3:
            assert prof.phase_at(10 + 5 * i + 0.01).mean_service_s == pytest.approx(0.02)
    for prof in p.profiles[4:]:
        assert len(prof.phases) == 1
    # Exactly one backend is slow at any instant of the measured window.
    for t in (5.5, 9.9, 10.1, 17.0, 24.9):
        slow = [i for i, prof in enumerate(p.profiles) if prof.phase_at(t).mean_service_s > 0.02]
        assert len(slow) == 1, t


def test_fastfail_starts_after_the_warmup() -> None:
    p = plan(SCENARIOS["fastfail"], SHAPE, load=0.5, duration_s=20, warmup_s=4)
    assert p.profiles[0].phase_at(3.9).error_rate == 0.0
    assert p.profiles[0].phase_at(4.1).error_rate == 0.5
    assert p.profiles[0].phase_at(19.9).error_rate == 0.5


def test_ramp_climbs_from_half_to_110_percent() -> None:
    p = plan(SCENARIOS["ramp"], SHAPE, load=0.7, duration_s=25, warmup_s=5)
    rates = [s.rate for s in p.steps]
    # The warm-up runs at 50%; then one step per second, each at its middle's load.
    assert rates[0] == pytest.approx(600.0)
    assert [s.start_s for s in p.steps[1:3]] == pytest.approx([5.0, 6.0])
    assert rates[1] == pytest.approx(1200 * (0.5 + 0.6 * 0.5 / 20))
    assert rates[-1] == pytest.approx(1200 * (0.5 + 0.6 * 19.5 / 20))
    assert rates == sorted(rates)
    # The ramp's own loads replace --load: its mean is 80% of capacity.
    assert p.load == pytest.approx(0.8)
    assert p.mean_rate == pytest.approx(0.8 * 1200)


def test_shift_profile_delays_every_change_but_keeps_the_start() -> None:
    prof = Profile.window(Phase(), 2.0, 4.0, mean_service_s=0.1)
    shifted = shift_profile(prof, 1.5)
    assert [p.start_s for p in shifted.phases] == [0.0, 3.5, 5.5]
    assert shifted.phase_at(3.4).mean_service_s == Phase().mean_service_s
    assert shifted.phase_at(3.6).mean_service_s == 0.1
    with pytest.raises(ValueError, match="lead_s"):
        shift_profile(prof, -1)


def test_fleet_capacity_sums_backends() -> None:
    assert fleet_capacity([Phase(mean_service_s=0.01, capacity=2)] * 3) == pytest.approx(600)


def test_parse_scenarios() -> None:
    assert [s.name for s in parse_scenarios("all")] == list(SCENARIOS)
    assert [s.name for s in parse_scenarios("ramp, static,ramp")] == ["ramp", "static"]
    with pytest.raises(ValueError, match="unknown scenario nope; known: static"):
        parse_scenarios("static,nope")


def test_plan_rejects_what_cannot_run() -> None:
    small = FleetShape(backends=3)
    with pytest.raises(ValueError, match=r"disturbs backend\(s\) \[3\], but the fleet has 3"):
        plan(SCENARIOS["antagonist"], small, load=0.7, duration_s=10, warmup_s=2)
    with pytest.raises(ValueError, match="load must be > 0"):
        plan(SCENARIOS["static"], SHAPE, load=0, duration_s=10, warmup_s=2)
    with pytest.raises(ValueError, match="warmup_s < duration_s"):
        plan(SCENARIOS["static"], SHAPE, load=0.5, duration_s=10, warmup_s=10)
    dead = Scenario(
        "dead", "dead", "all fail", tuple(Disturbance(i, error_rate=1.0) for i in range(6))
    )
    with pytest.raises(ValueError, match="no capacity"):
        plan(dead, SHAPE, load=0.5, duration_s=10, warmup_s=2)


def test_values_are_validated() -> None:
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        Disturbance(0, start=0.5, end=0.5)
    with pytest.raises(ValueError, match="slowdown"):
        Disturbance(0, slowdown=0)
    with pytest.raises(ValueError, match="overlapping disturbances on one backend"):
        Scenario("x", "x", "x", (Disturbance(0), Disturbance(0, slowdown=2)))
    with pytest.raises(ValueError, match="overlapping"):
        Scenario("x", "x", "x", (Disturbance(0, 0.0, 0.5), Disturbance(0, 0.4, 0.8)))
    with pytest.raises(ValueError, match="slots"):
        Scenario("x", "x", "x", slots=0)
    # Back to back on one backend is fine: a fast-moving antagonist.
    Scenario("x", "x", "x", (Disturbance(0, 0.0, 0.5), Disturbance(0, 0.5, 1.0, slowdown=2)))
    with pytest.raises(ValueError, match=">= 2 backends"):
        FleetShape(backends=1)


def test_a_fast_antagonist_visits_each_backend_several_times() -> None:
    p = plan(SCENARIOS["antagonist-fast"], SHAPE, load=0.7, duration_s=26, warmup_s=2)
    # 12 moves over 24 s: backend 0 slow at 2-4 s, 10-12 s and 18-20 s of load time.
    b0 = p.profiles[0]
    assert [round(ph.start_s, 6) for ph in b0.phases] == [0, 2, 4, 10, 12, 18, 20]
    assert b0.phase_at(3).mean_service_s == pytest.approx(10 * SHAPE.mean_service_s)
    assert b0.phase_at(5).mean_service_s == pytest.approx(SHAPE.mean_service_s)
    # One backend slow at any time: capacity is that of the fleet with one 10x slower.
    per = SHAPE.capacity / SHAPE.mean_service_s
    assert p.capacity == pytest.approx(per * (SHAPE.backends - 1) + per / 10)


def test_plain_scenarios_have_no_agent_few_slots_and_their_threshold() -> None:
    s = SCENARIOS["plain-tight"]
    p = plan(s, SHAPE, load=0.7, duration_s=10, warmup_s=2)
    assert not s.agent
    assert p.shape.capacity == 2
    assert all(ph.capacity == 2 for prof in p.profiles for ph in prof.phases)
    assert s.threshold_x == 1.25
