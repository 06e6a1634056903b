"""Reaction stages from polled traces (pure)."""

from __future__ import annotations

import pytest

from aviator.bench.reaction import Trace, reactions, summarize_reactions


def _tr(t: float, lat: float, weight: int, envoy: int, *, hot: bool = False, n: int = 0) -> Trace:
    other = {"latency_ms": 20.0, "rif": 1.0, "samples": n, "weight": 1000, "hot": False}
    mine = {"latency_ms": lat, "rif": 1.0, "samples": n, "weight": weight, "hot": hot}
    return Trace(t=t, control={"b0": mine, "b1": other}, envoy={"b0": envoy, "b1": 1000})


def test_each_stage_is_timed_from_the_slowdown() -> None:
    traces = [
        _tr(0.95, 20, 1000, 1000, n=9),
        _tr(1.05, 20, 1000, 1000, n=10),
        _tr(1.10, 45, 1000, 1000, n=11),  # the estimate moved: 100 ms
        _tr(1.20, 120, 1000, 1000, n=12),  # above the 100 ms threshold: 200 ms
        _tr(1.25, 150, 50, 1000, hot=True, n=13),  # floored: 250 ms
        _tr(1.35, 150, 50, 50, hot=True, n=14),  # Envoy holds it: 350 ms
    ]
    (r,) = reactions(traces, [("b0", 1.0, 3.0)], threshold_ms=100)
    assert r.delays_ms == pytest.approx(
        {"signal": 100.0, "crossed": 200.0, "floored": 250.0, "envoy": 350.0}
    )


def test_a_stage_that_never_shows_is_none_and_counted() -> None:
    traces = [_tr(0.9, 20, 1000, 1000), _tr(1.1, 20, 1000, 1000), _tr(1.2, 20, 1000, 1000)]
    rs = reactions(traces, [("b0", 1.0, 2.0), ("b9", 1.0, 2.0)], threshold_ms=100)
    assert all(v is None for r in rs for v in r.delays_ms.values())
    summary = summarize_reactions(rs)
    assert summary["envoy"] == {
        "median_ms": None,
        "min_ms": None,
        "max_ms": None,
        "seen": 0,
        "of": 2,
    }
