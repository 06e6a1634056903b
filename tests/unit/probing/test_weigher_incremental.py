"""The incremental weigher gives exactly what the rule as written gives (issue 9, item 6).

The reference is the weigher as it was before (``reference_weigher``, verbatim but for rule
changes made since, in both): every result of :func:`weigh` and of a :class:`WorkloadWeigher`
kept across passes is compared with it, endpoint for endpoint, hot set, ``changed`` and
``settled`` flags, on random fleets and random sequences
of changes. Values are drawn from a small palette as well as from wide ranges so that ties
(equal latencies, RIFs at the quantile, weights at the snap edge) come up often.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aviator.model import EndpointAddress, WeigherKnobs
from aviator.probing.estimator import EndpointStats
from aviator.probing.weigher import WeighResult, WorkloadWeigher, weigh
from tests.unit.probing import reference_weigher
from tests.unit.probing.helpers import addr, stats
from tests.unit.probing.test_weigher import knob_sets, thresholds

latencies = st.sampled_from([0.001, 0.002, 0.01, 0.05, 0.1, 0.2, 2.0]) | st.floats(
    min_value=1e-6, max_value=3600.0, allow_nan=False
)
rifs = st.none() | st.sampled_from([0.0, 1.0, 2.0, 5.0, 20.0]) | st.floats(0.0, 1e4)
palette_knobs = st.sampled_from(
    [
        WeigherKnobs(),
        WeigherKnobs(degrade_hot=True),
        WeigherKnobs(smoothing=1.0, min_change=0.0),
        WeigherKnobs(hot_quantile=0.5, hysteresis=0.5, min_hot_rif=0.0),
        WeigherKnobs(stand_out=1.0),
    ]
)


@st.composite
def endpoint_stats(draw: st.DrawFn) -> EndpointStats | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    latency = draw(latencies)
    return EndpointStats(
        latency_s=latency,
        probe_latency_s=latency,
        reported_latency_s=None,
        rif=draw(rifs),
        error_rate=0.0,
        samples=draw(st.integers(1, 100)),
        age_s=draw(st.floats(0.0, 30.0)),
        consecutive_failures=draw(st.integers(0, 4)),
    )


members = st.sets(st.integers(0, 30), max_size=20).map(lambda ids: [addr(i) for i in ids])


def _same(got: WeighResult, want: WeighResult) -> None:
    assert dict(got.endpoints) == dict(want.endpoints)
    assert list(got.endpoints) == sorted(got.endpoints)  # address order, as the rule builds it
    assert got.hot == want.hot
    assert got.changed == want.changed
    assert got.settled == want.settled


@settings(max_examples=300, deadline=None)
@given(
    st.data(),
    members,
    knob_sets | palette_knobs,
    thresholds | st.sampled_from([0.05, 0.1]),
    st.integers(1, 8),
)
def test_a_weigher_kept_across_passes_gives_what_the_rule_gives(
    data: st.DataObject,
    addresses: list[EndpointAddress],
    knobs: WeigherKnobs,
    threshold: float | None,
    passes: int,
) -> None:
    current: dict[EndpointAddress, EndpointStats | None] = dict.fromkeys(addresses)
    engine = WorkloadWeigher(addresses, knobs=knobs, latency_threshold_s=threshold)
    want: WeighResult | None = None
    plain: WeighResult | None = None
    for _ in range(passes):
        # Some endpoints change (or lose their data), often none: the fixed-point path.
        changed = {
            a: data.draw(endpoint_stats()) for a in addresses if data.draw(st.integers(0, 3)) == 0
        }
        current.update(changed)
        engine.update(changed)
        want = reference_weigher.weigh(
            current, knobs=knobs, latency_threshold_s=threshold, previous=want
        )
        got = engine.weigh()
        _same(got, want)
        plain = weigh(current, knobs=knobs, latency_threshold_s=threshold, previous=plain)
        _same(plain, want)


@settings(max_examples=200, deadline=None)
@given(st.data(), members, members, knob_sets | palette_knobs, thresholds)
def test_a_new_weigher_for_new_members_continues_from_the_last_result(
    data: st.DataObject,
    before: list[EndpointAddress],
    after: list[EndpointAddress],
    knobs: WeigherKnobs,
    threshold: float | None,
) -> None:
    old = {a: data.draw(endpoint_stats()) for a in before}
    new = {a: data.draw(endpoint_stats()) for a in after}
    previous = reference_weigher.weigh(old, knobs=knobs, latency_threshold_s=threshold)
    for _ in range(data.draw(st.integers(0, 2))):  # a previous result that did not change
        previous = reference_weigher.weigh(
            old, knobs=knobs, latency_threshold_s=threshold, previous=previous
        )
    engine = WorkloadWeigher(after, knobs=knobs, latency_threshold_s=threshold, previous=previous)
    engine.update(new)
    want = reference_weigher.weigh(
        new, knobs=knobs, latency_threshold_s=threshold, previous=previous
    )
    _same(engine.weigh(), want)
    # And the pass after that, with the same statistics (smoothing goes on, or it holds).
    _same(
        engine.weigh(),
        reference_weigher.weigh(new, knobs=knobs, latency_threshold_s=threshold, previous=want),
    )


def test_a_pass_without_a_new_signal_weighs_nothing() -> None:
    """The regression guard, counted instead of timed: at rest a 1,000-endpoint workload is
    weighed once per changed signal, never once per pass."""
    addresses = [addr(i) for i in range(1000)]
    fleet = {a: stats(10 + i % 7, 1) for i, a in enumerate(addresses)}
    engine = WorkloadWeigher(addresses, latency_threshold_s=0.1)
    engine.update(fleet)
    while engine.weigh().changed:  # smoothing converges in a few passes
        assert engine.weighings < 100 * len(addresses)
    settled = engine.weighings
    for _ in range(50):
        assert not engine.weigh().changed
    assert engine.weighings == settled  # 50 passes, nothing new: nothing weighed

    # A sample that moves nothing the rule reads (the same latency and RIF; only the age and
    # the sample count differ) weighs nothing either.
    a = addresses[3]
    same = fleet[a]
    engine.update({a: EndpointStats(same.latency_s, same.latency_s, None, 1, 0.0, 99, 5.0, 0)})
    assert not engine.weigh().changed
    assert engine.weighings == settled

    # A refused probe of an endpoint already failing: its penalised latency and its failing
    # state are what they were.
    down = EndpointStats(2.0, 2.0, None, None, 1.0, 5, 0.0, 3)
    engine.update({a: down})
    engine.weigh()
    after_down = engine.weighings
    assert after_down > settled
    engine.update({a: EndpointStats(2.0, 2.0, None, None, 1.0, 6, 0.0, 4)})
    engine.weigh()
    while engine.weigh().changed:
        pass
    converged = engine.weighings
    engine.update({a: EndpointStats(2.0, 2.0, None, None, 1.0, 7, 0.0, 5)})
    assert not engine.weigh().changed
    assert engine.weighings == converged

    # One real change: one pass over the workload, then the fixed point again.
    engine.update({a: stats(30, 1)})
    engine.weigh()
    assert engine.weighings == converged + len(addresses)


def test_an_unchanged_result_keeps_its_endpoint_values() -> None:
    """Allocate less: a pass that moves one endpoint's weight keeps every other
    ``WeightedEndpoint`` object of the previous result."""
    addresses = [addr(i) for i in range(50)]
    engine = WorkloadWeigher(addresses, knobs=WeigherKnobs(smoothing=1.0, min_change=0.0))
    engine.update({a: stats(10, 0) for a in addresses})
    first = engine.weigh()
    engine.update({addresses[0]: stats(20, 0)})
    second = engine.weigh()
    assert second.changed
    assert second.endpoints[addresses[0]].weight == 750  # 1.5 x 10 ms (standOut) / 20 ms
    assert all(second.endpoints[a] is first.endpoints[a] for a in addresses[1:])
