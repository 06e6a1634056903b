"""``Estimator.take_changes``: the keys whose statistics moved, so a weighing pass reads only
those (issue 9, item 6). A missed change would leave a weight on old data: the property is
checked against reading every key at every step."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aviator.probing.estimator import EndpointStats, Estimator, EstimatorConfig
from tests.unit.probing.test_estimator import failed, ok

KEYS = ["a", "b", "c", "d"]


def _weighed(s: EndpointStats | None) -> tuple[object, ...] | None:
    """What the weigher reads, and what a reader of stats would see change (not the age)."""
    if s is None:
        return None
    return (s.latency_s, s.rif, s.reported_latency_s, s.consecutive_failures, s.samples)


step = st.tuples(
    st.floats(0.0, 40.0),  # time passes
    st.lists(
        st.tuples(
            st.sampled_from(KEYS),
            st.sampled_from(["ok", "rif", "latency", "failed"]),
            st.floats(0.0, 60.0),  # how old the sample is when it arrives
        ),
        max_size=4,
    ),
    st.none() | st.dictionaries(st.sampled_from(KEYS), st.sampled_from([0.5, 1.0, 10.0, 60.0])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=25))
def test_every_key_whose_statistics_moved_is_reported(
    steps: list[tuple[float, list[tuple[str, str, float]], dict[str, float] | None]],
) -> None:
    est: Estimator[str] = Estimator(EstimatorConfig(stale_after_s=30.0))
    now = 0.0
    seen = {k: _weighed(est.stats(k, now)) for k in KEYS}
    est.take_changes(now)
    for elapsed, samples, intervals in steps:
        now += elapsed
        for key, kind, age in samples:
            at = now - age
            if kind == "failed":
                result = failed(at)
            elif kind == "rif":
                result = ok(at, 0.01, rif=3.0)
            elif kind == "latency":
                result = ok(at, 0.01, latency_ms=20.0)
            else:
                result = ok(at, 0.01)
            est.observe(key, result, now)
        if intervals is not None:
            est.track(intervals)
        changes = est.take_changes(now)
        for key in KEYS:
            current = _weighed(est.stats(key, now))
            if current != seen[key]:
                assert key in changes, (key, seen[key], current, now)
            seen[key] = current


def test_a_quiet_key_is_reported_once_when_it_goes_stale_and_not_before() -> None:
    est: Estimator[str] = Estimator(EstimatorConfig(stale_after_s=30.0))
    est.observe("a", ok(10.0, 0.01, rif=2.0), now=10.0)
    assert est.take_changes(10.0) == {"a"}
    for t in range(11, 40):
        assert est.take_changes(float(t)) == set(), t  # nothing moves for 30 s
    assert est.stats("a", 40.5) is None
    assert est.take_changes(40.5) == {"a"}
    assert est.take_changes(100.0) == set()


def test_the_deadline_heap_holds_one_entry_per_key() -> None:
    """1,000 samples of one key leave one deadline, not 1,000 (memory, and the collector)."""
    est: Estimator[str] = Estimator()
    for i in range(1000):
        est.observe("a", ok(float(i) / 10, 0.001), now=float(i) / 10)
    assert len(est._deadlines) == 1
    assert est.take_changes(100.0) == {"a"}
