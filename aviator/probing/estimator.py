"""The estimator: probe results → per-endpoint statistics (pure; time is an argument).

Per endpoint it keeps time-decayed exponentially weighted moving averages (EWMA) of the probe
latency, of the error rate, and of the RIF and latency the server itself reports (ORCA), with
a decay that depends on the time between samples, not on their number (as linkerd's EWMA
does): the same half-life holds at any probe interval.

Invariants:
- No clock reads: every method that needs the time takes ``now``.
- A failed probe is a latency sample, ``max(rtt, failure_penalty * timeout)``: a fast-failing
  endpoint looks slow, never fast ("sinkholing", Prequal §2).
- Samples older than ``stale_after_s`` on arrival, from the future, or not newer than the
  endpoint's last sample are dropped (out of order).
- Every statistic is finite: latencies in ``[min_latency_s, max_latency_s]``, error rate in
  ``[0, 1]``, RIF ≥ 0; "no data yet" and "stale" are ``None``, never NaN.
"""

from __future__ import annotations

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
    ``failure_penalty >= 1`` and ``min_latency_s < max_latency_s``."""

    #: Half-life of the probe-latency and reported-latency averages.
    latency_half_life_s: float = 2.0
    #: Half-life of the RIF average: short, because stale load information hurts (Prequal §5).
    rif_half_life_s: float = 0.5
    #: Half-life of the error-rate average.
    error_half_life_s: float = 10.0
    #: An endpoint with no sample for this long has no statistics (``None``); a sample this old
    #: on arrival is dropped. Keep it above the prober's longest back-off.
    stale_after_s: float = 30.0
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
            "error_half_life_s",
            "stale_after_s",
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
    ``now``, or not after the endpoint's last accepted sample.
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
        estimate = replace(
            estimate,
            samples=estimate.samples + 1,
            last_at=at,
            probe_latency_s=_clamp(
                _decay(estimate.probe_latency_s, latency, dt, config.latency_half_life_s),
                config.min_latency_s,
                config.max_latency_s,
            ),
            error_rate=_clamp(
                _decay(estimate.error_rate, failed, dt, config.error_half_life_s), 0.0, 1.0
            ),
            consecutive_failures=0 if result.ok else estimate.consecutive_failures + 1,
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
                config.latency_half_life_s,
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
    """The statistics of ``estimate`` at ``now``; ``None`` if there is no data or it is stale."""
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


class Estimator(Generic[K]):
    """A table of :class:`EndpointEstimate` by key. Holds state, reads no clock.

    Not thread-safe; meant to be fed by the prober's sink on the event loop.
    """

    def __init__(self, config: EstimatorConfig | None = None) -> None:
        self.config = config or EstimatorConfig()
        self._estimates: dict[K, EndpointEstimate] = {}

    def observe(self, key: K, result: ProbeResult, now: float) -> bool:
        """Fold ``result`` into ``key``'s estimate; False if the sample was dropped."""
        before = self._estimates.get(key)
        after = update_estimate(before, result, now, self.config)
        if after is before or after is None:
            return False
        self._estimates[key] = after
        return True

    def stats(self, key: K, now: float) -> EndpointStats | None:
        """``key``'s statistics at ``now``; ``None`` for no data yet or stale data."""
        return estimate_stats(self._estimates.get(key), now, self.config)

    def snapshot(self, keys: Iterable[K], now: float) -> dict[K, EndpointStats | None]:
        """Statistics of each of ``keys`` (``None`` where there are none) at ``now``."""
        return {key: self.stats(key, now) for key in keys}

    def estimate(self, key: K) -> EndpointEstimate | None:
        return self._estimates.get(key)

    def forget(self, key: K) -> None:
        self._estimates.pop(key, None)

    def retain(self, keys: Iterable[K]) -> None:
        """Drop every estimate whose key is not in ``keys`` (endpoints that went away)."""
        keep = set(keys)
        for key in [k for k in self._estimates if k not in keep]:
            del self._estimates[key]

    def __len__(self) -> int:
        return len(self._estimates)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._estimates))

    def __contains__(self, key: object) -> bool:
        return key in self._estimates

    def as_mapping(self) -> Mapping[K, EndpointEstimate]:
        return dict(self._estimates)
