"""What ``aviator demo`` shows: the live table and the closing summary (pure: no I/O, no clock).

The demo's load generator records one :class:`Completion` per request; the demo samples
Aviator's endpoint view and Envoy's ``/clusters`` once per interval. This module turns those
values into a :class:`Frame` (one redraw of the live table) and, at the end, a
:class:`DemoSummary`. Times are seconds since the load started; every function takes them as
arguments.

Definitions used throughout:

- a pod's *share* of an interval or phase is the requests it answered (it set
  ``x-testbed-backend``, whatever the status) over all requests some pod answered; requests no
  pod answered (Envoy's own 503, timeouts, connection errors) are errors and no pod's share;
- the *latency* of a request runs from its intended send time (open loop: a late send counts
  against the result) to its end;
- a request belongs to the phase (before / during / after the slowdown) of its intended send
  time, but to the live interval in which it ended (the table shows what just happened).
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Completion",
    "DemoPod",
    "DemoSummary",
    "Frame",
    "Phase",
    "PodLive",
    "PodSummary",
    "Slowdown",
    "build_frame",
    "percentile",
    "render_frame",
    "render_summary",
    "summarize",
]

# A slowed pod "lost" its traffic when its share during the slowdown is at most this fraction
# of its share before it.
LEFT_RATIO = 0.5


class Phase(enum.StrEnum):
    BEFORE = "before"
    DURING = "during"
    AFTER = "after"


@dataclass(frozen=True, slots=True)
class Completion:
    """One request of the demo's load. Invariant: ``done_s >= sent_s``."""

    sent_s: float  # intended send time (the Poisson timeline), seconds since the load started
    done_s: float  # when it ended (answer, error or deadline)
    backend: str | None  # the pod that answered, None when no pod did
    error: str | None  # None for a 2xx answer; else "http_503", "timeout", "connect", ...

    def __post_init__(self) -> None:
        if self.done_s < self.sent_s:
            raise ValueError(f"a request cannot end ({self.done_s}) before it is sent")

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s


@dataclass(frozen=True, slots=True)
class Slowdown:
    """``pod`` serves ``factor`` times slower from ``start_s`` to ``end_s`` (0 < start < end)."""

    pod: str
    start_s: float
    end_s: float
    factor: float

    def __post_init__(self) -> None:
        if not 0 < self.start_s < self.end_s:
            raise ValueError(
                f"slowdown needs 0 < start_s < end_s, got {self.start_s}, {self.end_s}"
            )

    def phase_at(self, t_s: float) -> Phase:
        if t_s < self.start_s:
            return Phase.BEFORE
        if t_s < self.end_s:
            return Phase.DURING
        return Phase.AFTER


@dataclass(frozen=True, slots=True)
class DemoPod:
    """A demo backend: its pod name, ``ip:port`` address and mean service time."""

    name: str
    address: str
    service_ms: float


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None when empty."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _latencies(completions: Iterable[Completion]) -> list[float]:
    return [c.latency_s for c in completions]


def _shares(completions: Iterable[Completion]) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter(c.backend for c in completions if c.backend is not None)
    return counts, sum(counts.values())


# -- the live table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodLive:
    """One row of the live table. None: not known (yet)."""

    pod: str
    address: str
    slowed: bool  # in its slow phase now
    latency_ms: float | None  # Aviator's estimate
    rif: float | None  # Aviator's estimate
    weight: int | None  # Aviator's weight
    health: str | None  # Aviator's health
    hot: bool
    envoy_weight: int | None  # the weight Envoy holds
    envoy_active: int | None  # requests Envoy has outstanding to this host now
    requests: int  # answered by this pod in the interval
    share: float | None  # requests / requests answered by any pod in the interval
    p99_ms: float | None  # clients' p99 latency of this pod's requests in the interval

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "address": self.address,
            "slowed": self.slowed,
            "latency_ms": self.latency_ms,
            "rif": self.rif,
            "weight": self.weight,
            "health": self.health,
            "hot": self.hot,
            "envoy_weight": self.envoy_weight,
            "envoy_active": self.envoy_active,
            "requests": self.requests,
            "share": self.share,
            "p99_ms": self.p99_ms,
        }


@dataclass(frozen=True, slots=True)
class Frame:
    """One redraw: the interval ``(t_s - interval_s, t_s]`` and the state sampled at ``t_s``."""

    t_s: float
    duration_s: float
    interval_s: float
    phase: Phase
    slowdown: Slowdown
    rate: float
    ended: int  # requests that ended in the interval
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    pods: tuple[PodLive, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "t_s": round(self.t_s, 3),
            "phase": self.phase.value,
            "ended": self.ended,
            "errors": self.errors,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "pods": [p.to_json() for p in self.pods],
        }


def build_frame(
    *,
    t_s: float,
    duration_s: float,
    interval_s: float,
    rate: float,
    slowdown: Slowdown,
    pods: Sequence[DemoPod],
    ended: Sequence[Completion],
    aviator: Sequence[Mapping[str, Any]],
    envoy: Mapping[str, Mapping[str, Any]],
) -> Frame:
    """A frame from the requests that ``ended`` in the interval, Aviator's endpoint view rows
    (``/debug/endpoints``: keyed by ``address``) and Envoy's hosts by address (``weight``,
    ``rq_active``). Pods missing from either view get None in its columns.
    """
    counts, answered = _shares(ended)
    by_pod: dict[str, list[float]] = {}
    for c in ended:
        if c.backend is not None:
            by_pod.setdefault(c.backend, []).append(c.latency_s)
    aviator_by_address = {str(row.get("address")): row for row in aviator}
    latencies = [c.latency_s for c in ended]
    phase = slowdown.phase_at(t_s)
    rows = []
    for pod in pods:
        a = aviator_by_address.get(pod.address, {})
        e = envoy.get(pod.address, {})
        n = counts.get(pod.name, 0)
        rows.append(
            PodLive(
                pod=pod.name,
                address=pod.address,
                slowed=pod.name == slowdown.pod and phase is Phase.DURING,
                latency_ms=a.get("latency_ms"),
                rif=a.get("rif"),
                weight=a.get("weight"),
                health=a.get("health"),
                hot=bool(a.get("hot", False)),
                envoy_weight=e.get("weight"),
                envoy_active=e.get("rq_active"),
                requests=n,
                share=n / answered if answered else None,
                p99_ms=_ms(percentile(by_pod.get(pod.name, []), 99)),
            )
        )
    return Frame(
        t_s=t_s,
        duration_s=duration_s,
        interval_s=interval_s,
        phase=phase,
        slowdown=slowdown,
        rate=rate,
        ended=len(ended),
        errors=sum(1 for c in ended if c.error is not None),
        p50_ms=_ms(percentile(latencies, 50)),
        p99_ms=_ms(percentile(latencies, 99)),
        pods=tuple(rows),
    )


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _phase_text(frame: Frame) -> str:
    s = frame.slowdown
    if frame.phase is Phase.BEFORE:
        return f"before the slowdown ({s.pod} slows {s.factor:g}x at t={s.start_s:.0f}s)"
    if frame.phase is Phase.DURING:
        return f"SLOWDOWN: {s.pod} serves {s.factor:g}x slower until t={s.end_s:.0f}s"
    return f"after the slowdown ({s.pod} back to normal since t={s.end_s:.0f}s)"


_HEADER = (
    f"{'pod':<10} {'address':<16} {'latency':>9} {'RIF':>5} {'weight':>6} "
    f"{'envoy':>6} {'active':>6} {'share':>6} {'p99':>9}  state"
)


def render_frame(frame: Frame) -> str:
    """The live table as text lines (no ANSI codes; the caller clears the screen)."""
    lines = [
        f"t={frame.t_s:5.1f}s of {frame.duration_s:.0f}s   {_phase_text(frame)}",
        f"last {frame.interval_s:g}s: {frame.ended} requests ended, {frame.errors} errors, "
        f"client p50 {_num(frame.p50_ms, '.1f')} ms, p99 {_num(frame.p99_ms, '.1f')} ms "
        f"(offered {frame.rate:g}/s)",
        "latency, RIF, weight: Aviator's estimates; envoy: the weight Envoy holds; "
        "share and p99: what clients saw",
        _HEADER,
    ]
    for p in frame.pods:
        state = [p.health or "-"]
        if p.hot:
            state.append("hot")
        if p.slowed:
            state.append("<- slowed")
        latency = _num(p.latency_ms, ".1f")
        p99 = _num(p.p99_ms, ".1f")
        lines.append(
            f"{p.pod:<10} {p.address:<16} {latency + ' ms':>9} {_num(p.rif, '.1f'):>5} "
            f"{_num(p.weight, 'd'):>6} {_num(p.envoy_weight, 'd'):>6} "
            f"{_num(p.envoy_active, 'd'):>6} {_pct(p.share):>6} {p99 + ' ms':>9}  "
            + " ".join(state)
        )
    return "\n".join(lines)


# -- the summary -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodSummary:
    """A pod's share of the answered requests in each phase (None: nothing answered then)."""

    pod: str
    address: str
    requests: int
    share: Mapping[Phase, float | None]
    p99_ms: Mapping[Phase, float | None]

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "address": self.address,
            "requests": self.requests,
            "share": {k.value: v for k, v in self.share.items()},
            "p99_ms": {k.value: v for k, v in self.p99_ms.items()},
        }


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the run showed.

    ``traffic_left`` is True when the slowed pod's share during the slowdown is at most
    ``LEFT_RATIO`` of its share before it. ``reaction_s`` is the end of the first one-second
    bucket after the slowdown began (by send time) in which that held, None if none did.
    ``slowed_share_by_second`` holds the slowed pod's share per second of send time.
    """

    duration_s: float  # planned
    ran_s: float  # load actually offered (shorter when interrupted)
    rate: float
    interrupted: bool
    slowdown: Slowdown
    requests: int
    ok: int
    errors: Mapping[str, int]
    p50_ms: float | None
    p99_ms: float | None
    phase_p50_ms: Mapping[Phase, float | None]
    phase_p99_ms: Mapping[Phase, float | None]
    pods: tuple[PodSummary, ...]
    slowed_share_by_second: tuple[float | None, ...]
    traffic_left: bool
    reaction_s: float | None
    verdict: str

    def to_json(self) -> dict[str, Any]:
        s = self.slowdown
        return {
            "duration_s": self.duration_s,
            "ran_s": round(self.ran_s, 3),
            "rate": self.rate,
            "interrupted": self.interrupted,
            "slowdown": {"pod": s.pod, "start_s": s.start_s, "end_s": s.end_s, "factor": s.factor},
            "requests": self.requests,
            "ok": self.ok,
            "errors": dict(self.errors),
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "phase_p50_ms": {k.value: v for k, v in self.phase_p50_ms.items()},
            "phase_p99_ms": {k.value: v for k, v in self.phase_p99_ms.items()},
            "pods": [p.to_json() for p in self.pods],
            "slowed_share_by_second": list(self.slowed_share_by_second),
            "traffic_left": self.traffic_left,
            "reaction_s": self.reaction_s,
            "verdict": self.verdict,
        }


def summarize(
    completions: Sequence[Completion],
    *,
    pods: Sequence[DemoPod],
    slowdown: Slowdown,
    duration_s: float,
    ran_s: float,
    rate: float,
    interrupted: bool = False,
) -> DemoSummary:
    """The closing summary of a run (total: defined for no requests at all)."""
    by_phase: dict[Phase, list[Completion]] = {p: [] for p in Phase}
    for c in completions:
        by_phase[slowdown.phase_at(c.sent_s)].append(c)
    phase_counts = {p: _shares(cs) for p, cs in by_phase.items()}
    total_counts, _ = _shares(completions)
    pod_rows = []
    for pod in pods:
        share: dict[Phase, float | None] = {}
        p99: dict[Phase, float | None] = {}
        for p in Phase:
            counts, answered = phase_counts[p]
            share[p] = counts.get(pod.name, 0) / answered if answered else None
            mine = [c.latency_s for c in by_phase[p] if c.backend == pod.name]
            p99[p] = _ms(percentile(mine, 99))
        pod_rows.append(
            PodSummary(pod.name, pod.address, total_counts.get(pod.name, 0), share, p99)
        )
    slowed = next((r for r in pod_rows if r.pod == slowdown.pod), None)
    by_second = _share_by_second(completions, slowdown.pod, ran_s)
    before = slowed.share[Phase.BEFORE] if slowed is not None else None
    during = slowed.share[Phase.DURING] if slowed is not None else None
    after = slowed.share[Phase.AFTER] if slowed is not None else None
    left = before is not None and during is not None and during <= LEFT_RATIO * before
    reaction = _reaction_s(completions, slowdown, before) if left else None
    errors = Counter(c.error for c in completions if c.error is not None)
    latencies = [c.latency_s for c in completions]
    return DemoSummary(
        duration_s=duration_s,
        ran_s=ran_s,
        rate=rate,
        interrupted=interrupted,
        slowdown=slowdown,
        requests=len(completions),
        ok=sum(1 for c in completions if c.error is None),
        errors=dict(sorted(errors.items())),
        p50_ms=_ms(percentile(latencies, 50)),
        p99_ms=_ms(percentile(latencies, 99)),
        phase_p50_ms={p: _ms(percentile(_latencies(cs), 50)) for p, cs in by_phase.items()},
        phase_p99_ms={p: _ms(percentile(_latencies(cs), 99)) for p, cs in by_phase.items()},
        pods=tuple(pod_rows),
        slowed_share_by_second=by_second,
        traffic_left=left,
        reaction_s=reaction,
        verdict=_verdict(slowdown.pod, before, during, after, left, reaction),
    )


def _share_by_second(
    completions: Sequence[Completion], pod: str, ran_s: float
) -> tuple[float | None, ...]:
    seconds = max(math.ceil(ran_s), 0)
    mine = [0] * seconds
    answered = [0] * seconds
    for c in completions:
        t = int(c.sent_s)
        if c.backend is None or not 0 <= t < seconds:
            continue
        answered[t] += 1
        mine[t] += c.backend == pod
    return tuple(round(m / a, 4) if a else None for m, a in zip(mine, answered, strict=True))


def _reaction_s(
    completions: Sequence[Completion], slowdown: Slowdown, before: float | None
) -> float | None:
    """End of the first one-second bucket from the slowdown's start in which the slowed pod's
    share was at most LEFT_RATIO of ``before``."""
    if before is None:
        return None
    buckets = math.ceil(slowdown.end_s - slowdown.start_s)
    mine = [0] * buckets
    answered = [0] * buckets
    for c in completions:
        k = math.floor(c.sent_s - slowdown.start_s)
        if c.backend is None or not 0 <= k < buckets:
            continue
        answered[k] += 1
        mine[k] += c.backend == slowdown.pod
    for k in range(buckets):
        if answered[k] and mine[k] / answered[k] <= LEFT_RATIO * before:
            return float(k + 1)
    return None


def _verdict(
    pod: str,
    before: float | None,
    during: float | None,
    after: float | None,
    left: bool,
    reaction: float | None,
) -> str:
    if before is None or during is None:
        return f"not enough traffic to judge: {pod} answered nothing before or during its slowdown"
    text = f"{_pct(before)} → {_pct(during)}"
    if left:
        verdict = f"traffic left the slowed backend {pod}: {text}"
        if reaction is not None:
            verdict += f" (within {reaction:g} s)"
    else:
        verdict = f"traffic did NOT leave the slowed backend {pod}: {text}"
    if after is not None:
        verdict += f", {_pct(after)} after the slowdown"
    return verdict


def render_summary(summary: DemoSummary) -> str:
    """The closing summary as text lines."""
    s = summary.slowdown
    head = "summary" + (" (interrupted)" if summary.interrupted else "")
    lines = [
        f"{head}: {summary.requests} requests in {summary.ran_s:.0f}s at {summary.rate:g}/s, "
        f"{summary.ok} ok, errors: "
        + (", ".join(f"{k} {v}" for k, v in summary.errors.items()) or "none"),
        f"client latency: p50 {_num(summary.p50_ms, '.1f')} ms, "
        f"p99 {_num(summary.p99_ms, '.1f')} ms  "
        + "  ".join(
            f"[{p.value}: p50 {_num(summary.phase_p50_ms[p], '.1f')}, "
            f"p99 {_num(summary.phase_p99_ms[p], '.1f')}]"
            for p in Phase
        ),
        f"{s.pod} was {s.factor:g}x slower from t={s.start_s:g}s to t={s.end_s:g}s. "
        "Share of traffic (and clients' p99) per pod:",
        f"{'pod':<10} {'address':<16} {'before':>16} {'during':>16} {'after':>16}",
    ]
    for p in summary.pods:
        cells = [f"{_pct(p.share[ph])} ({_num(p.p99_ms[ph], '.0f')} ms)" for ph in Phase]
        lines.append(f"{p.pod:<10} {p.address:<16} " + " ".join(f"{c:>16}" for c in cells))
    lines.append(summary.verdict)
    return "\n".join(lines)
