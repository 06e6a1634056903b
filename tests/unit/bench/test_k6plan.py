"""The k6 plan and the parsing of k6's output (pure): arrivals, VUs, latency from the intended
send time, and the keep-up verdict."""

from __future__ import annotations

import pytest

from aviator.testbed.k6plan import K6Plan, k6_config, parse_k6_output, plan_k6
from aviator.testbed.loadspec import LoadSpec, RateStep


def _spec(**kw: object) -> LoadSpec:
    base: dict[str, object] = {
        "targets": ("http://127.0.0.1:1", "http://127.0.0.1:2"),
        "duration_s": 10.0,
        "rate": 100.0,
        "seed": 7,
        "warmup_s": 2.0,
        "deadline_s": 1.0,
    }
    base.update(kw)
    return LoadSpec(**base)  # type: ignore[arg-type]


def test_uniform_lattice_sends_every_slot_round_robin() -> None:
    plan = plan_k6(_spec(), thinning=1)
    assert plan.period_s == pytest.approx(0.01)
    sending = [c for c in plan.slots if c != "."]
    assert len(sending) == plan.planned == 1000
    assert plan.planned_measured == 800
    assert sending[:4] == ["0", "1", "0", "1"]
    # Sized for the peak rate times the deadline (with margin): 100/s x 1 s.
    assert plan.vus >= 110


def test_thinning_keeps_the_rate_and_the_seed_fixes_the_arrivals() -> None:
    a = plan_k6(_spec(duration_s=100.0), thinning=4)
    assert a.period_s == pytest.approx(0.0025)
    assert 9_400 < a.planned < 10_600  # Bernoulli(1/4) on 40,000 slots: 10,000 +- 3 sd
    assert a == plan_k6(_spec(duration_s=100.0), thinning=4)
    assert a.slots != plan_k6(_spec(duration_s=100.0, seed=8), thinning=4).slots


def test_a_ramp_is_one_lattice_at_the_peak_rate() -> None:
    spec = _spec(steps=(RateStep(0.0, 50.0), RateStep(5.0, 200.0)), rate=0.0)
    plan = plan_k6(spec, thinning=1)
    config = k6_config(plan)["scenarios"]["load"]
    assert config["executor"] == "constant-arrival-rate"
    assert config["rate"] == 2000
    assert config["timeUnit"] == "10s"
    # 5 ms slots: 1,000 in each 5 s step.
    first, second = plan.slots[:1000], plan.slots[1000:2000]
    assert 200 < sum(c != "." for c in first) < 300  # Bernoulli(1/4): 250 +- 3 sd
    assert sum(c != "." for c in second) == 1000  # every slot at the peak


def test_bad_plans_are_refused() -> None:
    with pytest.raises(ValueError, match="thinning"):
        plan_k6(_spec(), thinning=0)
    with pytest.raises(ValueError, match="vus"):
        plan_k6(_spec(), vus=0)
    with pytest.raises(ValueError, match="no requests"):
        plan_k6(_spec(rate=0.0))


def _line(
    plan: K6Plan,
    k: int,
    origin_ms: float,
    lag_ms: float,
    total_ms: float,
    status: int = 200,
    code: int = 0,
    backend: str = "b0",
) -> str:
    start = origin_ms + k * plan.period_s * 1000 + lag_ms
    return f"r {k} {start:.0f} {total_ms:.3f} {status} {code} {backend}"


def test_latency_runs_from_the_intended_send_time() -> None:
    plan = plan_k6(_spec(duration_s=3.0, warmup_s=1.0), thinning=1)
    origin = 1_700_000_000_000.0
    lines = ["s 1700000000000"]
    for k in range(300):
        lag = 40.0 if k == 250 else 0.0
        lines.append(_line(plan, k, origin, lag, 10.0, backend=f"b{k % 3}"))
    info = parse_k6_output(plan, lines, {"dropped_iterations": 0, "iterations": 300})
    r = info.result
    assert r.generator == "k6"
    assert r.dropped == 0
    assert r.measured == 200
    assert r.warmup == 100
    assert info.origin_wall_s == pytest.approx(origin / 1000)
    assert info.clock_lead_ms == pytest.approx(0.0)
    # The late request counts its 40 ms of lag: 50 ms from its intended time.
    assert r.latency_all.max_ms == pytest.approx(50.0, rel=0.01)
    assert r.latency_all.p50_ms == pytest.approx(10.0, rel=0.01)
    assert info.lag_max_ms == pytest.approx(40.0)
    assert r.by_backend == {"b0": 66, "b1": 67, "b2": 67}
    # One request 40 ms late out of 200: the p99 lag stays low, nothing dropped: kept up.
    assert r.keeping_up


def test_dropped_iterations_mean_not_kept_up() -> None:
    plan = plan_k6(_spec(duration_s=3.0, warmup_s=1.0), thinning=1)
    lines = [_line(plan, k, 0.0, 0.0, 10.0) for k in range(0, 300, 2)]
    info = parse_k6_output(plan, lines, {"dropped_iterations": 150})
    assert info.result.dropped == 150
    assert not info.result.keeping_up
    # The offered rate is the plan's, not what was sent.
    assert info.result.offered_rate == pytest.approx(100.0)


def test_late_answers_and_k6_errors_are_classified() -> None:
    plan = plan_k6(_spec(duration_s=3.0, warmup_s=0.0), thinning=1)
    lines = [
        _line(plan, 0, 0.0, 0.0, 10.0, status=503),
        _line(plan, 1, 0.0, 0.0, 1200.0),  # answered after the 1 s deadline
        _line(plan, 2, 0.0, 0.0, 1000.0, status=0, code=1050, backend="-"),
        _line(plan, 3, 0.0, 0.0, 1.0, status=0, code=1202, backend="-"),
    ]
    r = parse_k6_output(plan, lines, {}).result
    assert r.errors == {"http_503": 1, "timeout": 2, "connect": 1}


def test_unreadable_or_foreign_lines_are_refused() -> None:
    plan = plan_k6(_spec(rate=1.0, duration_s=3.0, warmup_s=0.0), thinning=2)
    skipped = plan.slots.index(".")
    with pytest.raises(ValueError, match="does not send"):
        parse_k6_output(plan, [f"r {skipped} 0 1.0 200 0 b0"], {})
    with pytest.raises(ValueError, match="line 1 unreadable"):
        parse_k6_output(plan, ["r x"], {})
