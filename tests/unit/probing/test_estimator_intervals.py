"""The estimator per probe interval (issue 9, item 3) and after an outage (item 8).

- Staleness follows each endpoint's interval: ``max(30 s, 5 intervals)``, always above the
  prober's longest gap between two results of one endpoint (back-off cap, jitter, timeout),
  across the whole allowed ``pingInterval`` range.
- Latency and error half-lives scale with the interval above 1 s; RIF's does not.
- An endpoint that was down restarts its latency average at its second answer in a row; one
  answer between failures (flapping) does not.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aviator.k8s.policy import PING_INTERVAL_RANGE
from aviator.probing.estimator import Estimator, EstimatorConfig, estimate_stats, update_estimate
from aviator.probing.prober import backoff_period
from aviator.probing.results import ProbeOutcome, ProbeResult

LOW, HIGH = PING_INTERVAL_RANGE[0].seconds, PING_INTERVAL_RANGE[1].seconds
JITTER = 0.1  # the prober's default
DEFAULT = EstimatorConfig()


def ok(at: float, rtt: float = 0.005, timeout: float = 1.0) -> ProbeResult:
    return ProbeResult(ProbeOutcome.OK, at - rtt, at, timeout_s=timeout, status=200)


def refused(at: float, timeout: float = 1.0) -> ProbeResult:
    return ProbeResult(ProbeOutcome.CONNECT_ERROR, at - 0.001, at, timeout_s=timeout)


def geometric(low: float, high: float, n: int) -> list[float]:
    return [low * (high / low) ** (i / (n - 1)) for i in range(n)]


# --- settings per interval ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "stale", "latency_hl", "error_hl"),
    [
        (0.01, 30.0, 2.0, 10.0),
        (1.0, 30.0, 2.0, 10.0),
        (6.0, 30.0, 12.0, 60.0),
        (10.0, 50.0, 20.0, 100.0),
        (60.0, 300.0, 120.0, 600.0),
        (300.0, 1500.0, 600.0, 3000.0),
    ],
)
def test_staleness_and_half_lives_follow_the_interval(
    interval: float, stale: float, latency_hl: float, error_hl: float
) -> None:
    c = DEFAULT.for_interval(interval)
    assert c.stale_after_s == pytest.approx(stale)
    assert c.latency_half_life_s == pytest.approx(latency_hl)
    assert c.error_half_life_s == pytest.approx(error_hl)
    assert c.rif_half_life_s == DEFAULT.rif_half_life_s  # load is worth only its latest value
    assert c.for_interval(interval) == c  # idempotent


def test_no_interval_is_the_config_itself_and_a_bad_one_is_refused() -> None:
    assert DEFAULT.for_interval(None) is DEFAULT
    assert DEFAULT.for_interval(0.5) is DEFAULT  # nothing to scale below 1 s
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="interval_s"):
            DEFAULT.for_interval(bad)
    with pytest.raises(ValueError, match="down_after_failures"):
        EstimatorConfig(down_after_failures=0)


@pytest.mark.parametrize("interval", geometric(LOW, HIGH, 40))
def test_staleness_is_above_the_probers_longest_gap_at_every_allowed_interval(
    interval: float,
) -> None:
    # The longest time between two results of one endpoint: the backed-off period stretched
    # by the jitter, plus a timeout (at most the interval).
    longest = backoff_period(interval, failures=10**6) * (1 + JITTER) + interval
    healthy = interval * (1 + JITTER) + interval
    stale = DEFAULT.for_interval(interval).stale_after_s
    assert stale > longest
    assert stale > healthy
    assert stale >= DEFAULT.stale_after_s  # never below today's floor
    assert stale <= max(DEFAULT.stale_after_s, 5 * interval)  # a few intervals, not more


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(min_value=LOW, max_value=HIGH),
    jitters=st.lists(st.floats(min_value=-JITTER, max_value=JITTER), min_size=3, max_size=12),
    failing=st.booleans(),
)
def test_an_endpoint_probed_at_its_interval_never_goes_stale(
    interval: float, jitters: list[float], failing: bool
) -> None:
    est: Estimator[str] = Estimator()
    est.track({"a": interval})
    at = 0.0
    failures = 0
    for j in jitters:
        result = refused(at) if failing else ok(at)
        assert est.observe("a", result, now=at)
        failures = failures + 1 if failing else 0
        gap = backoff_period(interval, failures) * (1 + j)
        # Just before the next result: still fresh.
        assert est.stats("a", at + gap + min(1.0, interval) * 0.999) is not None
        at += gap + min(1.0, interval)


def test_track_sets_each_keys_interval_and_drops_the_others() -> None:
    est: Estimator[str] = Estimator()
    est.track({"slow": 60.0, "fast": 1.0, "gone": 60.0})
    for key in ("slow", "fast", "gone"):
        est.observe(key, ok(10.0), now=10.0)
    est.track({"slow": 60.0, "fast": 1.0})
    assert "gone" not in est
    assert est.stats("slow", now=10.0 + 290.0) is not None  # 5 * 60 s
    assert est.stats("slow", now=10.0 + 301.0) is None
    assert est.stats("fast", now=10.0 + 30.0) is not None  # the 30 s floor
    assert est.stats("fast", now=10.0 + 31.0) is None
    assert est.config_for("gone") is est.config  # no interval any more


def test_samples_at_a_minute_are_averaged_over_as_many_probes_as_at_a_second() -> None:
    def after_step(interval: float) -> float:
        est: Estimator[str] = Estimator()
        est.track({"a": interval})
        est.observe("a", ok(0.0, rtt=0.010), now=0.0)
        est.observe("a", ok(interval, rtt=0.020), now=interval)
        s = est.stats("a", interval)
        assert s is not None
        return s.latency_s

    # One probe later the average moved the same fraction of the way at 1 s, 60 s and 300 s.
    at_one = after_step(1.0)
    assert after_step(60.0) == pytest.approx(at_one)
    assert after_step(300.0) == pytest.approx(at_one)


# --- recovery after an outage ----------------------------------------------------------------


def run(pattern: str, interval: float = 1.0, rtt: float = 0.005) -> float:
    """Latency after probes every ``interval`` ('F' refused, 'S' answered in ``rtt``)."""
    config = DEFAULT.for_interval(interval)
    estimate = None
    for i, c in enumerate(pattern):
        at = i * interval
        estimate = update_estimate(estimate, ok(at, rtt) if c == "S" else refused(at), at, config)
    stats = estimate_stats(estimate, (len(pattern) - 1) * interval, config)
    assert stats is not None
    return stats.latency_s


def test_a_pod_back_from_an_outage_is_measured_afresh_at_its_second_answer() -> None:
    down = "S" * 5 + "F" * 60
    assert run(down) == pytest.approx(2.0, rel=1e-3)  # penalised: 2 * the 1 s timeout
    assert run(down + "S") > 0.5  # one answer is not a recovery yet
    assert run(down + "SS") == pytest.approx(0.005)  # the two answers, nothing of the outage


def test_a_flapping_pod_stays_slow() -> None:
    # Fail, fail, answer, again and again: never two answers in a row, never restarted.
    assert run("S" * 5 + "FFS" * 20) > 0.5
    assert run("S" * 5 + "FS" * 30) > 0.5


def test_a_single_failure_is_folded_into_the_average_as_before() -> None:
    # Not down (one failure): the next answers decay the penalty by the half-life.
    keep = 2 ** (-1.0 / 2.0)  # one second of a 2 s half-life
    after_failure = 0.005 * keep + 2.0 * (1 - keep)
    latency = run("S" * 5 + "F" + "SS")
    assert latency == pytest.approx(after_failure * keep**2 + 0.005 * (1 - keep**2))
