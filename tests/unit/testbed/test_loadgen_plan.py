"""The load generator's pure parts: timeline, target split, spec and result JSON."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from aviator.testbed.loadresult import LatencySummary, new_histogram
from aviator.testbed.loadspec import (
    LoadSpec,
    RateStep,
    Split,
    arrival_times,
    assign_targets,
    plan,
)

TARGETS = ("http://127.0.0.1:10000", "http://127.0.0.1:10001", "http://127.0.0.1:10002")


def test_arrivals_are_poisson_at_the_rate() -> None:
    times = arrival_times([RateStep(0.0, 1000.0)], 20.0, random.Random(1))
    assert times == sorted(times)
    assert all(0 <= t < 20.0 for t in times)
    # 20,000 expected; a Poisson count has sd ~141.
    assert 19_400 <= len(times) <= 20_600
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(0.001, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.001, rel=0.05)  # exponential: sd = mean


def test_rate_steps_shape_the_timeline() -> None:
    steps = [RateStep(0.0, 100.0), RateStep(10.0, 0.0), RateStep(20.0, 400.0)]
    times = arrival_times(steps, 30.0, random.Random(2))
    first = [t for t in times if t < 10]
    silent = [t for t in times if 10 <= t < 20]
    last = [t for t in times if t >= 20]
    assert silent == []
    assert 800 <= len(first) <= 1200
    assert 3600 <= len(last) <= 4400


def test_steps_past_the_duration_are_ignored() -> None:
    times = arrival_times([RateStep(0.0, 50.0), RateStep(100.0, 5000.0)], 10.0, random.Random(3))
    assert all(t < 10.0 for t in times)
    assert len(times) < 1000


def test_round_robin_split() -> None:
    assert assign_targets(7, 3, Split.ROUND_ROBIN, random.Random(0)) == [0, 1, 2, 0, 1, 2, 0]


def test_random_split_uses_every_target() -> None:
    idx = assign_targets(3000, 3, Split.RANDOM, random.Random(0))
    counts = [idx.count(i) for i in range(3)]
    assert all(900 <= c <= 1100 for c in counts)


def test_plan_is_deterministic_per_seed() -> None:
    spec = LoadSpec(TARGETS, duration_s=5.0, rate=200.0, seed=11, split=Split.RANDOM)
    assert plan(spec) == plan(spec)
    other = LoadSpec(TARGETS, duration_s=5.0, rate=200.0, seed=12, split=Split.RANDOM)
    assert plan(other)[0] != plan(spec)[0]
    times, targets = plan(spec)
    assert len(times) == len(targets)


def test_spec_json_round_trip() -> None:
    spec = LoadSpec(
        TARGETS,
        duration_s=60.0,
        steps=(RateStep(0.0, 500.0), RateStep(30.0, 1100.0)),
        host="echo.default",
        path="/work",
        seed=4,
        deadline_s=2.0,
        split=Split.RANDOM,
        connection_limit=500,
        warmup_s=5.0,
    )
    assert LoadSpec.from_json(spec.to_json()) == spec
    assert spec.schedule() == spec.steps
    assert LoadSpec(TARGETS, duration_s=1.0, rate=7.0).schedule() == (RateStep(0.0, 7.0),)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ()}, "at least one target"),
        ({"targets": ("127.0.0.1:80",)}, "http"),
        ({"duration_s": 0.0}, "duration_s must be > 0"),
        ({"rate": -1.0}, "rate must be >= 0"),
        ({"steps": (RateStep(1.0, 5.0),)}, "first rate step must start at 0"),
        ({"steps": (RateStep(0.0, 5.0), RateStep(0.0, 6.0))}, "increase strictly"),
        ({"path": "x"}, "path must start with"),
        ({"deadline_s": 0.0}, "deadline_s must be > 0"),
        ({"warmup_s": 10.0}, "warmup_s must be in"),
        ({"connection_limit": 0}, "connection_limit"),
    ],
)
def test_spec_validation(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"targets": TARGETS, "duration_s": 10.0}
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LoadSpec(**base)  # type: ignore[arg-type]


def test_latency_summary_of_histogram() -> None:
    hist = new_histogram()
    for ms in range(1, 1001):  # 1..1000 ms
        hist.record_value(ms * 1000)
    s = LatencySummary.of(hist)
    assert s.count == 1000
    assert s.p50_ms == pytest.approx(500, rel=0.002)
    assert s.p99_ms == pytest.approx(990, rel=0.002)
    assert s.max_ms == pytest.approx(1000, rel=0.002)
    assert LatencySummary.of(new_histogram()) == LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert LatencySummary.from_json(s.to_json()) == s
