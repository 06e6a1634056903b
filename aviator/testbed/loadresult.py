"""What one load run measured: HDR histograms, per-second buckets and :class:`LoadResult`.

:class:`Recorder` takes each request's send and end (as :mod:`aviator.testbed.openloop` reports
them) and builds the :class:`LoadResult`; the result round-trips through JSON, so a run in its
own process (:mod:`aviator.testbed.loadgen`) hands it back whole. Pure: times are arguments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from aviator.testbed.loadspec import LoadSpec

# Latencies are recorded in microseconds from 1 µs to one hour (values above are clamped).
_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000
_SIG_FIGS = 3
_SECOND_SIG_FIGS = 2  # per-second histograms: 1% precision is plenty, and they stay small
# Keeping-up thresholds: an open-loop generator that sends late is measuring itself.
KEEPING_UP_RATE_RATIO = 0.97
KEEPING_UP_LAG_P99_MS = 20.0
# Responses without the backend header (Envoy's own 503, timeouts, connection errors).
NO_BACKEND = "-"


def new_histogram(sig_figs: int = _SIG_FIGS) -> HdrHistogram:
    """A latency histogram in microseconds, 1 µs to 1 h."""
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, sig_figs)


def _record(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(max(round(seconds * 1e6), 0), _HIGHEST_US))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a histogram, in milliseconds (all 0 when ``count`` is 0)."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, hist: HdrHistogram) -> LatencySummary:
        count = int(hist.get_total_count())
        if count == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

        def ms(percentile: float) -> float:
            return float(hist.get_value_at_percentile(percentile)) / 1000.0

        return cls(
            count=count,
            mean_ms=float(hist.get_mean_value()) / 1000.0,
            p50_ms=ms(50),
            p90_ms=ms(90),
            p99_ms=ms(99),
            p999_ms=ms(99.9),
            max_ms=float(hist.get_max_value()) / 1000.0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "p999_ms": self.p999_ms,
            "max_ms": self.max_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencySummary:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class SecondBucket:
    """Measured requests whose intended send time falls in second ``t`` of the run.

    Invariant: ``sum(by_backend.values()) == sent == ok + errors``.
    """

    t: int
    sent: int
    ok: int
    errors: int
    by_backend: Mapping[str, int]
    p50_ms: float
    p99_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "by_backend": dict(self.by_backend),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SecondBucket:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one run measured. Counts exclude warm-up except ``scheduled`` and ``warmup``.

    Invariants: ``scheduled == warmup + measured`` for a run that finished;
    ``measured == ok + sum(errors.values()) == latency_all.count``;
    ``sum(by_backend.values()) == measured``.
    ``offered_rate`` is the measured arrivals over the measured window; ``achieved_rate`` the
    same requests over the time the generator actually took to send them.
    """

    spec: LoadSpec
    scheduled: int
    warmup: int
    measured: int
    ok: int
    errors: Mapping[str, int]
    offered_rate: float
    achieved_rate: float
    throughput: float  # successful responses per second of the measured window
    send_lag: LatencySummary  # actual minus intended send time
    latency_all: LatencySummary  # every measured request, errors and timeouts included
    latency_ok: LatencySummary  # 2xx responses only
    by_backend: Mapping[str, int]
    latency_ok_by_backend: Mapping[str, LatencySummary]
    per_second: tuple[SecondBucket, ...]
    max_outstanding: int
    histogram_all: str = field(repr=False)  # HdrHistogram.encode(), for merging across runs
    histogram_ok: str = field(repr=False)
    #: Which generator sent the load: ``python`` (:mod:`aviator.testbed.openloop`) or ``k6``.
    generator: str = "python"
    #: Planned requests the generator never sent (k6's ``dropped_iterations``: no VU was free
    #: at the intended time); None for a generator that cannot drop (it sends late instead).
    dropped: int | None = None

    @property
    def keeping_up(self) -> bool:
        """Did the generator send on time? (nothing dropped, achieved ≥ 97% of offered,
        p99 send lag ≤ 20 ms)."""
        rate_ok = self.offered_rate == 0 or (
            self.achieved_rate >= KEEPING_UP_RATE_RATIO * self.offered_rate
        )
        dropped_ok = not self.dropped
        return dropped_ok and rate_ok and self.send_lag.p99_ms <= KEEPING_UP_LAG_P99_MS

    @property
    def error_rate(self) -> float:
        return 0.0 if self.measured == 0 else sum(self.errors.values()) / self.measured

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "scheduled": self.scheduled,
            "warmup": self.warmup,
            "measured": self.measured,
            "ok": self.ok,
            "errors": dict(self.errors),
            "offered_rate": self.offered_rate,
            "achieved_rate": self.achieved_rate,
            "throughput": self.throughput,
            "keeping_up": self.keeping_up,
            "send_lag": self.send_lag.to_json(),
            "latency_all": self.latency_all.to_json(),
            "latency_ok": self.latency_ok.to_json(),
            "by_backend": dict(self.by_backend),
            "latency_ok_by_backend": {
                k: v.to_json() for k, v in self.latency_ok_by_backend.items()
            },
            "per_second": [b.to_json() for b in self.per_second],
            "max_outstanding": self.max_outstanding,
            "histogram_all": self.histogram_all,
            "histogram_ok": self.histogram_ok,
            "generator": self.generator,
            "dropped": self.dropped,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadResult:
        return cls(
            spec=LoadSpec.from_json(data["spec"]),
            scheduled=data["scheduled"],
            warmup=data["warmup"],
            measured=data["measured"],
            ok=data["ok"],
            errors=dict(data["errors"]),
            offered_rate=data["offered_rate"],
            achieved_rate=data["achieved_rate"],
            throughput=data["throughput"],
            send_lag=LatencySummary.from_json(data["send_lag"]),
            latency_all=LatencySummary.from_json(data["latency_all"]),
            latency_ok=LatencySummary.from_json(data["latency_ok"]),
            by_backend=dict(data["by_backend"]),
            latency_ok_by_backend={
                k: LatencySummary.from_json(v) for k, v in data["latency_ok_by_backend"].items()
            },
            per_second=tuple(SecondBucket.from_json(b) for b in data["per_second"]),
            max_outstanding=data["max_outstanding"],
            histogram_all=data["histogram_all"],
            histogram_ok=data["histogram_ok"],
            generator=data.get("generator", "python"),
            dropped=data.get("dropped"),
        )

    def decode_histogram(self, which: str = "all") -> HdrHistogram:
        """The full latency histogram (µs), e.g. to merge repeats with ``HdrHistogram.add``."""
        encoded = self.histogram_all if which == "all" else self.histogram_ok
        return HdrHistogram.decode(encoded.encode("ascii"))


class Recorder:
    """Accumulates one run's measurements (single-threaded: only the loop's tasks touch it)."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.all = new_histogram()
        self.ok_hist = new_histogram()
        self.lag = new_histogram()
        self.ok_by_backend: dict[str, HdrHistogram] = {}
        self.seconds: dict[int, tuple[Counter[str], HdrHistogram]] = {}
        self.errors: Counter[str] = Counter()
        self.by_backend: Counter[str] = Counter()
        self.ok = 0
        self.measured = 0
        self.warmup = 0
        self.sent = 0
        self.first_measured_send: float | None = None
        self.last_measured_send: float | None = None

    def on_sent(self, offset: float, lag: float, actual: float) -> None:
        self.sent += 1
        if offset < self.spec.warmup_s:
            return
        _record(self.lag, max(lag, 0.0))
        if self.first_measured_send is None:
            self.first_measured_send = actual
        self.last_measured_send = actual

    def on_done(
        self, offset: float, latency: float, error: str | None, backend: str | None
    ) -> None:
        if offset < self.spec.warmup_s:
            self.warmup += 1
            return
        self.measured += 1
        who = backend or NO_BACKEND
        self.by_backend[who] += 1
        _record(self.all, latency)
        second = int(offset)
        counts, hist = self.seconds.get(second) or (Counter(), new_histogram(_SECOND_SIG_FIGS))
        self.seconds[second] = (counts, hist)
        counts["@sent"] += 1
        counts[who] += 1
        _record(hist, latency)
        if error is None:
            self.ok += 1
            counts["@ok"] += 1
            _record(self.ok_hist, latency)
            if who not in self.ok_by_backend:
                self.ok_by_backend[who] = new_histogram()
            _record(self.ok_by_backend[who], latency)
        else:
            self.errors[error] += 1
            counts["@errors"] += 1

    def result(
        self,
        scheduled: int,
        window_start: float,
        max_outstanding: int,
        *,
        generator: str = "python",
        dropped: int | None = None,
        planned_measured: int | None = None,
    ) -> LoadResult:
        """``planned_measured``: the arrivals the plan had in the measured window (default:
        those measured, right for a generator that sends every one, late or not); a generator
        that drops requests (``dropped``) offered the plan, not what it sent."""
        spec = self.spec
        window = spec.duration_s - spec.warmup_s
        measured_scheduled = self.measured  # every measured arrival was sent and completed
        offered = (planned_measured if planned_measured is not None else self.measured) / window
        if self.last_measured_send is None or measured_scheduled == 0:
            achieved = 0.0
        else:
            # The generator "took" from the window start until it sent the last request plus
            # the expected gap after it; on time, that is the window itself.
            took = max(self.last_measured_send - window_start, 0.0) + window / measured_scheduled
            achieved = measured_scheduled / max(took, window)
        per_second = []
        for t in sorted(self.seconds):
            counts, hist = self.seconds[t]
            by_backend = {k: v for k, v in counts.items() if not k.startswith("@")}
            per_second.append(
                SecondBucket(
                    t=t,
                    sent=counts["@sent"],
                    ok=counts["@ok"],
                    errors=counts["@errors"],
                    by_backend=by_backend,
                    p50_ms=float(hist.get_value_at_percentile(50)) / 1000.0,
                    p99_ms=float(hist.get_value_at_percentile(99)) / 1000.0,
                )
            )
        return LoadResult(
            spec=spec,
            scheduled=scheduled,
            warmup=self.warmup,
            measured=self.measured,
            ok=self.ok,
            errors=dict(sorted(self.errors.items())),
            offered_rate=offered,
            achieved_rate=achieved,
            throughput=self.ok / window,
            send_lag=LatencySummary.of(self.lag),
            latency_all=LatencySummary.of(self.all),
            latency_ok=LatencySummary.of(self.ok_hist),
            by_backend=dict(sorted(self.by_backend.items())),
            latency_ok_by_backend={
                k: LatencySummary.of(h) for k, h in sorted(self.ok_by_backend.items())
            },
            per_second=tuple(per_second),
            max_outstanding=max_outstanding,
            histogram_all=self.all.encode().decode("ascii"),
            histogram_ok=self.ok_hist.encode().decode("ascii"),
            generator=generator,
            dropped=dropped,
        )
