"""The estimator: probe results → per-endpoint statistics (pure; time is an argument).

Per endpoint it keeps time-decayed exponentially weighted moving averages (EWMA) of the probe
latency, of the error rate, and of the RIF and latency the server itself reports (ORCA), with
a decay that depends on the time between samples, not on their number (as linkerd's EWMA
does): a sample's weight does not depend on how many others came in between.

Each endpoint's settings follow its probe interval (:meth:`EstimatorConfig.for_interval`,
issue 9): staleness is ``max(stale_after_s, stale_after_intervals * interval)`` (30 s, or five
intervals when that is longer), so a policy probing every minute never sees its endpoints go
stale between two probes; the latency and error half-lives scale with the interval above
``reference_interval_s`` (1 s), so the averages span the same number of probes at any
interval. The RIF and reported-latency half-lives do not scale: load information is only worth
its freshest value, and the server's latency report is already its own aggregate.

Invariants:
- No clock reads: every method that needs the time takes ``now``.
- A failed probe is a latency sample, ``max(rtt, failure_penalty * timeout)``: a fast-failing
  endpoint looks slow, never fast ("sinkholing", Prequal §2).
- Recovery: an endpoint that failed ``down_after_failures`` probes in a row and then answers
  two in a row restarts its latency average from those two answers. The penalised samples
  stood for "down", not for a latency the pod has now; decaying them away took longer than
  the outage's back-off (~20 s at 1 s probes). One answer alone does not restart it, so an
  endpoint that flaps (fail, fail, answer, ...) stays slow.
- Samples older than the staleness on arrival, from the future, or not newer than the
  endpoint's last sample are dropped (out of order).
- Every statistic is finite: latencies in ``[min_latency_s, max_latency_s]``, error rate in
  ``[0, 1]``, RIF ≥ 0; "no data yet" and "stale" are ``None``, never NaN.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from aviator.probing.results import ProbeResult

__all__ = [
    "EndpointEstimate",
    "EndpointStats",
    "Estimator",
    "EstimatorConfig",
    "estimate_stats",
    "update_estimate",
]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    """Decay and staleness settings. Invariant: every field finite and > 0,
    ``failure_penalty >= 1``, ``min_latency_s < max_latency_s`` and
    ``down_after_failures >= 1``.

    The half-lives and ``stale_after_s`` are those of an endpoint probed every
    ``reference_interval_s`` or faster; :meth:`for_interval` gives an endpoint's own.
    """

    #: Half-life of the probe-latency average.
    latency_half_life_s: float = 2.0
    #: Half-life of the RIF average: short, because stale load information hurts (Prequal §5).
    rif_half_life_s: float = 0.5
    #: Half-life of the reported-latency average: short too, because the server's report is
    #: already an aggregate (the agent's median of its last 5 s of requests at the current
    #: RIF). With the probe latency's 2 s on top, a backend that had drained the queue of an
    #: antagonist's slowdown stayed above latencyThreshold for seconds, and its new victim
    #: crossed it late (latency benchmark, antagonist at 90%: floored 1.2 s after each move).
    #: The agent's report now also follows the requests in flight (Little's law over its
    #: last half second), which moves within a probe or two of a slowdown; a 0.5 s average
    #: on top of it took three probes to follow.
    reported_latency_half_life_s: float = 0.1
    #: Half-life of the error-rate average.
    error_half_life_s: float = 10.0
    #: An endpoint with no sample for this long has no statistics (``None``); a sample this old
    #: on arrival is dropped. The floor of every endpoint's staleness: see
    #: ``stale_after_intervals``.
    stale_after_s: float = 30.0
    #: An endpoint is stale only after this many of its probe intervals without a sample (if
    #: longer than ``stale_after_s``). Above the prober's longest gap between two results of
    #: one endpoint: its back-off cap (3 intervals), jitter (10%) and a timeout (≤ 1 interval).
    stale_after_intervals: float = 5.0
    #: The half-lives above hold for probes this often or more; a slower endpoint's latency and
    #: error half-lives are multiplied by interval / reference_interval_s.
    reference_interval_s: float = 1.0
    #: An endpoint that failed this many probes in a row is down; two answers in a row then
    #: restart its latency average (see the module docstring).
    down_after_failures: int = 2
    #: A failed probe counts as a latency of ``failure_penalty * timeout`` (at least its RTT).
    failure_penalty: float = 2.0
    #: Latencies are clamped into this range (an RTT of 0 on a fake clock must not become an
    #: infinite weight, a wedged endpoint must not become an infinite latency).
    min_latency_s: float = 1e-6
    max_latency_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in (
            "latency_half_life_s",
            "rif_half_life_s",
            "reported_latency_half_life_s",
            "error_half_life_s",
            "stale_after_s",
            "stale_after_intervals",
            "reference_interval_s",
            "failure_penalty",
            "min_latency_s",
            "max_latency_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"EstimatorConfig.{name} must be finite and > 0, got {value!r}")
        if self.failure_penalty < 1:
            raise ValueError(f"failure_penalty must be >= 1, got {self.failure_penalty}")
        if self.min_latency_s >= self.max_latency_s:
            raise ValueError("min_latency_s must be below max_latency_s")
        if isinstance(self.down_after_failures, bool) or self.down_after_failures < 1:
            raise ValueError(f"down_after_failures must be >= 1, got {self.down_after_failures!r}")

    def for_interval(self, interval_s: float | None) -> EstimatorConfig:
        """The settings of an endpoint probed every ``interval_s`` (``None``: this config).

        Staleness ``max(stale_after_s, stale_after_intervals * interval)``; latency and error
        half-lives * ``max(1, interval / reference_interval_s)``; RIF and reported-latency
        half-lives unchanged.
        Idempotent: ``c.for_interval(i).for_interval(i) == c.for_interval(i)``.
        """
        if interval_s is None:
            return self
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"interval_s must be finite and > 0, got {interval_s!r}")
        scale = max(1.0, interval_s / self.reference_interval_s)
        stale = max(self.stale_after_s, self.stale_after_intervals * interval_s)
        if scale == 1.0 and stale == self.stale_after_s:
            return self
        return replace(
            self,
            latency_half_life_s=self.latency_half_life_s * scale,
            error_half_life_s=self.error_half_life_s * scale,
            stale_after_s=stale,
            reference_interval_s=self.reference_interval_s * scale,
        )


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """What the weigher sees of one endpoint. All fields finite.

    ``latency_s`` is the latency the weigher ranks by: the larger of the probe latency and
    the server's own fresh latency estimate, so a failing server cannot hide behind an old
    good report and an idle probe path cannot hide a slow application.
    """

    latency_s: float
    probe_latency_s: float
    reported_latency_s: float | None
    rif: float | None
    error_rate: float
    samples: int
    age_s: float
    consecutive_failures: int


@dataclass(frozen=True, slots=True)
class EndpointEstimate:
    """Decayed state of one endpoint after at least one accepted sample (a value)."""

    samples: int
    last_at: float
    probe_latency_s: float
    error_rate: float
    consecutive_failures: int
    #: The first answer after the endpoint was down (latency sample, time): a second answer
    #: in a row restarts the latency average from the two.
    recovery: tuple[float, float] | None = None
    reported_latency_s: float | None = None
    reported_latency_at: float | None = None
    rif: float | None = None
    rif_at: float | None = None


def _decay(previous: float, sample: float, dt: float, half_life: float) -> float:
    """Time-decayed EWMA step: the old value keeps weight 2^(-dt/half_life)."""
    keep = math.exp2(-dt / half_life)
    return previous * keep + sample * (1.0 - keep)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _latency_sample(result: ProbeResult, config: EstimatorConfig) -> float:
    rtt = result.rtt_s
    if not result.ok:
        rtt = max(rtt, config.failure_penalty * result.timeout_s)
    return _clamp(rtt, config.min_latency_s, config.max_latency_s)


def update_estimate(
    estimate: EndpointEstimate | None,
    result: ProbeResult,
    now: float,
    config: EstimatorConfig,
) -> EndpointEstimate | None:
    """Fold one probe result into ``estimate``; returns the same object if it is dropped.

    A result is dropped when it finished more than ``stale_after_s`` before ``now``, after
    ``now``, or not after the endpoint's last accepted sample. ``config`` is the endpoint's
    own (:meth:`EstimatorConfig.for_interval`).
    """
    at = result.finished_at
    if at > now or now - at > config.stale_after_s:
        return estimate
    if estimate is not None and at <= estimate.last_at:
        return estimate
    latency = _latency_sample(result, config)
    failed = 0.0 if result.ok else 1.0
    load = result.load
    if estimate is None:
        estimate = EndpointEstimate(
            samples=1,
            last_at=at,
            probe_latency_s=latency,
            error_rate=failed,
            consecutive_failures=0 if result.ok else 1,
        )
    else:
        dt = at - estimate.last_at
        probe_latency = _decay(estimate.probe_latency_s, latency, dt, config.latency_half_life_s)
        recovery: tuple[float, float] | None = None
        if result.ok and estimate.recovery is not None:
            # The second answer in a row after being down: restart from the two answers.
            first, first_at = estimate.recovery
            probe_latency = _decay(first, latency, at - first_at, config.latency_half_life_s)
        elif result.ok and estimate.consecutive_failures >= config.down_after_failures:
            recovery = (latency, at)  # the first answer after being down: wait for a second
        estimate = replace(
            estimate,
            samples=estimate.samples + 1,
            last_at=at,
            probe_latency_s=_clamp(probe_latency, config.min_latency_s, config.max_latency_s),
            error_rate=_clamp(
                _decay(estimate.error_rate, failed, dt, config.error_half_life_s), 0.0, 1.0
            ),
            consecutive_failures=0 if result.ok else estimate.consecutive_failures + 1,
            recovery=recovery,
        )
    if not result.ok:
        # A failure says nothing about the server's own load: keep its last report (it ages
        # out by stale_after_s); the penalised probe latency already dominates.
        return estimate
    reported_rif = load.rif if load is not None else None
    reported_latency = load.latency_s if load is not None else None
    # An answer without a metric means the server stopped reporting it: forget the old value.
    rif: float | None = None
    if reported_rif is not None:
        rif = (
            reported_rif
            if estimate.rif is None or estimate.rif_at is None
            else _decay(estimate.rif, reported_rif, at - estimate.rif_at, config.rif_half_life_s)
        )
        rif = max(rif, 0.0)
    rep_latency: float | None = None
    if reported_latency is not None:
        sample = _clamp(reported_latency, config.min_latency_s, config.max_latency_s)
        rep_latency = (
            sample
            if estimate.reported_latency_s is None or estimate.reported_latency_at is None
            else _decay(
                estimate.reported_latency_s,
                sample,
                at - estimate.reported_latency_at,
                config.reported_latency_half_life_s,
            )
        )
        rep_latency = _clamp(rep_latency, config.min_latency_s, config.max_latency_s)
    return replace(
        estimate,
        rif=rif,
        rif_at=at if rif is not None else None,
        reported_latency_s=rep_latency,
        reported_latency_at=at if rep_latency is not None else None,
    )


def estimate_stats(
    estimate: EndpointEstimate | None, now: float, config: EstimatorConfig
) -> EndpointStats | None:
    """The statistics of ``estimate`` at ``now``; ``None`` if there is no data or it is stale.

    ``config`` is the endpoint's own (:meth:`EstimatorConfig.for_interval`)."""
    if estimate is None:
        return None
    age = now - estimate.last_at
    if age > config.stale_after_s:
        return None
    age = max(age, 0.0)

    def fresh(at: float | None) -> bool:
        return at is not None and now - at <= config.stale_after_s

    rif = estimate.rif if fresh(estimate.rif_at) else None
    reported = estimate.reported_latency_s if fresh(estimate.reported_latency_at) else None
    latency = (
        estimate.probe_latency_s if reported is None else max(estimate.probe_latency_s, reported)
    )
    return EndpointStats(
        latency_s=latency,
        probe_latency_s=estimate.probe_latency_s,
        reported_latency_s=reported,
        rif=rif,
        error_rate=estimate.error_rate,
        samples=estimate.samples,
        age_s=age,
        consecutive_failures=estimate.consecutive_failures,
    )


def _expiry(estimate: EndpointEstimate, now: float, stale_after_s: float) -> float | None:
    """When the next of ``estimate``'s statistics still fresh at ``now`` goes stale (its
    sample, its RIF report, its latency report), a little early; None if none is left.

    Early by a relative 1e-9 (and 1 ns), so that rounding in ``now - at > stale`` never makes
    a transition come after the deadline: a deadline that comes before it only costs one more
    look at the key."""
    due: float | None = None
    for at in (estimate.last_at, estimate.rif_at, estimate.reported_latency_at):
        if at is None or now - at > stale_after_s:
            continue
        deadline = at + stale_after_s
        deadline -= 1e-9 * max(1.0, abs(deadline))
        if due is None or deadline < due:
            due = deadline
    return due


class Estimator(Generic[K]):
    """A table of :class:`EndpointEstimate` by key. Holds state, reads no clock.

    Each key's settings follow the probe interval :meth:`track` gave it (``config`` itself
    for a key without one). Not thread-safe; meant to be fed by the prober's sink on the
    event loop.

    :meth:`take_changes` tells one consumer (the weigher's pass) which keys' statistics may
    have changed since it last asked: a sample accepted, or a statistic gone stale (found in
    a heap of deadlines, at most one entry per key), so that a pass reads the statistics of
    the endpoints that moved and not of every endpoint (issue 9, item 6).
    """

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._estimates: dict[K, EndpointEstimate] = {}
        self._intervals: dict[K, float] = {}
        self._configs: dict[float, EstimatorConfig] = {}  # by interval: few distinct values
        self._changed: set[K] = set()
        # Staleness deadlines: (due, tie-breaker, key); _due holds the live entry's time per
        # key (an entry whose time is not the key's _due is dropped when it comes up).
        self._deadlines: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._ties = itertools.count()

    def config_for(self, key: K) -> EstimatorConfig:
        """The settings of ``key``: ``config`` for its probe interval."""
        interval = self._intervals.get(key)
        if interval is None:
            return self.config
        config = self._configs.get(interval)
        if config is None:
            config = self._configs[interval] = self.config.for_interval(interval)
        return config

    def track(self, intervals: Mapping[K, float]) -> None:
        """Keep exactly the keys of ``intervals`` (as :meth:`retain`), each with the probe
        interval (seconds) its staleness and half-lives follow."""
        self.retain(intervals)
        before = self._intervals
        self._intervals = dict(intervals)
        wanted = set(intervals.values())
        self._configs = {i: c for i, c in self._configs.items() if i in wanted}
        for key, estimate in self._estimates.items():
            if before.get(key) != self._intervals.get(key):
                # Another staleness: the key's statistics and deadline may move either way.
                self._changed.add(key)
                self._schedule(key, estimate, estimate.last_at, force=True)

    def observe(self, key: K, result: ProbeResult, now: float) -> bool:
        """Fold ``result`` into ``key``'s estimate; False if the sample was dropped."""
        before = self._estimates.get(key)
        after = update_estimate(before, result, now, self.config_for(key))
        if after is before or after is None:
            return False
        self._estimates[key] = after
        self._changed.add(key)
        if key not in self._due:
            self._schedule(key, after, after.last_at)
        return True

    def take_changes(self, now: float) -> set[K]:
        """The keys whose :meth:`stats` may differ from what they were at the previous call
        (or that have been observed since it): each accepted sample, each statistic that went
        stale by ``now``, and each key whose interval :meth:`track` changed. A superset is
        allowed (reading a key's stats again is harmless), a missed change is not.
        ``now`` must not go backwards between calls."""
        changed, self._changed = self._changed, set()
        heap = self._deadlines
        came_up = []
        while heap and heap[0][0] <= now:
            due, _, key = heapq.heappop(heap)
            if self._due.get(key) != due:
                continue  # superseded, or the key is gone
            del self._due[key]
            came_up.append(key)
        for key in came_up:  # after the loop: a deadline at ``now`` comes up at the next call
            changed.add(key)
            estimate = self._estimates.get(key)
            if estimate is not None:
                self._schedule(key, estimate, now)
        return changed

    def _schedule(
        self, key: K, estimate: EndpointEstimate, now: float, *, force: bool = False
    ) -> None:
        """Put ``key``'s next staleness deadline in the heap (unless it has one, or ``force``)."""
        if key in self._due and not force:
            return
        due = _expiry(estimate, now, self.config_for(key).stale_after_s)
        if due is None:
            self._due.pop(key, None)
            return
        # Not before now: a deadline rounding put in the past comes up at the next call.
        due = max(due, now)
        self._due[key] = due
        heapq.heappush(self._deadlines, (due, next(self._ties), key))

    def stats(self, key: K, now: float) -> EndpointStats | None:
        """``key``'s statistics at ``now``; ``None`` for no data yet or stale data."""
        return estimate_stats(self._estimates.get(key), now, self.config_for(key))

    def snapshot(self, keys: Iterable[K], now: float) -> dict[K, EndpointStats | None]:
        """Statistics of each of ``keys`` (``None`` where there are none) at ``now``."""
        return {key: self.stats(key, now) for key in keys}

    def estimate(self, key: K) -> EndpointEstimate | None:
        return self._estimates.get(key)

    def forget(self, key: K) -> None:
        if self._estimates.pop(key, None) is not None:
            self._changed.add(key)
        self._due.pop(key, None)

    def retain(self, keys: Iterable[K]) -> None:
        """Drop every estimate (and interval) whose key is not in ``keys`` (endpoints that
        went away)."""
        keep = set(keys)
        for key in [k for k in self._estimates if k not in keep]:
            del self._estimates[key]
            self._due.pop(key, None)
            self._changed.add(key)  # its statistics are gone: a change too
        if len(self._deadlines) > 2 * len(self._due) + 64:  # drop the dead entries
            self._deadlines = [d for d in self._deadlines if self._due.get(d[2]) == d[0]]
            heapq.heapify(self._deadlines)
        for key in [k for k in self._intervals if k not in keep]:
            del self._intervals[key]

    def __len__(self) -> int:
        return len(self._estimates)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._estimates))

    def __contains__(self, key: object) -> bool:
        return key in self._estimates

    def as_mapping(self) -> Mapping[K, EndpointEstimate]:
        return dict(self._estimates)
