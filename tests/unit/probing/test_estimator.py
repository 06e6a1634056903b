"""The estimator on explicit timestamps: decay by time, penalised failures, dropped samples."""

from __future__ import annotations

import math

import pytest
from aviator_agent.orca import OrcaLoadReport
from hypothesis import given, settings
from hypothesis import strategies as st

from aviator.probing.estimator import Estimator, EstimatorConfig
from aviator.probing.results import ProbeOutcome, ProbeResult

CONFIG = EstimatorConfig(latency_half_life_s=2.0, rif_half_life_s=0.5, error_half_life_s=10.0)


def ok(
    at: float, rtt: float, *, rif: float | None = None, latency_ms: float | None = None
) -> ProbeResult:
    named = {}
    if rif is not None:
        named["rif"] = rif
    if latency_ms is not None:
        named["latency_ms"] = latency_ms
    load = OrcaLoadReport(named_metrics=named) if named else None
    return ProbeResult(ProbeOutcome.OK, at - rtt, at, timeout_s=1.0, status=200, load=load)


def failed(
    at: float, rtt: float = 0.001, outcome: ProbeOutcome = ProbeOutcome.CONNECT_ERROR
) -> ProbeResult:
    return ProbeResult(outcome, at - rtt, at, timeout_s=1.0)


def test_no_data_yet_is_none() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    assert est.stats("a", now=5.0) is None
    assert est.snapshot(["a", "b"], now=5.0) == {"a": None, "b": None}


def test_first_sample_is_the_estimate() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    assert est.observe("a", ok(10.0, 0.100), now=10.0)
    s = est.stats("a", now=10.0)
    assert s is not None
    assert s.latency_s == pytest.approx(0.100)
    assert s.error_rate == 0.0
    assert s.samples == 1
    assert s.rif is None


def test_decay_depends_on_elapsed_time_not_on_sample_count() -> None:
    one: Estimator[str] = Estimator(CONFIG)
    one.observe("a", ok(0.0, 0.100), now=0.0)
    one.observe("a", ok(2.0, 0.200), now=2.0)  # one half-life later: halfway
    many: Estimator[str] = Estimator(CONFIG)
    many.observe("a", ok(0.0, 0.100), now=0.0)
    for i in range(1, 11):  # ten samples over the same two seconds
        many.observe("a", ok(0.2 * i, 0.200), now=0.2 * i)
    s_one, s_many = one.stats("a", 2.0), many.stats("a", 2.0)
    assert s_one is not None
    assert s_many is not None
    assert s_one.latency_s == pytest.approx(0.150)
    assert s_many.latency_s == pytest.approx(0.150)


@pytest.mark.parametrize(
    "outcome",
    [ProbeOutcome.TIMEOUT, ProbeOutcome.CONNECT_ERROR, ProbeOutcome.HTTP_ERROR, ProbeOutcome.ERROR],
)
def test_failures_are_penalised_latency_and_errors(outcome: ProbeOutcome) -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", failed(1.0, rtt=0.001, outcome=outcome), now=1.0)
    s = est.stats("a", 1.0)
    assert s is not None
    # A refused connection in 1 ms counts as 2 * the 1 s timeout: failing fast looks slow.
    assert s.latency_s == pytest.approx(2.0)
    assert s.error_rate == 1.0
    assert s.consecutive_failures == 1


def test_a_failure_slower_than_the_penalty_counts_its_own_time() -> None:
    est: Estimator[str] = Estimator(EstimatorConfig(failure_penalty=1.0))
    est.observe("a", failed(10.0, rtt=3.0), now=10.0)
    s = est.stats("a", 10.0)
    assert s is not None
    assert s.latency_s == pytest.approx(3.0)


def test_error_rate_decays_after_recovery() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", failed(0.0), now=0.0)
    est.observe("a", ok(10.0, 0.01), now=10.0)  # one error half-life later
    s = est.stats("a", 10.0)
    assert s is not None
    assert s.error_rate == pytest.approx(0.5)
    assert s.consecutive_failures == 0


@pytest.mark.parametrize(
    ("late", "why"),
    [(ok(4.0, 0.5), "out of order"), (ok(5.0, 0.5), "same instant"), (ok(11.0, 0.5), "future")],
)
def test_out_of_order_duplicate_and_future_samples_are_dropped(late: ProbeResult, why: str) -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", ok(5.0, 0.010), now=10.0)
    before = est.estimate("a")
    assert not est.observe("a", late, now=10.0), why
    assert est.estimate("a") is before


def test_samples_stale_on_arrival_are_dropped() -> None:
    est: Estimator[str] = Estimator(EstimatorConfig(stale_after_s=30.0))
    assert not est.observe("a", ok(1.0, 0.010), now=31.5)
    assert est.stats("a", 31.5) is None
    assert "a" not in est


def test_stats_go_stale_without_samples() -> None:
    est: Estimator[str] = Estimator(EstimatorConfig(stale_after_s=30.0))
    est.observe("a", ok(1.0, 0.010), now=1.0)
    fresh = est.stats("a", 31.0)
    assert fresh is not None
    assert fresh.age_s == pytest.approx(30.0)
    assert est.stats("a", 31.01) is None


def test_reported_rif_and_latency_are_used() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", ok(1.0, 0.001, rif=4, latency_ms=50), now=1.0)
    s = est.stats("a", 1.0)
    assert s is not None
    assert s.rif == 4.0
    assert s.reported_latency_s == pytest.approx(0.050)
    assert s.probe_latency_s == pytest.approx(0.001)
    # The weigher ranks by the larger: the server's own latency beats a fast probe path.
    assert s.latency_s == pytest.approx(0.050)
    est.observe("a", ok(1.5, 0.001, rif=8, latency_ms=50), now=1.5)  # one RIF half-life
    s = est.stats("a", 1.5)
    assert s is not None
    assert s.rif == pytest.approx(6.0)


def test_the_reported_latency_follows_the_server_within_its_own_half_life() -> None:
    # The server's report is already its own aggregate (and follows its requests in flight):
    # averaged over a probe or two, not at the probe latency's pace (2 s), or a backend that
    # drained its queue looks slow for seconds, and a new victim crosses late.
    est: Estimator[str] = Estimator(EstimatorConfig())
    est.observe("a", ok(1.0, 0.001, rif=1, latency_ms=400), now=1.0)
    est.observe("a", ok(1.1, 0.001, rif=1, latency_ms=20), now=1.1)  # one half-life later
    s = est.stats("a", 1.1)
    assert s is not None
    assert s.reported_latency_s == pytest.approx(0.210)
    assert s.latency_s == pytest.approx(0.210)
    for i in range(1, 5):  # four more half-lives of fast reports: 1/16 of the way left
        est.observe("a", ok(1.1 + 0.1 * i, 0.001, rif=1, latency_ms=20), now=1.1 + 0.1 * i)
    s = est.stats("a", 1.5)
    assert s is not None
    assert s.reported_latency_s == pytest.approx(0.020 + 0.190 / 16)
    assert EstimatorConfig().for_interval(60.0).reported_latency_half_life_s == 0.1


def test_a_failure_keeps_the_last_report_and_an_answer_without_one_forgets_it() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", ok(1.0, 0.001, rif=4, latency_ms=50), now=1.0)
    est.observe("a", failed(2.0), now=2.0)
    s = est.stats("a", 2.0)
    assert s is not None
    assert s.rif == 4.0
    assert s.latency_s > 0.5  # the penalty dominates the old good report
    est.observe("a", ok(3.0, 0.001), now=3.0)
    s = est.stats("a", 3.0)
    assert s is not None
    assert s.rif is None
    assert s.reported_latency_s is None


def test_zero_rtt_on_a_fake_clock_is_clamped_not_zero() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    est.observe("a", ok(1.0, 0.0), now=1.0)
    s = est.stats("a", 1.0)
    assert s is not None
    assert s.latency_s == CONFIG.min_latency_s


def test_retain_and_forget() -> None:
    est: Estimator[str] = Estimator(CONFIG)
    for key in "abc":
        est.observe(key, ok(1.0, 0.01), now=1.0)
    est.retain(["a", "b"])
    assert sorted(est) == ["a", "b"]
    est.forget("a")
    assert list(est) == ["b"]
    assert len(est) == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="latency_half_life_s"):
        EstimatorConfig(latency_half_life_s=0)
    with pytest.raises(ValueError, match="failure_penalty"):
        EstimatorConfig(failure_penalty=0.5)
    with pytest.raises(ValueError, match="min_latency_s"):
        EstimatorConfig(min_latency_s=10.0, max_latency_s=1.0)


times = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
durations = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
reports = st.none() | st.builds(
    lambda rif, lat: OrcaLoadReport(
        named_metrics={k: v for k, v in (("rif", rif), ("latency_ms", lat)) if v is not None}
    ),
    st.none() | st.floats(min_value=0.0, max_value=1e9),
    st.none() | st.floats(min_value=0.0, max_value=1e9),
)


@st.composite
def probe_results(draw: st.DrawFn) -> tuple[ProbeResult, float]:
    finished = draw(times)
    rtt = draw(durations)
    started = max(finished - rtt, 0.0)
    outcome = draw(st.sampled_from(list(ProbeOutcome)))
    result = ProbeResult(
        outcome,
        started,
        max(finished, started),
        timeout_s=draw(st.floats(min_value=1e-3, max_value=1e3)),
        load=draw(reports) if outcome is ProbeOutcome.OK else None,
    )
    now = finished + draw(st.floats(min_value=-1.0, max_value=100.0))
    return result, now


@settings(max_examples=300, deadline=None)
@given(st.lists(probe_results(), max_size=40), st.floats(min_value=0.0, max_value=2e6))
def test_statistics_are_always_finite_and_in_range(
    results: list[tuple[ProbeResult, float]], query_at: float
) -> None:
    est: Estimator[str] = Estimator()
    cfg = est.config
    for result, now in results:
        est.observe("a", result, now)
        for at in (now, query_at):
            s = est.stats("a", at)
            if s is None:
                continue
            for value in (s.latency_s, s.probe_latency_s, s.error_rate, s.age_s):
                assert math.isfinite(value)
            assert cfg.min_latency_s <= s.probe_latency_s <= s.latency_s <= cfg.max_latency_s
            assert 0.0 <= s.error_rate <= 1.0
            assert s.rif is None or (math.isfinite(s.rif) and s.rif >= 0)
            assert s.reported_latency_s is None or math.isfinite(s.reported_latency_s)
            assert 0 <= s.age_s <= cfg.stale_after_s
            assert s.samples >= 1
