"""The weigher: per-policy endpoint statistics → integer EDS weights and health (pure).

This module reads no clock, does no I/O and mutates none of its inputs. The tuning knobs
(:class:`~aviator.model.WeigherKnobs`, shared with the policy model) are parsed once from a
policy's ``spec.weigher`` and passed down.

The rule (Prequal's hot-cold lexicographic selection, NSDI 2024 §4, turned into weights):

1. An endpoint with data is *hot* by RIF when its RIF is above the ``hot_quantile`` quantile
   of the policy's RIFs, above ``min_hot_rif`` and above ``stand_out`` x (median RIF + 1) - 1
   (the low median): it must stand out from the fleet, not merely top it. Prequal's
   hot-cold rule picks among fresh probes per request, where the momentary top of four is a
   fine thing to avoid; a weight holds for a whole pass, and on identical backends the top
   RIF of four (1.8 against 1.2-1.5 in one pass of the load ramp) was floored every pass,
   the floor hopping between them, a quarter of the capacity idle at 110% load (p99 1.69x
   least request's on the latency page). Endpoints above the policy's ``latencyThreshold``
   and ``stand_out`` times the median latency then fill what the RIF leaves of the hot cap
   (rule 3), the slowest first: RIF is the fresh signal, the agent's latency a median over
   seconds (a moving antagonist's last victim, drained, still carried its queue in its
   latency, and it and the new victim made an overload that floored neither for 0.7 s). A
   hot endpoint of the previous result stays hot, while the cap has room, until both
   signals fall ``hysteresis`` below those thresholds.
2. If some endpoint with data is cold: cold weights fall smoothly with latency beyond the
   reference, the larger of ``latencyThreshold`` and ``stand_out`` times the cold endpoints'
   (low) median, ∝ (latency + τ)^-latency_exponent relative to (reference + τ), never below
   the floor 1/max_weight_ratio; within it they are 1. τ, the latency tolerance, is a tenth
   of ``latencyThreshold`` (0 without one): differences far below the threshold are noise.
   Unequal weights cost Envoy's least request its two choices (rule 4), so figures that do
   not stand out, or that the user's threshold calls good, get equal weights (a pod at 28 ms
   against 15 ms for the others, threshold 100 ms, once got 0.8).
   Hot ones get the floor (and DEGRADED health if ``degrade_hot``).
3. At most ``max(1, ceil((1 - hot_quantile) · n))`` endpoints may be hot (the cap). If more
   enter by RIF (ties at the quantile), or every endpoint with data is hot, the fleet is
   overloaded as a whole: all stay HEALTHY (the weigher never takes a policy's last endpoints
   away), no floors, and weights are the latency weight times (lowest RIF + 1)/(RIF + 1):
   Prequal's "all hot → lowest RIF", smoothly. Endpoints hot by latency or held hot by the
   hysteresis only fill what the cap leaves: they never make an overload. (Held ones did: a
   moving antagonist's last victim, draining its queue and held hot, plus its new victim
   made two hot of four, over the cap, and nothing was floored until the old one left.)
4. Do no harm (issue 13): where the data cannot tell the endpoints apart, Envoy's least
   request (the inner loop) does the balancing. The *confidence* of the signal is 1 when most
   endpoints with data report their load (RIF: the agent's fresh signal), and 0 without it:
   probe round trips are then the only signal, and they queue behind the requests (measured
   in the latency benchmark with plain HTTP apps, few slots and a moving antagonist: the
   lowest weight went to the backend that had been slow one move earlier and was now the
   fastest; its probe latency still carried its old queue). Without confidence every weight
   is equal, because *any* unequal weight takes Envoy's least request off its power of two
   choices: with unequal weights it picks by an EDF schedule of weight / (active + 1), a
   weighted round robin whose load term is read only when a host is scheduled (Envoy's
   ``least_request_lb.h``). Blending 0.75 of the way to the latency weights cost a p50 of
   1.22x least request's, with the targets right. Only an endpoint whose probes fail (2 in a
   row), and any endpoint at least as slow, is taken out at once, as long as they are few
   (within the hot cap of rule 3; many failing at once is overload): floor weight and
   DEGRADED health, so that the healthy endpoints keep equal weights and Envoy sends them
   everything while they are enough (overprovisioning factor 1.4) with its two choices intact.
5. Endpoints without data (new or stale) get a neutral weight: the median of the others.
6. Against the previous result: if it is *settled* (its weights are its targets, not a step
   of smoothing towards them), no endpoint's share of traffic would move by more than
   ``min_change`` (relative) and health, membership and which endpoints have data are the
   same, nothing changes (``changed=False``, previous weights returned). Otherwise non-hot
   weights move ``smoothing`` of the way to their targets (without confidence, rule 4, all
   the way); hot ones drop to the floor at once; and where what smoothing leaves is itself
   within ``min_change`` of the targets, the weights go to the targets (settled). A result
   still on its way keeps moving until it arrives: held by the dead band halfway, it sat on
   a knife-edge where probe noise alone pushed again much later (seen on fake time at a
   31 s interval: an endpoint's first sample landed within ``min_change`` of a half-smoothed
   weight, which then held for minutes). An endpoint that gains data moves too: held at
   the neutral weight (rule 5), the fastest of three pods kept 84% of its weight for good.
   Equal targets against unequal weights always move, at any size of change: Envoy's least
   request uses its two choices only while every weight is equal (a weight of 885 left from
   the warm-up held for a whole load ramp, within ``min_change``).

Published weights are integers in ``[ceil(MAX_WEIGHT / max_weight_ratio), MAX_WEIGHT]``,
so every weight is ≥ 1 and max/min ≤ ``max_weight_ratio``.

Two entry points, one rule. :func:`weigh` is the total function above. :class:`WorkloadWeigher`
is the same function kept warm for one workload across passes (issue 9, item 6: a policy
serving 10,000 pods spent 0.3-0.8 s per pass and most of a core): it holds the endpoints'
signals in lists (by index, in address order), is told only the endpoints whose statistics
changed, and gives exactly what :func:`weigh` would give on the full statistics with its last
result as ``previous``. A pass with no changed signal after an unchanged result weighs nothing
(the rule's fixed point); any other pass runs over plain lists of floats and allocates new
``WeightedEndpoint`` values only for the endpoints whose weight or health moved. The weigher
reads only three things of an ``EndpointStats``: ``latency_s``, ``rif`` and whether
``consecutive_failures`` reaches :data:`FAILING_CONSECUTIVE`; a sample that moves none of
them (a refused probe of an endpoint already failing) changes nothing.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, repeat
from operator import add, and_, ge, gt, is_not, mul, sub, truediv
from types import MappingProxyType
from typing import cast

from aviator.model import (
    DEFAULT_HOT_QUANTILE,
    MAX_WEIGHT,
    EndpointAddress,
    Health,
    KnobError,
    WeigherKnobs,
    WeightedEndpoint,
)
from aviator.probing.estimator import EndpointStats

__all__ = [
    "DEFAULT_HOT_QUANTILE",
    "FAILING_CONSECUTIVE",
    "KnobError",
    "WeighResult",
    "WeigherKnobs",
    "WorkloadWeigher",
    "confidence",
    "weigh",
]

_NO_ENDPOINTS: Mapping[EndpointAddress, WeightedEndpoint] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class WeighResult:
    """One policy's published weights, the hot set behind them, and whether they changed.

    ``endpoints`` is read-only and has exactly the addresses that were weighed. Pass the
    result back as ``previous`` on the next call: it carries the hysteresis state (the hot
    set, and ``settled``: whether the weights are the rule's targets rather than a step of
    smoothing towards them; only a settled result holds against a change below
    ``min_change``), and ``unmeasured``: the addresses weighed without data (given the
    neutral weight, rule 5): one that gains data (or loses it) always moves, as a new member
    does.
    """

    endpoints: Mapping[EndpointAddress, WeightedEndpoint] = field(
        default_factory=lambda: _NO_ENDPOINTS
    )
    hot: frozenset[EndpointAddress] = frozenset()
    changed: bool = True
    settled: bool = True
    unmeasured: frozenset[EndpointAddress] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))

    def as_tuple(self) -> tuple[WeightedEndpoint, ...]:
        """The endpoints sorted by address (for ``aviator.model.WeightedWorkload``)."""
        return tuple(self.endpoints[a] for a in sorted(self.endpoints))

    def weights(self) -> dict[EndpointAddress, int]:
        return {a: e.weight for a, e in self.endpoints.items()}


def _result(
    endpoints: Mapping[EndpointAddress, WeightedEndpoint],
    hot: frozenset[EndpointAddress],
    changed: bool,
    settled: bool = True,
    unmeasured: frozenset[EndpointAddress] = frozenset(),
) -> WeighResult:
    """A :class:`WeighResult` over ``endpoints`` as given: a read-only view this module made
    and nobody else holds (``__post_init__`` would copy it, hashing every address again)."""
    result = object.__new__(WeighResult)
    object.__setattr__(result, "endpoints", endpoints)
    object.__setattr__(result, "hot", hot)
    object.__setattr__(result, "changed", changed)
    object.__setattr__(result, "settled", settled)
    object.__setattr__(result, "unmeasured", unmeasured)
    return result


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sorted list."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _hot_cap(knobs: WeigherKnobs, n: int) -> int:
    """At most this many of ``n`` endpoints may be hot (or floored as failing)."""
    return max(1, math.ceil((1.0 - knobs.hot_quantile) * n - 1e-9))


LATENCY_TOLERANCE = 0.1  # τ as a fraction of latencyThreshold


#: An endpoint failing this many probes in a row is weighed as failing even when the signal is
#: weak. Not the error-rate average: it decays over 10 s, so it would follow the past too
#: (a backend whose queue made probes time out, drained since).
FAILING_CONSECUTIVE = 2


def confidence(data: Mapping[EndpointAddress, EndpointStats]) -> float:
    """How far the weights may move from equal, 1 or 0 (rule 4 of the module docstring): 1
    when at least half of the endpoints with data report their RIF."""
    reporting = sum(1 for s in data.values() if s.rif is not None)
    return _confidence(len(data), reporting)


def _confidence(with_data: int, reporting: int) -> float:
    return 1.0 if with_data and 2 * reporting >= with_data else 0.0


DEFAULT_TOLERANCE_S = 0.0  # τ without a threshold: plain inverse latency


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
    weigher = WorkloadWeigher(
        stats, knobs=knobs, latency_threshold_s=latency_threshold_s, previous=previous
    )
    weigher.update(stats)
    return weigher.weigh()


class WorkloadWeigher:
    """:func:`weigh` for one workload, kept across passes (pure; holds state, reads no clock).

    Built for a fixed set of addresses, knobs and threshold (build a new one when they
    change, passing the last result as ``previous``). :meth:`update` gives it the statistics
    that changed; :meth:`weigh` returns exactly what ``weigh(all_stats, knobs=...,
    latency_threshold_s=..., previous=self.result)`` returns. Every address starts with no data.

    The signals are kept in lists by index and each step of the rule runs over them with
    ``map``/``itertools`` (no Python frame per endpoint), performing the same floating-point
    operations in the same order as the rule as written, so the results are identical, not
    merely close. ``weighings`` counts the endpoints weighed so far (a pass that runs the rule
    weighs every endpoint; a pass at the rule's fixed point weighs none): what a test can count
    instead of timing a pass.
    """

    __slots__ = (
        "_addresses",
        "_dirty",
        "_failing",
        "_has",
        "_index",
        "_knobs",
        "_latency",
        "_n_data",
        "_prev_health",
        "_prev_weight",
        "_result",
        "_rif",
        "_rif_or_low",
        "_same_members",
        "_threshold",
        "weighings",
    )

    def __init__(
        self,
        addresses: Iterable[EndpointAddress],
        *,
        knobs: WeigherKnobs | None = None,
        latency_threshold_s: float | None = None,
        previous: WeighResult | None = None,
    ) -> None:
        if latency_threshold_s is not None and not (
            math.isfinite(latency_threshold_s) and latency_threshold_s > 0
        ):
            raise ValueError(
                f"latency_threshold_s must be finite and > 0, got {latency_threshold_s!r}"
            )
        self._knobs = knobs or WeigherKnobs()
        self._threshold = latency_threshold_s
        self._addresses: list[EndpointAddress] = sorted(set(addresses))
        self._index = {a: i for i, a in enumerate(self._addresses)}
        n = len(self._addresses)
        self._has: list[bool] = [False] * n  # False: no data (the stats were None)
        self._latency: list[float] = [0.0] * n  # 0.0 where there is no data
        self._rif: list[float | None] = [None] * n
        self._rif_or_low: list[float] = [-math.inf] * n  # the RIF, -inf where there is none
        self._failing: list[bool] = [False] * n
        self._n_data = 0
        self._dirty = True
        self.weighings = 0
        self._result = previous
        self._same_members = False
        self._prev_weight: list[float] = []
        self._prev_health: list[Health] = []
        if previous is not None:
            self._remember(previous)

    @property
    def result(self) -> WeighResult | None:
        """The last result (``previous`` until the first :meth:`weigh`)."""
        return self._result

    def update(self, stats: Mapping[EndpointAddress, EndpointStats | None]) -> None:
        """Take the statistics of some addresses (``None``: no data now). Addresses this
        weigher was not built for are ignored."""
        index = self._index
        has, latency, rif, failing = self._has, self._latency, self._rif, self._failing
        for address, s in stats.items():
            i = index.get(address)
            if i is None:
                continue
            if s is None:
                if has[i]:
                    has[i], latency[i], rif[i], failing[i] = False, 0.0, None, False
                    self._rif_or_low[i] = -math.inf
                    self._n_data -= 1
                    self._dirty = True
                continue
            r, fails = s.rif, s.consecutive_failures >= FAILING_CONSECUTIVE
            if has[i] and latency[i] == s.latency_s and rif[i] == r and failing[i] is fails:
                continue  # nothing the rule reads has moved
            if not has[i]:
                has[i] = True
                self._n_data += 1
            latency[i], rif[i], failing[i] = s.latency_s, r, fails
            self._rif_or_low[i] = -math.inf if r is None else r
            self._dirty = True

    def _remember(self, result: WeighResult) -> None:
        """Keep ``result``'s weights and health by index, if it has exactly our addresses."""
        endpoints = result.endpoints
        self._same_members = len(endpoints) == len(self._addresses) and all(
            a in endpoints for a in self._addresses
        )
        if self._same_members:
            self._prev_weight = [float(endpoints[a].weight) for a in self._addresses]
            self._prev_health = [endpoints[a].health for a in self._addresses]
        else:
            self._prev_weight, self._prev_health = [], []

    def weigh(self) -> WeighResult:
        """The weights now (see the class docstring)."""
        previous = self._result
        if not self._dirty and previous is not None and not previous.changed:
            return previous  # the same signals against an unchanged result: a fixed point
        result = self._weigh(previous)
        self._dirty = False
        if result is not previous:
            if result.changed:
                self._remember(result)
            self._result = result
        return result

    def _weigh(self, previous: WeighResult | None) -> WeighResult:
        addresses = self._addresses
        n_all = len(addresses)
        if not n_all:
            if previous is not None and not previous.endpoints:
                return _unchanged(previous)
            return _result(_NO_ENDPOINTS, frozenset(), True)
        self.weighings += n_all
        knobs, threshold = self._knobs, self._threshold
        has, latency, rif, failing = self._has, self._latency, self._rif, self._failing
        n_data = self._n_data
        everyone = range(n_all)
        data: Sequence[int] = everyone if n_data == n_all else list(compress(everyone, has))
        cap = _hot_cap(knobs, n_data)

        # Rules 1 and 3: the hot set (hysteresis for those hot before), and overload. Where
        # there is no data the latency is 0.0 and the RIF -inf: never above a threshold.
        was_hot: list[int] = []
        if previous is not None and previous.hot:
            index = self._index
            was_hot = sorted(index[a] for a in previous.hot if a in index)
        known = cast("list[float]", sorted(filter(partial(is_not, None), rif)))
        stand_out = knobs.stand_out
        enter_rif = math.inf
        if known:
            enter_rif = max(
                _quantile(known, knobs.hot_quantile),
                knobs.min_hot_rif,
                stand_out * (known[(len(known) - 1) // 2] + 1.0) - 1.0,  # low median: sorted
            )
        keep = 1.0 - knobs.hysteresis
        rif_held = max(enter_rif * keep, knobs.min_hot_rif)
        flags = list(map(gt, self._rif_or_low, repeat(enter_rif)))
        entering = flags.count(True) if known else 0
        # Above latencyThreshold and standing out from the fleet's median: fills what the RIF
        # leaves of the cap, the slowest first (never an overload).
        enter_lat: float | None = None
        if threshold is not None and n_data:
            median_lat = statistics.median_low(map(latency.__getitem__, data))
            enter_lat = max(threshold * 1.0, stand_out * median_lat)
        room = cap - entering
        if enter_lat is not None and room > 0:
            slow = [i for i in data if latency[i] > enter_lat and not flags[i]]
            slow.sort(key=lambda i: (-latency[i], i))
            for i in slow[:room]:
                flags[i] = True
            room -= min(room, len(slow))
        if room > 0 and was_hot:
            rif_or_low = self._rif_or_low
            held = []
            for i in was_hot:
                if has[i] and not flags[i]:
                    by_rif = known and rif_or_low[i] > rif_held
                    by_lat = enter_lat is not None and latency[i] > enter_lat * keep
                    if by_rif or by_lat:
                        held.append(i)
            held.sort(key=lambda i: (-rif_or_low[i], -latency[i], i))
            for i in held[:room]:
                flags[i] = True
        hot = list(compress(everyone, flags))
        hot_set = set(hot)
        overloaded = entering > cap

        # Rule 2 (and 3 when all are hot): relative targets in [floor, 1]; ``order`` is the
        # order the rule sums them in (cold, then hot, then those without data).
        floor = 1.0 / knobs.max_weight_ratio
        tau = LATENCY_TOLERANCE * threshold if threshold is not None else DEFAULT_TOLERANCE_S
        exponent = knobs.latency_exponent
        target: list[float] = [0.0] * n_all
        order: Sequence[int] = []
        all_hot = False
        if n_data:
            cold = [i for i in data if i not in hot_set] if hot else data
            if cold and not overloaded:
                lat = latency if cold is everyone else list(map(latency.__getitem__, cold))
                # Within stand_out of the cold median, or within latencyThreshold: the same to
                # the weigher (weight 1).
                reference = stand_out * statistics.median_low(lat)
                if threshold is not None:
                    reference = max(reference, threshold)
                reference += tau
                cold_targets = [
                    max(floor, (reference / d) ** exponent) if (d := x + tau) > reference else 1.0
                    for x in lat
                ]
                if cold is everyone:
                    target = list(cold_targets)
                else:
                    _scatter(target, cold, cold_targets)
                for i in hot:
                    target[i] = floor
                order = everyone if cold is everyone else [*cold, *hot]
            else:
                # Prequal's "all hot → lowest RIF", smoothly, times the latency weight; an
                # endpoint without a load report ranks mid-fleet. (Overload: rare, plain.)
                fastest = min(latency[i] for i in data) + tau
                middle = statistics.median(known) if known else 0.0
                ranked = [middle if (r := rif[i]) is None else r for i in data]
                lowest = min(ranked)
                for i, r in zip(data, ranked, strict=True):
                    by_latency = float((fastest / (latency[i] + tau)) ** exponent)
                    target[i] = max(floor, by_latency * (lowest + 1.0) / (r + 1.0))
                order = data
                all_hot = True
        urgent: set[int] = set() if all_hot else hot_set

        # Rule 4: without confidence, equal weights; failures alone are urgent (and DEGRADED).
        sure = _confidence(n_data, len(known))
        degrade = knobs.degrade_hot
        if sure < 1.0:
            fail_at = min(compress(latency, failing), default=math.inf)
            failing_now = (
                list(compress(everyone, map(and_, has, map(ge, latency, repeat(fail_at)))))
                if fail_at < math.inf
                else []
            )
            urgent = set(failing_now) if len(failing_now) <= cap < n_data else set()
            target = [1.0] * n_all
            for i in urgent:
                target[i] = floor
            hot_set = urgent
            all_hot = not urgent
            degrade = True

        # Rule 5: no data → the median of the others.
        if n_data < n_all:
            neutral = statistics.median(map(target.__getitem__, order)) if n_data else 1.0
            missing = [i for i in everyone if not has[i]]
            for i in missing:
                target[i] = neutral
            order = [*order, *missing]
        unmeasured = (
            frozenset(addresses[i] for i in everyone if not has[i])
            if n_data < n_all
            else frozenset()
        )
        health = [Health.HEALTHY] * n_all
        if degrade:
            for i in urgent:
                health[i] = Health.DEGRADED
        published_hot = frozenset() if all_hot else frozenset(addresses[i] for i in hot_set)
        if previous is None:
            return self._build(
                _quantize(target, knobs), health, published_hot, previous, True, unmeasured
            )

        # Rule 6: against the previous result.
        prev_w: list[float | None] | list[float]
        if self._same_members:
            prev_w = self._prev_weight
            top, bottom = max(prev_w), min(prev_w)
            structural = (
                health != self._prev_health
                or top > knobs.max_weight_ratio * bottom
                or unmeasured != previous.unmeasured
                # Equal targets against unequal weights: Envoy's least request picks by two
                # choices only when every weight is equal, so equality is never "too small
                # a change" (a 0.885 of the warm-up held a whole load ramp below min_change).
                or (top != bottom and max(target) == min(target))
            )
        else:  # membership changed: structural, and only some addresses have a weight before
            prev = previous.endpoints
            prev_w = [
                float(e.weight) if (e := prev.get(a)) is not None else None for a in addresses
            ]
            top = max((float(e.weight) for e in prev.values()), default=1.0)
            structural = True
        # The total in the order the rule sums the targets.
        total_target = sum(target) if order is everyone else sum(map(target.__getitem__, order))
        if (
            previous.settled
            and not structural
            and _moved(target, total_target, prev_w) <= knobs.min_change
        ):
            return _unchanged(previous)
        blended: list[float]
        if sure < 1.0:
            # Equal weights and floors: nothing to smooth. A recovering endpoint smoothed back
            # up from the floor would keep the weights unequal, and Envoy off its two choices,
            # for several passes.
            blended = target
        elif self._same_members:
            before = list(map(truediv, prev_w, repeat(top)))
            blended = list(
                map(add, before, map(mul, repeat(knobs.smoothing), map(sub, target, before)))
            )
            for i in urgent:
                blended[i] = target[i]
        else:
            blended = []
            for i in everyone:
                w = prev_w[i]
                if w is not None and i not in urgent:
                    b = w / top
                    blended.append(b + knobs.smoothing * (target[i] - b))
                else:
                    blended.append(target[i])
        # Snap: if what smoothing leaves would itself be below min_change, go to the targets. A
        # smoothed state that stops just under min_change from its target sits on a knife-edge,
        # where probe jitter alone pushes again (seen at 5 m intervals on fake time).
        settled = _moved(target, total_target, blended) <= knobs.min_change
        if settled:
            blended = target
        weights = _quantize(blended, knobs)
        if (
            self._same_members
            and published_hot == previous.hot
            and health == self._prev_health
            and weights == self._prev_weight  # ints against the same ints as floats
            and unmeasured == previous.unmeasured
        ):
            return _unchanged(previous, settled)
        return self._build(weights, health, published_hot, previous, settled, unmeasured)

    def _build(
        self,
        weights: list[int],
        health: list[Health],
        hot: frozenset[EndpointAddress],
        previous: WeighResult | None,
        settled: bool = True,
        unmeasured: frozenset[EndpointAddress] = frozenset(),
    ) -> WeighResult:
        """A changed result; endpoints whose weight and health held keep their value."""
        old = previous.endpoints if previous is not None and self._same_members else None
        endpoints: dict[EndpointAddress, WeightedEndpoint] = {}
        for i, a in enumerate(self._addresses):
            w, h = weights[i], health[i]
            if old is not None and w == self._prev_weight[i] and h is self._prev_health[i]:
                endpoints[a] = old[a]
            else:
                endpoints[a] = WeightedEndpoint(a, w, h)
        return _result(MappingProxyType(endpoints), hot, True, settled, unmeasured)


def _scatter(into: list[float], at: Sequence[int], values: Iterable[float]) -> None:
    """``into[at[k]] = values[k]`` for every k, without a Python frame per item."""
    deque(map(into.__setitem__, at, values), maxlen=0)


def _moved(target: list[float], total_target: float, current: Sequence[float | None]) -> float:
    """Largest relative change of any endpoint's traffic share from ``current`` to ``target``
    (over the endpoints ``current`` has a weight for; ``total_target`` is the targets' total).

    The same operations as the rule: ``abs(t / T - c / C) / (c / C)``."""
    if None in current:
        pairs = [(t, c) for t, c in zip(target, current, strict=True) if c is not None]
        target, present = [t for t, _ in pairs], [c for _, c in pairs]
    else:
        present = current  # type: ignore[assignment]
    total = sum(present)
    shares = list(map(truediv, present, repeat(total)))
    moved = map(
        truediv, map(abs, map(sub, map(truediv, target, repeat(total_target)), shares)), shares
    )
    return float(max(moved))


def _quantize(relative: list[float], knobs: WeigherKnobs) -> list[int]:
    """Scale so the largest is MAX_WEIGHT, round half up, clamp into [w_min, MAX_WEIGHT]."""
    top = max(relative)
    w_min = math.ceil(MAX_WEIGHT / knobs.max_weight_ratio)  # so MAX_WEIGHT / w_min <= ratio
    scaled = map(
        add, map(mul, map(truediv, relative, repeat(top)), repeat(MAX_WEIGHT)), repeat(0.5)
    )
    return list(map(min, repeat(MAX_WEIGHT), map(max, repeat(w_min), map(math.floor, scaled))))


def _unchanged(previous: WeighResult, settled: bool | None = None) -> WeighResult:
    """``previous``'s weights as an unchanged result (settled as given, or as it was)."""
    settled = previous.settled if settled is None else settled
    if not previous.changed and previous.settled is settled:
        return previous
    return _result(previous.endpoints, previous.hot, False, settled, previous.unmeasured)
