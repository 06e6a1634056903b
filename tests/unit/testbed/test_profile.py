"""Phases and profiles: pure schedule lookups, validation, JSON, service-time sampling."""

from __future__ import annotations

import statistics

import pytest

from aviator.testbed.profile import (
    Distribution,
    Phase,
    Profile,
    backend_rng,
    sample_service_time,
)

SLOWDOWN = Profile.of(
    [
        Phase(0.0, mean_service_s=0.01, capacity=4),
        Phase(20.0, mean_service_s=0.16, capacity=4),
        Phase(40.0, mean_service_s=0.01, capacity=2, error_rate=0.5),
    ]
)


@pytest.mark.parametrize(
    ("elapsed", "index"),
    [(-5.0, 0), (0.0, 0), (19.999, 0), (20.0, 1), (39.0, 1), (40.0, 2), (1e9, 2)],
)
def test_phase_at_picks_the_phase_in_force(elapsed: float, index: int) -> None:
    assert SLOWDOWN.phase_at(elapsed) == SLOWDOWN.phases[index]


@pytest.mark.parametrize(
    ("elapsed", "expected"), [(0.0, 20.0), (19.9, 20.0), (20.0, 40.0), (40.0, None)]
)
def test_next_change_after(elapsed: float, expected: float | None) -> None:
    assert SLOWDOWN.next_change_after(elapsed) == expected


def test_of_sorts_phases() -> None:
    shuffled = Profile.of(list(reversed(SLOWDOWN.phases)))
    assert shuffled == SLOWDOWN


def test_json_round_trip() -> None:
    assert Profile.from_json(SLOWDOWN.to_json()) == SLOWDOWN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean_service_s": 0.0}, "mean_service_s must be > 0"),
        ({"capacity": 0}, "capacity must be >= 1"),
        ({"error_rate": 1.5}, "error_rate must be in"),
        ({"hidden_load": -0.1}, "hidden_load must be >= 0"),
        ({"start_s": -1.0}, "start_s must be"),
    ],
)
def test_phase_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Phase(**kwargs)  # type: ignore[arg-type]


def test_profile_validation() -> None:
    with pytest.raises(ValueError, match="at least one phase"):
        Profile(())
    with pytest.raises(ValueError, match="first phase must start at 0"):
        Profile((Phase(1.0),))
    with pytest.raises(ValueError, match="increase strictly"):
        Profile((Phase(0.0), Phase(5.0), Phase(5.0)))


def test_unknown_phase_field_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown phase field"):
        Phase.from_json({"start_s": 0, "capacty": 3})


def test_service_rate() -> None:
    assert Phase(capacity=4, mean_service_s=0.02).service_rate == pytest.approx(200.0)


def test_exponential_service_times_have_sd_equal_to_mean() -> None:
    rng = backend_rng(7, "b1")
    samples = [sample_service_time(rng, 0.05, Distribution.EXPONENTIAL) for _ in range(20_000)]
    assert statistics.fmean(samples) == pytest.approx(0.05, rel=0.05)
    assert statistics.stdev(samples) == pytest.approx(0.05, rel=0.05)
    assert min(samples) > 0


def test_constant_service_time() -> None:
    assert sample_service_time(backend_rng(1, "x"), 0.25, Distribution.CONSTANT) == 0.25


def test_backend_rng_is_deterministic_and_independent_per_backend() -> None:
    a1 = backend_rng(3, "a").random()
    assert backend_rng(3, "a").random() == a1
    assert backend_rng(3, "b").random() != a1
    assert backend_rng(4, "a").random() != a1


def test_window_changes_a_base_phase_for_a_while() -> None:
    base = Phase(mean_service_s=0.01, capacity=4)
    profile = Profile.window(base, 20.0, 40.0, mean_service_s=0.16, error_rate=0.1)
    assert profile.phase_at(10.0) == Phase(0.0, mean_service_s=0.01, capacity=4)
    assert profile.phase_at(30.0) == Phase(20.0, mean_service_s=0.16, capacity=4, error_rate=0.1)
    assert profile.phase_at(50.0) == Phase(40.0, mean_service_s=0.01, capacity=4)
    with pytest.raises(ValueError, match="0 < start_s < end_s"):
        Profile.window(base, 40.0, 20.0)
    with pytest.raises(TypeError):
        Profile.window(base, 1.0, 2.0, speed=3)
