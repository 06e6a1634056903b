"""The weigher: a named table of scenarios and the weights they must give, then properties."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aviator.model import MAX_WEIGHT, EndpointAddress, Health
from aviator.probing.estimator import EndpointStats
from aviator.probing.weigher import WeigherKnobs, WeighResult, _hot_cap, weigh
from tests.unit.probing.helpers import addr, stats

H, D = Health.HEALTHY, Health.DEGRADED


@dataclass(frozen=True)
class Scenario:
    stats: list[EndpointStats | None]
    weights: list[int]
    health: list[Health] | None = None  # default: all HEALTHY
    hot: list[int] = field(default_factory=list)  # indexes published as hot
    knobs: dict[str, object] = field(default_factory=dict)
    threshold_ms: float | None = None


SCENARIOS = {
    "uniform fleet: equal weights": Scenario(
        [stats(10, 2), stats(10, 2), stats(10, 2)], [1000, 1000, 1000]
    ),
    # Cold weights fall with latency beyond standOut (1.5) x the cold (low) median: 15 ms here.
    "one 2x slower gets 15/20": Scenario(
        [stats(10, 2), stats(10, 2), stats(20, 2)], [1000, 1000, 750]
    ),
    "one 16x slower gets 15/160 (rounded half up)": Scenario(
        [stats(10, 0), stats(10, 0), stats(160, 0)], [1000, 1000, 94]
    ),
    "standOut 1: one 2x slower gets half": Scenario(
        [stats(10, 2), stats(10, 2), stats(20, 2)], [1000, 1000, 500], knobs={"standOut": 1}
    ),
    # Issue 13, do no harm (the load ramp: identical backends at 50-110% load): the agent's
    # figures of identical backends differ by noise (RIF 1.2-1.8, latency 19-31 ms in one
    # pass); the top RIF was floored every pass and the floor hopped between them. None
    # stands out, so none is hot and the weights are equal: Envoy's least request balances.
    "identical backends, noisy figures: nothing stands out, equal weights": Scenario(
        [stats(19, 1.2), stats(24, 1.5), stats(26, 1.4), stats(31, 1.8)],
        [1000] * 4,
        threshold_ms=100,
    ),
    # The antagonist's victim 0.3 s into its slowdown: RIF 5.3 against 2.1-2.4.
    "a victim's RIF that stands out is hot": Scenario(
        [stats(28, 5.3), stats(28, 2.1), stats(33, 2.4), stats(30, 2.2)],
        [50, 1000, 1000, 1000],
        hot=[0],
        threshold_ms=100,
    ),
    # The antagonist moved on: its last victim has drained (RIF 5.1) but the agent's latency
    # still carries its queue (221 ms, above the threshold); the new victim's RIF (6.6) is
    # the fresh signal and takes the one place of the cap. (Both entered before, an
    # "overload" that floored nothing for 0.7 s.)
    "RIF before latency: the new victim is hot, not the last one": Scenario(
        [stats(221, 5.1), stats(29, 6.6), stats(30, 2.8), stats(36, 2.9)],
        [476, 50, 1000, 1000],  # (100 + 10) / (221 + 10): beyond the threshold, not 1.5 x 36
        hot=[1],
        threshold_ms=100,
    ),
    "100x slower is held at the floor 1/maxWeightRatio": Scenario(
        [stats(10, 0), stats(1000, 0)], [1000, 50]
    ),
    "RIF above the 0.84 quantile is hot: floor": Scenario(
        [stats(10, 2)] * 9 + [stats(10, 20)], [1000] * 9 + [50], hot=[9]
    ),
    # 20 ms is twice the median but within the 50 ms threshold: the same as 10 ms (it weighed
    # (1.5 x 10 + 5) / (20 + 5) = 0.8, which cost Envoy's least request its two choices).
    "latency above latencyThreshold is hot: floor": Scenario(
        [stats(10, 0), stats(20, 0), stats(80, 0)], [1000, 1000, 50], hot=[2], threshold_ms=50
    ),
    "idle fleet: sub-millisecond differences are noise under τ": Scenario(
        [stats(0.5, 0), stats(1.5, 0)], [1000, 1000], threshold_ms=50
    ),
    "within latencyThreshold the latency tells nothing: equal": Scenario(
        [stats(15, 1), stats(28, 1), stats(14, 1), stats(99, 1)], [1000] * 4, threshold_ms=100
    ),
    "beyond latencyThreshold the latency weighs, relative to the threshold": Scenario(
        [stats(15, 1), stats(28, 1), stats(210, 1), stats(160, 1)],
        [1000, 1000, 50, 647],  # the slowest fills the cap; (100 + 10) / (160 + 10)
        hot=[2],
        threshold_ms=100,
    ),
    "degradeHot publishes hot endpoints DEGRADED": Scenario(
        [stats(10, 0), stats(20, 0), stats(80, 0)],
        [1000, 1000, 50],
        health=[H, H, D],
        hot=[2],
        knobs={"degradeHot": True},
        threshold_ms=50,
    ),
    # Every endpoint above latencyThreshold (at 90% load the queues put the whole fleet above
    # it): the threshold tells none apart, and RIF alone decides, as in Prequal's hot-cold
    # rule. It floored nothing before ("overloaded"), and the antagonist's victim, whose RIF
    # had climbed from 8 to 34, kept a third of the others' weight for 3.5 s.
    "all above latencyThreshold: RIF alone decides (the top one hot)": Scenario(
        [stats(10, 1), stats(10, 3), stats(10, 7)],
        [1000, 1000, 50],
        health=[H, H, D],
        hot=[2],
        knobs={"degradeHot": True},
        threshold_ms=5,
    ),
    "all failed (penalised latency, no RIF): all HEALTHY, equal": Scenario(
        [stats(2000, error_rate=1.0)] * 3, [1000, 1000, 1000], threshold_ms=100
    ),
    "no data yet: neutral (median) weight": Scenario(
        [stats(10, 0), stats(20, 0), None], [1000, 750, 875]
    ),
    "no data anywhere: equal weights": Scenario([None, None], [1000, 1000]),
    "single endpoint": Scenario([stats(37, 5)], [1000]),
    "idle fleet: RIF 1 is not hot (minHotRif)": Scenario(
        [stats(10, 0), stats(10, 0), stats(10, 0), stats(10, 1)], [1000] * 4
    ),
    "latencyExponent 2: 2x slower gets (15/20)^2": Scenario(
        [stats(10, 0), stats(20, 0)], [1000, 563], knobs={"latencyExponent": 2}
    ),
    "maxWeightRatio 10 raises the floor": Scenario(
        [stats(10, 0), stats(1000, 0)], [1000, 100], knobs={"maxWeightRatio": 10}
    ),
    "no RIF report: never hot by RIF, quantile of the others": Scenario(
        [stats(10), stats(10, 2), stats(10, 2), stats(10, 40)], [1000, 1000, 1000, 50], hot=[3]
    ),
    "hotQuantile 0.5, standOut 1: upper half is hot": Scenario(
        [stats(10, 2), stats(10, 4), stats(10, 6), stats(10, 8)],
        [1000, 1000, 50, 50],
        hot=[2, 3],
        knobs={"hotQuantile": 0.5, "standOut": 1},
    ),
    # With standOut 1.5 the RIF must also be above 1.5 x (4 + 1) - 1 = 6.5: only the top one.
    "hotQuantile 0.5: only the RIF that stands out is hot": Scenario(
        [stats(10, 2), stats(10, 4), stats(10, 6), stats(10, 8)],
        [1000, 1000, 1000, 50],
        hot=[3],
        knobs={"hotQuantile": 0.5},
    ),
    # 6 of 6 above the threshold (at 90% load the queues put the whole fleet above it), equal
    # RIFs: only the one that stands out from the median latency (1.5 x 60 ms) is hot (the cap
    # is 1 of 6); the rest are within 1.5x of their median and get equal weights (flooring
    # those above the threshold herded traffic onto the others).
    "overloaded fleet: only what stands out is hot, no herding": Scenario(
        [stats(40, 3), stats(60, 3), stats(60, 3), stats(70, 3), stats(80, 3), stats(500, 3)],
        [1000] * 5 + [50],
        hot=[5],
        threshold_ms=50,
    ),
    # Issue 13, do no harm: without load reports, probe latency is the only signal, and when
    # most endpoints are above the threshold it is queueing, not speed: equal weights.
    "no agent, overloaded: equal weights, Envoy's least request balances": Scenario(
        [stats(40), stats(60), stats(60), stats(70), stats(80), stats(500)],
        [1000] * 6,
        threshold_ms=50,
    ),
    # Without load reports every weight is equal (unequal weights take Envoy's least request off
    # its power of two choices): a slow endpoint is left to Envoy's in-flight counts.
    "no agent, one hot: equal weights, Envoy's least request balances": Scenario(
        [stats(40)] * 5 + [stats(500)], [1000] * 6, threshold_ms=50
    ),
    "no agent, 2x slower: equal weights": Scenario([stats(10), stats(20)], [1000, 1000]),
    "one hot endpoint within the cap still gets the floor": Scenario(
        [stats(40, 0)] * 5 + [stats(500, 0)], [1000] * 5 + [50], hot=[5], threshold_ms=50
    ),
    "hot and slow cold ones share the floor": Scenario(
        [stats(10, 2), stats(10, 2), stats(500, 2), stats(10, 30)], [1000, 1000, 50, 50], hot=[3]
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scenario_table(scenario: Scenario) -> None:
    addresses = [addr(i) for i in range(len(scenario.stats))]
    result = weigh(
        dict(zip(addresses, scenario.stats, strict=True)),
        knobs=WeigherKnobs.from_spec(scenario.knobs),
        latency_threshold_s=None if scenario.threshold_ms is None else scenario.threshold_ms / 1000,
    )
    assert [result.endpoints[a].weight for a in addresses] == scenario.weights
    expected_health = scenario.health or [H] * len(addresses)
    assert [result.endpoints[a].health for a in addresses] == expected_health
    assert result.hot == frozenset(addresses[i] for i in scenario.hot)
    assert result.changed


# -- against the previous result: material change, smoothing, hysteresis ---------------------


def _weigh(
    lat_rif: list[tuple[float, float | None] | None],
    previous: WeighResult | None = None,
    **kwargs: object,
) -> WeighResult:
    # A RIF of None here means an idle agent's report (0): these tests are of the confident
    # path; the no-agent fallback has its own.
    data = {
        addr(i): None if spec is None else stats(spec[0], 0.0 if spec[1] is None else spec[1])
        for i, spec in enumerate(lat_rif)
    }
    return weigh(data, previous=previous, **kwargs)  # type: ignore[arg-type]


def _weights(result: WeighResult, n: int) -> list[int]:
    return [result.endpoints[addr(i)].weight for i in range(n)]


def test_change_below_min_change_is_not_pushed() -> None:
    first = _weigh([(10, 2), (10, 2)])
    second = _weigh([(10, 2), (11, 2)], previous=first)  # shares move ~5%, below 15%
    assert not second.changed
    assert second.endpoints == first.endpoints
    assert _weights(second, 2) == [1000, 1000]


def test_same_input_twice_is_unchanged() -> None:
    first = _weigh([(10, 2), (20, 3), None])
    again = _weigh([(10, 2), (20, 3), None], previous=first)
    assert not again.changed
    assert again.endpoints == first.endpoints
    # An unchanged result passed back stays the same object (nothing to rebuild).
    assert _weigh([(10, 2), (20, 3), None], previous=again) is again


# The tests of rule 6 (smoothing, the dead band, hysteresis) below weigh two endpoints with
# standOut 1: the weights then fall from the faster one's latency, in round figures.
EXACT = WeigherKnobs(stand_out=1.0)


def test_equal_targets_move_unequal_weights_within_min_change() -> None:
    """Seen in the latency benchmark's load ramp: a weight of 885 from the warm-up (four
    identical backends) held for the whole run, 12% of a share and so within minChange, and
    Envoy's least request, which uses its two choices only while every weight is equal,
    balanced by weight instead for all of it."""
    warm = _weigh([(10, 1), (17, 1)])
    assert _weights(warm, 2) == [1000, 882]  # 1.5 x 10 / 17
    equal = _weigh([(10, 1), (14, 1)], previous=warm)  # 14 ms: within 1.5 x 10
    assert equal.changed
    assert _weights(equal, 2) == [1000, 1000]
    assert not _weigh([(10, 1), (14.5, 1)], previous=equal).changed


def test_material_change_moves_smoothing_of_the_way() -> None:
    first = _weigh([(10, 2), (10, 2)], knobs=EXACT)
    # target 1000/500, smoothing 0.5
    second = _weigh([(10, 2), (20, 2)], previous=first, knobs=EXACT)
    assert second.changed
    assert _weights(second, 2) == [1000, 750]
    # Shares 0.57/0.43 → 0.67/0.33: 22%; half of the way would leave 13% (under minChange):
    # a state that would sit on the knife-edge of minChange snaps to the target instead.
    third = _weigh([(10, 2), (20, 2)], previous=second, knobs=EXACT)
    assert _weights(third, 2) == [1000, 500]
    fourth = _weigh([(10, 2), (20, 2)], previous=third, knobs=EXACT)
    assert not fourth.changed
    assert _weights(fourth, 2) == [1000, 500]


def test_a_result_on_its_way_keeps_moving_until_it_reaches_its_targets() -> None:
    # The case a CI run met on fake time (threshold 20 ms; then with probe round trips alone,
    # which now give equal weights, so here with idle load reports; and without a threshold,
    # under which latencies now weigh 1: the 2 ms of its tolerance are added to each): the
    # first probe of each pod lands at a random point of its first interval. Pod 1 has no
    # data yet (neutral: the median of the targets) while pod 2's weight smooths down towards
    # its target.
    def weigh_ms(latencies: list[float | None], previous: WeighResult) -> WeighResult:
        data = {addr(i): None if ms is None else stats(ms, 0.0) for i, ms in enumerate(latencies)}
        return weigh(data, previous=previous, knobs=EXACT)

    first = weigh({addr(i): None for i in range(3)})
    second = weigh_ms([2.5, None, 10.0], first)
    third = weigh_ms([2.5, None, 10.0], second)
    assert not second.settled
    assert not third.settled
    assert _weights(third, 3) == [1000, 719, 438]
    # Pod 2 faster: the targets (1000/712/424: 2.5/5.9, and the median of 1 and that) are
    # within minChange of the half-smoothed state as shares, so a dead band against that
    # state would hold 719/438 (for minutes, until probe noise alone pushed again). A result
    # still on its way is not held: it arrives.
    fourth = weigh_ms([2.5, None, 5.9], third)
    assert fourth.changed
    assert fourth.settled
    assert _weights(fourth, 3) == [1000, 712, 424]
    # Arrived: now the dead band holds against noise.
    fifth = weigh_ms([2.5, None, 5.95], fourth)
    assert not fifth.changed
    assert fifth.settled
    assert _weights(fifth, 3) == [1000, 712, 424]


def test_an_endpoint_that_gains_data_moves_even_within_min_change() -> None:
    """Seen on fake time (3 pods, seed 0): the fastest pod's first sample came last; until
    then it had the neutral weight (the median of the others' targets: 0.8125 here), and its
    own target (1) was within minChange of that as a share (14%), so the dead band held it at
    84% for good. Gaining data moves an endpoint as joining does."""

    def three(first: float | None) -> dict[EndpointAddress, EndpointStats | None]:
        ms = [first, 5.0, 12.0]
        return {addr(i): None if m is None else stats(m, 0.0) for i, m in enumerate(ms)}

    before = weigh(three(None))
    assert _weights(before, 3) == [813, 1000, 625]  # 12 ms weighs 1.5 x 5 / 12
    assert before.unmeasured == {addr(0)}
    after = weigh(three(2.5), previous=before)
    assert after.changed
    assert after.unmeasured == frozenset()
    assert _weights(after, 3) == [1000, 1000, 625]


def test_newly_hot_endpoint_drops_to_the_floor_at_once() -> None:
    first = _weigh([(10, 2), (10, 2), (10, 2)])
    second = _weigh([(10, 2), (10, 2), (10, 20)], previous=first)
    assert _weights(second, 3) == [1000, 1000, 50]
    assert second.hot == {addr(2)}


def test_hysteresis_keeps_a_hot_endpoint_hot_just_below_the_threshold() -> None:
    knobs = WeigherKnobs(hysteresis=0.1, stand_out=1.0)
    threshold = 0.050
    hot = _weigh([(10, None), (80, None)], latency_threshold_s=threshold, knobs=knobs)
    assert hot.hot == {addr(1)}
    # 47 ms is below 50 ms but above 45 ms = 50 * (1 - 0.1): still hot, still at the floor.
    held = _weigh(
        [(10, None), (47, None)], previous=hot, latency_threshold_s=threshold, knobs=knobs
    )
    assert held.hot == {addr(1)}
    assert _weights(held, 2) == [1000, 50]
    # Without the history the same input is cold.
    fresh = _weigh([(10, None), (47, None)], latency_threshold_s=threshold, knobs=knobs)
    assert fresh.hot == frozenset()
    assert _weights(fresh, 2) == [1000, 1000]  # within the threshold: the same as 10 ms
    # At 44 ms it cools, and climbs back through smoothing: 0.05 + 0.5 * (1 - 0.05) → 525.
    cooled = _weigh(
        [(10, None), (44, None)], previous=held, latency_threshold_s=threshold, knobs=knobs
    )
    assert cooled.hot == frozenset()
    assert _weights(cooled, 2) == [1000, 525]


def test_an_endpoint_held_hot_gives_way_to_a_hotter_one_within_the_cap() -> None:
    # A moving antagonist: b3 was hot and drains its queue (RIF 3, held by the hysteresis),
    # b2 is its new victim (RIF 6, above the 0.84 quantile 4.56 by itself). Four endpoints
    # allow one hot: b2 takes the place, b3 leaves; they do not add up to an overload, which
    # floored nothing until b3 had cooled.
    knobs = WeigherKnobs(hysteresis=0.5)
    before = _weigh([(20, 1), (20, 1), (20, 1), (20, 6)], knobs=knobs)
    assert before.hot == {addr(3)}
    moved = _weigh([(20, 1), (20, 1), (20, 6), (20, 3)], previous=before, knobs=knobs)
    assert moved.hot == {addr(2)}
    assert moved.endpoints[addr(2)].weight == min(_weights(moved, 4))
    assert moved.endpoints[addr(2)].weight < moved.endpoints[addr(3)].weight
    # With room in the cap (eight endpoints allow two) one held stays hot beside it: b7, slow
    # before (80 ms against 50), at 47 ms now, within the 10% hysteresis.
    before8 = _weigh([(20, 1)] * 7 + [(80, 1)], latency_threshold_s=0.05)
    assert before8.hot == {addr(7)}
    moved8 = _weigh(
        [(20, 1)] * 5 + [(20, 6), (20, 1), (47, 1)], previous=before8, latency_threshold_s=0.05
    )
    assert moved8.hot == {addr(5), addr(7)}
    # Two above the threshold (and 1.5x their median) over a cap of one, with the same RIF
    # (none above its quantile): the slowest fills the cap, by address on a tie; the other
    # stays cold, at (50 + 5) / (80 + 5) of the fastest (beyond the threshold, which is above
    # 1.5 x 20). Never an overload.
    over = _weigh([(20, 1), (20, 1), (80, 6), (80, 6)], latency_threshold_s=0.05, knobs=knobs)
    assert over.hot == {addr(2)}
    assert _weights(over, 4) == [1000, 1000, 50, 647]


def test_membership_change_is_always_pushed() -> None:
    first = _weigh([(10, 2), (10, 2)])
    grown = _weigh([(10, 2), (10, 2), None], previous=first)
    assert grown.changed
    assert _weights(grown, 3) == [1000, 1000, 1000]
    shrunk = _weigh([(10, 2)], previous=grown)
    assert shrunk.changed
    assert set(shrunk.endpoints) == {addr(0)}


def test_health_change_is_always_pushed_even_at_the_same_weight() -> None:
    slow = [(10, None), (10, None), (80, None)]
    floor = _weigh(slow, latency_threshold_s=0.05)
    degraded = _weigh(
        slow, previous=floor, latency_threshold_s=0.05, knobs=WeigherKnobs(degrade_hot=True)
    )
    assert degraded.changed
    assert degraded.endpoints[addr(2)].health is Health.DEGRADED
    assert degraded.endpoints[addr(2)].weight == floor.endpoints[addr(2)].weight


def test_a_tighter_ratio_knob_forces_a_push() -> None:
    first = _weigh([(10, None), (190, None)], knobs=EXACT)  # 1000 : 53, ratio ~19
    assert _weights(first, 2) == [1000, 53]
    tighter = _weigh(
        [(10, None), (190, None)],
        previous=first,
        knobs=WeigherKnobs(max_weight_ratio=10, stand_out=1.0),
    )
    assert tighter.changed
    assert _weights(tighter, 2)[1] >= 100


def test_empty_policy() -> None:
    empty = weigh({})
    assert empty.endpoints == {}
    assert empty.changed
    assert not weigh({}, previous=empty).changed
    assert weigh({}, previous=_weigh([(10, 1)])).changed


def test_rejects_a_bad_latency_threshold() -> None:
    with pytest.raises(ValueError, match="latency_threshold_s"):
        weigh({addr(0): stats(10)}, latency_threshold_s=0.0)


# -- properties ------------------------------------------------------------------------------

finite_latency = st.floats(min_value=1e-6, max_value=3600.0, allow_nan=False)
maybe_rif = st.none() | st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@st.composite
def endpoint_stats(draw: st.DrawFn) -> EndpointStats:
    latency = draw(finite_latency)
    return EndpointStats(
        latency_s=latency,
        probe_latency_s=latency,
        reported_latency_s=None,
        rif=draw(maybe_rif),
        error_rate=draw(st.floats(min_value=0.0, max_value=1.0)),
        samples=draw(st.integers(min_value=1, max_value=10_000)),
        age_s=draw(st.floats(min_value=0.0, max_value=30.0)),
        consecutive_failures=draw(st.integers(min_value=0, max_value=100)),
    )


fleets = st.dictionaries(
    st.integers(min_value=0, max_value=40).map(addr),
    st.none() | endpoint_stats(),
    max_size=25,
)
knob_sets = st.builds(
    WeigherKnobs,
    hot_quantile=st.floats(min_value=0.01, max_value=1.0),
    max_weight_ratio=st.floats(min_value=1.0, max_value=float(MAX_WEIGHT)),
    min_change=st.floats(min_value=0.0, max_value=0.99),
    degrade_hot=st.booleans(),
    hysteresis=st.floats(min_value=0.0, max_value=0.99),
    smoothing=st.floats(min_value=0.01, max_value=1.0),
    latency_exponent=st.floats(min_value=0.0, max_value=4.0),
    min_hot_rif=st.floats(min_value=0.0, max_value=100.0),
    stand_out=st.floats(min_value=1.0, max_value=100.0),
)
thresholds = st.none() | st.floats(min_value=1e-4, max_value=10.0)


@st.composite
def previous_results(draw: st.DrawFn) -> WeighResult | None:
    if draw(st.booleans()):
        return None
    return weigh(draw(fleets), knobs=draw(knob_sets), latency_threshold_s=draw(thresholds))


def _check_invariants(
    result: WeighResult, data: dict[EndpointAddress, EndpointStats | None], knobs: WeigherKnobs
) -> None:
    assert set(result.endpoints) == set(data)
    weights = [e.weight for e in result.endpoints.values()]
    assert all(1 <= w <= MAX_WEIGHT for w in weights)
    if weights:
        assert max(weights) <= knobs.max_weight_ratio * min(weights) * (1 + 1e-12)
        assert any(e.health is Health.HEALTHY for e in result.endpoints.values())
    assert result.hot <= set(data)


@settings(max_examples=300, deadline=None)
@given(fleets, knob_sets, thresholds, previous_results())
def test_weights_are_bounded_total_and_never_remove_everything(
    data: dict[EndpointAddress, EndpointStats | None],
    knobs: WeigherKnobs,
    threshold: float | None,
    previous: WeighResult | None,
) -> None:
    result = weigh(data, knobs=knobs, latency_threshold_s=threshold, previous=previous)
    _check_invariants(result, data, knobs)
    if not result.changed:
        assert previous is not None
        assert result.endpoints == previous.endpoints


@settings(max_examples=200, deadline=None)
@given(fleets, knob_sets, thresholds, previous_results(), st.randoms())
def test_deterministic_order_independent_and_non_mutating(
    data: dict[EndpointAddress, EndpointStats | None],
    knobs: WeigherKnobs,
    threshold: float | None,
    previous: WeighResult | None,
    rnd: object,
) -> None:
    data_before = copy.deepcopy(data)
    previous_before = None if previous is None else dict(previous.endpoints)
    first = weigh(data, knobs=knobs, latency_threshold_s=threshold, previous=previous)
    items = list(data.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    second = weigh(dict(items), knobs=knobs, latency_threshold_s=threshold, previous=previous)
    assert first.endpoints == second.endpoints
    assert first.hot == second.hot
    assert first.changed == second.changed
    assert data == data_before
    if previous is not None:
        assert dict(previous.endpoints) == previous_before


@settings(max_examples=300, deadline=None)
@given(fleets, knob_sets, thresholds)
def test_slower_never_outweighs_faster_at_equal_rif(
    data: dict[EndpointAddress, EndpointStats | None],
    knobs: WeigherKnobs,
    threshold: float | None,
) -> None:
    result = weigh(data, knobs=knobs, latency_threshold_s=threshold)
    measured = [(a, s) for a, s in data.items() if s is not None]
    for a, sa in measured:
        for b, sb in measured:
            if sa.rif == sb.rif and sa.latency_s < sb.latency_s:
                assert result.endpoints[a].weight >= result.endpoints[b].weight, (a, b)
                # …nor a better health.
                assert not (
                    result.endpoints[a].health is Health.DEGRADED
                    and result.endpoints[b].health is Health.HEALTHY
                )


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=1, max_value=30),
    knob_sets,
    st.floats(min_value=0.5, max_value=60.0),
    st.none() | st.floats(min_value=0.0, max_value=1000.0),
)
def test_all_failed_fleet_stays_healthy_with_equal_weights(
    n: int, knobs: WeigherKnobs, penalty_s: float, rif: float | None
) -> None:
    failed = stats(penalty_s * 1000, rif, error_rate=1.0)
    result = weigh({addr(i): failed for i in range(n)}, knobs=knobs, latency_threshold_s=0.1)
    assert {e.health for e in result.endpoints.values()} == {Health.HEALTHY}
    assert len({e.weight for e in result.endpoints.values()}) == 1


@settings(max_examples=100, deadline=None)
@given(endpoint_stats() | st.none(), knob_sets, thresholds)
def test_single_endpoint_gets_the_top_weight_and_is_healthy(
    only: EndpointStats | None, knobs: WeigherKnobs, threshold: float | None
) -> None:
    result = weigh({addr(0): only}, knobs=knobs, latency_threshold_s=threshold)
    assert result.endpoints[addr(0)].weight == MAX_WEIGHT
    assert result.endpoints[addr(0)].health is Health.HEALTHY


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=2, max_value=30), knob_sets, st.floats(min_value=1.0, max_value=1e4))
def test_a_threshold_the_whole_fleet_is_above_is_no_signal(
    n: int, knobs: WeigherKnobs, base_rif: float
) -> None:
    # Every endpoint above a tiny latency threshold, more than the hot cap: the result is the
    # one without a threshold (RIF alone decides; the latencies are equal, so τ changes
    # nothing), in RIF order.
    assume(_hot_cap(knobs, n) < n)
    data = {addr(i): stats(100, base_rif + i) for i in range(n)}
    result = weigh(data, knobs=knobs, latency_threshold_s=0.001)
    alone = weigh(data, knobs=knobs, latency_threshold_s=None)
    assert result.endpoints == alone.endpoints
    assert result.hot == alone.hot
    weights = [result.endpoints[addr(i)].weight for i in range(n)]
    assert weights == sorted(weights, reverse=True)
    assert not math.isnan(sum(weights))


# -- do no harm (issue 13): weak signal → towards equal weights ------------------------------

_no_agent_latency = st.floats(min_value=0.5, max_value=5000.0, allow_nan=False)


@given(
    latencies=st.lists(_no_agent_latency, min_size=2, max_size=12),
    threshold_ms=st.floats(min_value=1.0, max_value=500.0),
)
@settings(max_examples=200, deadline=None)
def test_no_agent_weights_are_equal_and_healthy(
    latencies: list[float], threshold_ms: float
) -> None:
    """Probe round trips alone (none failing) never move a weight: Envoy's least request keeps
    its two choices, which any unequal weight would take away."""
    data = {addr(i): stats(lat) for i, lat in enumerate(latencies)}
    result = weigh(data, latency_threshold_s=threshold_ms / 1000)
    assert {e.weight for e in result.endpoints.values()} == {MAX_WEIGHT}
    assert all(e.health is Health.HEALTHY for e in result.endpoints.values())
    assert result.hot == frozenset()


@given(
    latencies=st.lists(st.floats(min_value=100.5, max_value=5000.0), min_size=2, max_size=12),
)
@settings(max_examples=200, deadline=None)
def test_no_agent_every_endpoint_above_the_threshold_gives_equal_weights(
    latencies: list[float],
) -> None:
    """The issue's finding: every probe above the threshold (they queue behind requests)."""
    data = {addr(i): stats(lat) for i, lat in enumerate(latencies)}
    result = weigh(data, latency_threshold_s=0.1)
    assert len({e.weight for e in result.endpoints.values()}) == 1
    assert result.hot == frozenset()


@given(
    latency=st.floats(min_value=0.5, max_value=5000.0),
    rif=st.one_of(st.none(), st.floats(min_value=0.0, max_value=100.0)),
    n=st.integers(min_value=1, max_value=12),
)
@settings(max_examples=100, deadline=None)
def test_endpoints_that_look_alike_get_equal_weights(
    latency: float, rif: float | None, n: int
) -> None:
    data = {addr(i): stats(latency, rif) for i in range(n)}
    result = weigh(data, latency_threshold_s=0.1)
    assert len({e.weight for e in result.endpoints.values()}) == 1


def test_no_agent_a_failing_endpoint_still_drops_to_the_floor() -> None:
    """Failures are a signal of their own: a down pod without an agent loses its traffic."""
    down = EndpointStats(0.2, 0.2, None, None, 1.0, 10, 0.0, consecutive_failures=3)
    result = weigh({addr(0): stats(5), addr(1): stats(6), addr(2): down}, latency_threshold_s=0.02)
    assert _weights(result, 3) == [MAX_WEIGHT, MAX_WEIGHT, math.ceil(MAX_WEIGHT / 20)]
    assert result.hot == frozenset({addr(2)})
    # DEGRADED, so the healthy ones keep equal weights among themselves, and Envoy's least
    # request its two choices (it sends a degraded host nothing while the healthy suffice).
    health = [result.endpoints[addr(i)].health for i in range(3)]
    assert health == [Health.HEALTHY, Health.HEALTHY, Health.DEGRADED]


def test_no_agent_many_failing_at_once_is_overload_not_a_reason_to_herd() -> None:
    """Probes of plain apps time out in their queues at high load: four of six failing must
    not floor four and send everything to two (measured: Aviator's p50 77x least request's)."""
    failing = EndpointStats(0.2, 0.2, None, None, 0.6, 10, 0.0, consecutive_failures=2)
    data = {addr(i): failing if i < 4 else stats(30) for i in range(6)}
    result = weigh(data, latency_threshold_s=0.025)
    weights = _weights(result, 6)
    assert min(weights) >= 0.25 * max(weights)
    assert result.hot == frozenset()


def test_a_recovered_endpoint_at_the_min_hot_rif_leaves_the_hot_set() -> None:
    # Every endpoint reports RIF 1 (the agent, light load): the quantile is 1 = minHotRif. The
    # slowed one turns hot by latency; once fast again it must turn cold, not be held hot by
    # RIF through the hysteresis (1 > 0.9 x 1) for as long as nothing else changes.
    addresses = [EndpointAddress(f"10.1.0.{i}", 8080) for i in range(1, 5)]

    def stats(slow_ms: float) -> dict[EndpointAddress, EndpointStats]:
        return {
            a: EndpointStats(
                latency_s=(slow_ms if i == 2 else 5.0) / 1000,
                probe_latency_s=(slow_ms if i == 2 else 5.0) / 1000,
                reported_latency_s=(slow_ms if i == 2 else 5.0) / 1000,
                rif=1.0,
                error_rate=0.0,
                samples=50,
                age_s=0.1,
                consecutive_failures=0,
            )
            for i, a in enumerate(addresses)
        }

    knobs = WeigherKnobs()
    slowed = weigh(stats(300.0), knobs=knobs, latency_threshold_s=0.1)
    assert slowed.hot == {addresses[2]}
    recovered = weigh(stats(5.0), knobs=knobs, latency_threshold_s=0.1, previous=slowed)
    assert recovered.hot == frozenset()
    assert recovered.changed
