"""Count requests in flight, keep recent latencies by RIF, and report them as ORCA.

:class:`LoadTracker` is what the middlewares (:mod:`aviator_agent.asgi`,
:mod:`aviator_agent.aiohttp`) share: ``begin``/``end`` (or ``with tracker.track():``) around
each request, and ``header_value()`` / ``probe_body()`` for the answer. Use it directly in a
server the middlewares do not cover.

RIF, as Prequal defines it, counts a request from the moment the application receives it
until it hands back the response; the counter is decremented in ``finally`` blocks, so an
error or a cancellation never leaks a count. The tracker is meant for one event loop and is
not thread-safe.

The latency it reports is the larger of two estimates. Prequal's: the median of recent
latencies of requests that arrived at the current RIF. And the requests in flight's own
(:meth:`LoadTracker.in_flight_latency_s`): Little's law, RIF over the completions of the last
half second, at most the age of the oldest request in flight. The median sees a slowdown
only once slow requests complete, and keeps the fast samples from before for seconds; the
flow drops at once. In the latency benchmark (a backend 10x slower), the control plane's
estimate crossed (above latencyThreshold, or hot) a median 301-433 ms after the slowdown with
the median alone, and 187-271 ms with both.
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final

from aviator_agent.orca import LATENCY_MS_METRIC, RIF_METRIC, OrcaLoadReport, format_orca_text

__all__ = ["DEFAULT_PROBE_PATH", "LoadTracker", "RequestTicket"]

#: Where the middlewares answer Aviator's probes; an AviatorPolicy's ``probe.path`` default.
DEFAULT_PROBE_PATH: Final = "/aviator/probe"

_EXACT_BUCKETS = 32  # RIF 0..31 each get their own latency bucket
_LOG_BUCKETS = 16  # then quarter-octaves: 32..~430, the last one open-ended


def _bucket(rif: int) -> int:
    if rif < _EXACT_BUCKETS:
        return max(rif, 0)
    step = int(4 * math.log2(rif / _EXACT_BUCKETS))
    return _EXACT_BUCKETS + min(step, _LOG_BUCKETS - 1)


class RequestTicket:
    """One request being tracked. ``error`` may be set before it ends (e.g. from a 5xx status)."""

    __slots__ = ("_done", "error", "rif_at_arrival", "started_at")

    def __init__(self, started_at: float, rif_at_arrival: int) -> None:
        self.started_at = started_at
        self.rif_at_arrival = rif_at_arrival
        self.error: bool | None = None
        self._done = False

    @property
    def done(self) -> bool:
        return self._done


class LoadTracker:
    """Requests in flight, recent latencies by RIF at arrival, completion and error rates.

    Memory is bounded: ``samples_per_bucket`` latencies for each of 48 RIF buckets and one
    counter pair per second of ``rate_window_s``.

    Invariants: ``rif`` equals the number of tickets begun and not yet ended (ending twice is
    a no-op); every reported number is finite and ≥ 0.
    """

    def __init__(
        self,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        samples_per_bucket: int = 32,
        min_samples: int = 8,
        # Prequal wants *recent* latencies: a minute-old fast sample at RIF 0 hid a 10x
        # slowdown for ~9 s in the demo. 5 s keeps enough samples at modest traffic.
        max_sample_age_s: float = 5.0,
        rate_window_s: float = 10.0,
        flow_window_s: float = 0.5,
    ) -> None:
        if capacity is not None and not (math.isfinite(capacity) and capacity > 0):
            raise ValueError(f"capacity must be a finite number > 0, got {capacity!r}")
        if samples_per_bucket < 1 or min_samples < 1:
            raise ValueError("samples_per_bucket and min_samples must be >= 1")
        if not (max_sample_age_s > 0 and rate_window_s >= 1):
            raise ValueError("max_sample_age_s must be > 0 and rate_window_s >= 1")
        if not (math.isfinite(flow_window_s) and flow_window_s > 0):
            raise ValueError(f"flow_window_s must be a finite number > 0, got {flow_window_s!r}")
        self.capacity = capacity
        self._clock = clock
        self._min_samples = min_samples
        self._max_age = max_sample_age_s
        self._rif = 0
        self._flow_window = flow_window_s
        # When each of the last flow_window_s's successful requests completed (in order).
        self._completions: deque[float] = deque()
        # Tickets in arrival order; the first one is in flight (ended ones leave from the
        # left). Those ended behind a long request wait, until there are too many of them.
        self._arrivals: deque[RequestTicket] = deque()
        self._latencies: list[deque[tuple[float, float]]] = [
            deque(maxlen=samples_per_bucket) for _ in range(_EXACT_BUCKETS + _LOG_BUCKETS)
        ]
        self._window = math.ceil(rate_window_s)
        # Ring of per-second [second, completions, errors].
        self._ring: list[list[int]] = [[-1, 0, 0] for _ in range(self._window + 1)]
        self._born = clock()

    @property
    def rif(self) -> int:
        """Requests in flight right now."""
        return self._rif

    def begin(self) -> RequestTicket:
        ticket = RequestTicket(self._clock(), self._rif)
        self._rif += 1
        self._arrivals.append(ticket)
        return ticket

    def end(self, ticket: RequestTicket, *, completed: bool = True) -> None:
        """End ``ticket`` (idempotent). A completed request without error adds a latency sample;
        ``completed=False`` (cancelled: the client went away) adds nothing but the decrement."""
        if ticket._done:
            return
        ticket._done = True
        self._rif -= 1
        arrivals = self._arrivals
        while arrivals and arrivals[0]._done:
            arrivals.popleft()
        if len(arrivals) > 2 * self._rif + 64:  # amortised O(1): the next is rif + 64 ends away
            self._arrivals = deque(t for t in arrivals if not t._done)
        if not completed:
            return
        now = self._clock()
        second = math.floor(now)
        slot = self._ring[second % len(self._ring)]
        if slot[0] != second:
            slot[0], slot[1], slot[2] = second, 0, 0
        slot[1] += 1
        if ticket.error:
            slot[2] += 1
            # Fast failures must not look like fast service: errors add no latency sample.
            return
        latency = max(now - ticket.started_at, 0.0)
        self._latencies[_bucket(ticket.rif_at_arrival)].append((now, latency))
        self._completions.append(now)
        self._forget_completions(now)

    def _forget_completions(self, now: float) -> None:
        completions, oldest = self._completions, now - self._flow_window
        while completions and completions[0] < oldest:
            completions.popleft()

    @contextmanager
    def track(self) -> Iterator[RequestTicket]:
        """Count the enclosed block as one request in flight.

        An exception marks the request as an error unless ``ticket.error`` was set already
        (an ``HTTPNotFound`` is not the server's fault); a cancellation only decrements.
        """
        ticket = self.begin()
        try:
            yield ticket
        except Exception:
            if ticket.error is None:
                ticket.error = True
            self.end(ticket)
            raise
        except BaseException:
            self.end(ticket, completed=False)
            raise
        else:
            self.end(ticket)

    def latency_estimate_s(self, rif: int | None = None) -> float | None:
        """Median of recent latencies of requests that arrived at (or nearest to) ``rif``
        (default: the current RIF), or ``None`` with no recent samples at all."""
        target = _bucket(self._rif if rif is None else rif)
        oldest = self._clock() - self._max_age
        picked: list[float] = []
        n = len(self._latencies)
        # Widen around the target bucket until enough samples: Prequal's "at or near that RIF".
        for distance in range(n):
            for index in {target - distance, target + distance}:
                if 0 <= index < n:
                    for at, latency in self._latencies[index]:
                        if at >= oldest:
                            bisect.insort(picked, latency)
            if len(picked) >= self._min_samples:
                break
        if not picked:
            return None
        mid = len(picked) // 2
        return picked[mid] if len(picked) % 2 else (picked[mid - 1] + picked[mid]) / 2

    def in_flight_latency_s(self) -> float | None:
        """How long requests take now, from the requests in flight alone (``None`` with none in
        flight): RIF / the successful completions per second of the last ``flow_window_s``
        (Little's law), but at most the age of the oldest request in flight. With little
        traffic nothing may have completed lately, and that says nothing of the server's speed.
        """
        if not self._rif:
            return None
        now = self._clock()
        self._forget_completions(now)
        oldest = max(now - self._arrivals[0].started_at, 0.0)
        span = min(self._flow_window, max(now - self._born, 1e-3))
        done = len(self._completions)
        return min(self._rif * span / done, oldest) if done else oldest

    def _rates(self) -> tuple[float, float]:
        now = self._clock()
        second = math.floor(now)
        first = second - self._window + 1
        done = errors = 0
        for slot_second, count, failed in self._ring:
            if first <= slot_second <= second:
                done += count
                errors += failed
        span = min(now - first, now - self._born)
        span = max(span, 1.0)  # a burst in the first instant is not an infinite rate
        return done / span, errors / span

    def requests_per_second(self) -> float:
        return self._rates()[0]

    def report(self) -> OrcaLoadReport:
        """The current load as an ORCA report (what the header carries)."""
        rps, eps = self._rates()
        named = {RIF_METRIC: float(self._rif)}
        latency = self.latency_estimate_s()
        in_flight = self.in_flight_latency_s()
        if in_flight is not None:
            latency = in_flight if latency is None else max(latency, in_flight)
        if latency is not None:
            named[LATENCY_MS_METRIC] = latency * 1000.0
        return OrcaLoadReport(
            application_utilization=self._rif / self.capacity if self.capacity else 0.0,
            rps_fractional=rps,
            eps=eps,
            named_metrics=named,
        )

    def header_value(self) -> str:
        return format_orca_text(self.report())

    def probe_body(self) -> bytes:
        report = self.report()
        latency_ms = report.named_metrics.get(LATENCY_MS_METRIC)
        return json.dumps(
            {
                "rif": self._rif,
                "latency_ms": latency_ms,
                "rps": report.rps_fractional,
                "eps": report.eps,
                "capacity": self.capacity,
            },
            separators=(",", ":"),
        ).encode()
