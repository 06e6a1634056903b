"""The weigher as it was before the incremental engine (commit f4d4a8b), kept as the reference
the tests compare :func:`aviator.probing.weigher.weigh` and
:class:`aviator.probing.weigher.WorkloadWeigher` with, result for result. Changed since only
where the rule changed (in both): rule 6 holds only a settled result; RIF decides before
latency; an endpoint is told apart from the fleet only when it stands out (``stand_out``);
latencies within latencyThreshold weigh 1; equal targets always move unequal weights."""

# ruff: noqa

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from aviator.model import MAX_WEIGHT, EndpointAddress, Health, WeigherKnobs, WeightedEndpoint
from aviator.probing.estimator import EndpointStats
from aviator.probing.weigher import WeighResult


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _classify_hot(
    data: Mapping[EndpointAddress, EndpointStats],
    knobs: WeigherKnobs,
    latency_threshold_s: float | None,
    was_hot: frozenset[EndpointAddress],
) -> tuple[frozenset[EndpointAddress], bool]:
    """The hot endpoints, and whether the whole fleet is overloaded.

    At most ``max(1, ceil((1 - hot_quantile) * n))`` endpoints can be hot: Prequal's hot set is
    the top of the RIF distribution, a minority. When more qualify by RIF (at 90% load most
    endpoints cross a latency threshold, and flooring all but one or two herded every sidecar's
    traffic onto them), the fleet is treated as all hot. An endpoint is hot by RIF only when it
    stands out from the fleet's median (``stand_out``), by latency only when it stands out too
    and is above latencyThreshold; those fill what the RIF leaves of the cap.
    """
    rifs = sorted(s.rif for s in data.values() if s.rif is not None)
    stand_out = knobs.stand_out
    enter_rif = (
        max(
            _quantile(rifs, knobs.hot_quantile),
            knobs.min_hot_rif,
            stand_out * (statistics.median_low(rifs) + 1.0) - 1.0,
        )
        if rifs
        else math.inf
    )
    cap = _hot_cap(knobs, len(data))
    # Hot by latency: above latencyThreshold and standing out from the fleet's median latency;
    # such endpoints only fill what the RIF leaves of the cap, the slowest first.
    enter_lat = (
        max(
            latency_threshold_s,
            stand_out * statistics.median_low(s.latency_s for s in data.values()),
        )
        if latency_threshold_s is not None and data
        else None
    )

    def by_rif(s: EndpointStats, keep: float) -> bool:
        # min_hot_rif holds with the hysteresis too: at or below it an endpoint is never hot by
        # RIF (else a recovered endpoint at the fleet's RIF of 1 stayed hot, and floored, for good).
        return s.rif is not None and s.rif > max(enter_rif * keep, knobs.min_hot_rif)

    def by_latency(s: EndpointStats, keep: float) -> bool:
        return enter_lat is not None and s.latency_s > enter_lat * keep

    entering = {a for a, s in data.items() if by_rif(s, 1.0)}
    slow = sorted(
        (a for a, s in data.items() if a not in entering and by_latency(s, 1.0)),
        key=lambda a: (-data[a].latency_s, a),
    )
    hot = entering | set(slow[: max(0, cap - len(entering))])
    # Hysteresis: an endpoint that was hot leaves only once clearly below the thresholds, while
    # the cap has room for it (the hottest first); held ones never make an overload.
    keep = 1.0 - knobs.hysteresis
    held = [
        a
        for a, s in data.items()
        if a in was_hot and a not in hot and (by_rif(s, keep) or by_latency(s, keep))
    ]

    def heat(a: EndpointAddress) -> tuple[float, float, EndpointAddress]:
        rif = data[a].rif
        return (-(rif if rif is not None else -math.inf), -data[a].latency_s, a)

    hot |= set(sorted(held, key=heat)[: max(0, cap - len(hot))])
    return frozenset(hot), len(entering) > cap


def _hot_cap(knobs: WeigherKnobs, n: int) -> int:
    """At most this many of ``n`` endpoints may be hot (or floored as failing)."""
    return max(1, math.ceil((1.0 - knobs.hot_quantile) * n - 1e-9))


LATENCY_TOLERANCE = 0.1  # τ as a fraction of latencyThreshold
#: An endpoint failing this many probes in a row is weighed as failing even when the signal is
#: weak. Not the error-rate average: it decays over 10 s, so it would follow the past too
#: (a backend whose queue made probes time out, drained since).
FAILING_CONSECUTIVE = 2


def _failing(s: EndpointStats) -> bool:
    return s.consecutive_failures >= FAILING_CONSECUTIVE


def confidence(data: Mapping[EndpointAddress, EndpointStats]) -> float:
    """How far the weights may move from equal, 1 or 0 (rule 4 of the module docstring): 1
    when at least half of the endpoints with data report their RIF."""
    reporting = sum(1 for s in data.values() if s.rif is not None)
    return 1.0 if data and 2 * reporting >= len(data) else 0.0


DEFAULT_TOLERANCE_S = 0.0  # τ without a threshold: plain inverse latency


def _targets(
    data: Mapping[EndpointAddress, EndpointStats],
    hot: frozenset[EndpointAddress],
    overloaded: bool,
    knobs: WeigherKnobs,
    latency_threshold_s: float | None,
) -> tuple[dict[EndpointAddress, float], bool]:
    """Relative target weights in [floor, 1] for endpoints with data; True if all are hot."""
    floor = 1.0 / knobs.max_weight_ratio
    tau = (
        LATENCY_TOLERANCE * latency_threshold_s
        if latency_threshold_s is not None
        else DEFAULT_TOLERANCE_S
    )
    if not data:
        return {}, False
    fastest = min(s.latency_s for s in data.values()) + tau

    def by_latency(s: EndpointStats, fastest: float) -> float:
        return float((fastest / (s.latency_s + tau)) ** knobs.latency_exponent)

    cold = {a: s for a, s in data.items() if a not in hot}
    if cold and not overloaded:
        # Latencies within stand_out of the cold median, or within the threshold, are the same
        # to the weigher (weight 1).
        reference = knobs.stand_out * statistics.median_low(s.latency_s for s in cold.values())
        if latency_threshold_s is not None:
            reference = max(reference, latency_threshold_s)
        reference += tau
        out = {
            a: max(floor, by_latency(s, reference)) if s.latency_s + tau > reference else 1.0
            for a, s in cold.items()
        }
        out.update((a, floor) for a in data if a in hot)
        return out, False
    # All hot (or overloaded): Prequal picks the lowest RIF; smoothly, that is a weight falling
    # with RIF, times the latency weight so that at equal RIF the slower one still gets less
    # (RIF alone left a 10x slower backend a third of the others' weight). An endpoint without
    # a load report ranks mid-fleet.
    known = sorted(s.rif for s in data.values() if s.rif is not None)
    middle = statistics.median(known) if known else 0.0
    rifs = {a: s.rif if s.rif is not None else middle for a, s in data.items()}
    lowest = min(rifs.values())
    return {
        a: max(floor, by_latency(s, fastest) * (lowest + 1.0) / (rifs[a] + 1.0))
        for a, s in data.items()
    }, True


def _shares(weights: Mapping[EndpointAddress, float]) -> dict[EndpointAddress, float]:
    total = sum(weights.values())
    return {a: w / total for a, w in weights.items()}


def _moved(
    targets: Mapping[EndpointAddress, float], current: Mapping[EndpointAddress, float]
) -> float:
    """Largest relative change of any endpoint's traffic share from ``current`` to ``targets``."""
    t, c = _shares(targets), _shares(current)
    return max(abs(t[a] - c[a]) / c[a] for a in c)


def _quantize(
    relative: Mapping[EndpointAddress, float], knobs: WeigherKnobs
) -> dict[EndpointAddress, int]:
    """Scale so the largest is MAX_WEIGHT, round half up, clamp into [w_min, MAX_WEIGHT]."""
    top = max(relative.values())
    w_min = math.ceil(MAX_WEIGHT / knobs.max_weight_ratio)  # so MAX_WEIGHT / w_min <= ratio
    return {
        a: min(MAX_WEIGHT, max(w_min, math.floor(r / top * MAX_WEIGHT + 0.5)))
        for a, r in relative.items()
    }


def weigh(
    stats: Mapping[EndpointAddress, EndpointStats | None],
    *,
    knobs: WeigherKnobs | None = None,
    latency_threshold_s: float | None = None,
    previous: WeighResult | None = None,
) -> WeighResult:
    """Weights and health for one policy's endpoints (``None`` stats: no data yet).

    Total, deterministic and non-mutating. See the module docstring for the rule. The result
    has exactly the addresses of ``stats``; ``changed`` is False iff it equals ``previous``
    (then the previous endpoints and hot set are returned as they were).
    """
    knobs = knobs or WeigherKnobs()
    if latency_threshold_s is not None and not (
        math.isfinite(latency_threshold_s) and latency_threshold_s > 0
    ):
        raise ValueError(f"latency_threshold_s must be finite and > 0, got {latency_threshold_s!r}")
    addresses = sorted(stats)
    if not addresses:
        if previous is not None and not previous.endpoints:
            return previous if not previous.changed else WeighResult(changed=False)
        return WeighResult(changed=True)

    data = {a: s for a in addresses if (s := stats[a]) is not None}
    was_hot = previous.hot if previous is not None else frozenset()
    hot, overloaded = _classify_hot(data, knobs, latency_threshold_s, was_hot)
    targets, all_hot = _targets(data, hot, overloaded, knobs, latency_threshold_s)
    # Urgent: endpoints that must drop to the floor now, not through smoothing.
    urgent = frozenset() if all_hot else hot
    sure = confidence(data)
    degrade = knobs.degrade_hot
    if sure < 1.0:
        # Failures are a signal of their own, whatever the latencies: a failing endpoint keeps
        # its full target (the floor) at once, or a down pod without an agent keeps traffic.
        # Everything else gets an equal weight (unequal weights take Envoy's least request off
        # its two choices), and the failing ones are DEGRADED too, so the healthy keep equal.
        # Anything at least as slow as a failing endpoint goes with it (weights stay monotone
        # in latency); never every endpoint: with all of them failing nothing is taken away.
        fail_at = min((s.latency_s for s in data.values() if _failing(s)), default=math.inf)
        failing = frozenset(a for a, s in data.items() if s.latency_s >= fail_at)
        # And only a few: many failing at once is overload (probes timing out in the queues
        # of plain apps, measured at 70% load with 2 slots), and flooring them herded the
        # traffic onto the rest.
        urgent = failing if len(failing) <= _hot_cap(knobs, len(data)) < len(data) else frozenset()
        floor = 1.0 / knobs.max_weight_ratio
        targets = {a: floor if a in urgent else 1.0 for a in targets}
        degrade = True
        hot = urgent
        all_hot = not urgent
    neutral = statistics.median(targets.values()) if targets else 1.0
    for a in addresses:
        targets.setdefault(a, neutral)
    health = {a: Health.DEGRADED if degrade and a in urgent else Health.HEALTHY for a in addresses}
    published_hot = frozenset() if all_hot else hot

    unmeasured = frozenset(a for a in addresses if a not in data)

    def build(weights: Mapping[EndpointAddress, int], settled: bool = True) -> WeighResult:
        return WeighResult(
            {a: WeightedEndpoint(a, weights[a], health[a]) for a in addresses},
            hot=published_hot,
            changed=True,
            settled=settled,
            unmeasured=unmeasured,
        )

    if previous is None:
        return build(_quantize(targets, knobs))

    prev = previous.endpoints
    prev_weights = {a: float(e.weight) for a, e in prev.items()}
    structural = (
        set(prev) != set(addresses)
        or any(prev[a].health is not health[a] for a in addresses)
        or max(prev_weights.values()) > knobs.max_weight_ratio * min(prev_weights.values())
        # An endpoint that gains (or loses) data moves like a new member: held at the
        # neutral weight by the dead band, a fast pod kept 84% of its weight for good.
        or unmeasured != previous.unmeasured
        # Equal targets against unequal weights: equality is Envoy's two choices.
        or (len(set(prev_weights.values())) > 1 and len(set(targets.values())) == 1)
    )
    # Only a settled result holds against a small move: one still on its way keeps moving.
    if previous.settled and not structural and _moved(targets, prev_weights) <= knobs.min_change:
        return _unchanged(previous)
    prev_top = max(prev_weights.values()) if prev_weights else 1.0
    blended = {}
    for a in addresses:
        if a in prev and a not in urgent and sure == 1.0:  # without confidence: no smoothing
            before = prev_weights[a] / prev_top
            blended[a] = before + knobs.smoothing * (targets[a] - before)
        else:
            blended[a] = targets[a]
    # Snap: if what smoothing leaves would itself be below min_change, go to the targets. A
    # smoothed state that stops just under min_change from its target sits on a knife-edge,
    # where probe jitter alone pushes again (seen at 5 m intervals on fake time).
    settled = _moved(targets, blended) <= knobs.min_change
    if settled:
        blended = dict(targets)
    result = build(_quantize(blended, knobs), settled)
    if (
        result.endpoints == prev
        and result.hot == previous.hot
        and result.unmeasured == previous.unmeasured
    ):
        return _unchanged(previous, settled)
    return result


def _unchanged(previous: WeighResult, settled: bool | None = None) -> WeighResult:
    settled = previous.settled if settled is None else settled
    if not previous.changed and previous.settled is settled:
        return previous
    return WeighResult(
        previous.endpoints,
        hot=previous.hot,
        changed=False,
        settled=settled,
        unmeasured=previous.unmeasured,
    )
