"""How often the operator may write (pure; time is an argument).

:class:`RateLimiter` combines two limits, both needed: a minimum interval *per object* (a
policy whose pods flap cannot write its status more than once per interval; a pod's
annotations at most once per 30 s) and a token bucket *for the whole writer* (a thousand
policies changing at once, after a leader change or an API server restart, reach the API
server at ``rate`` writes per second after a ``burst``). Neither is per probe: writers are
fed desired states, never probe results.

Pure: no clock; callers pass ``now`` (seconds on any monotonic scale).
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Per-key minimum interval plus a global token bucket.

    :meth:`next_allowed` says when a write of ``key`` may go; :meth:`take` records one that
    went. Memory is bounded by the keys written within the last ``per_key`` seconds (older
    entries are dropped as they stop mattering).
    """

    def __init__(self, *, per_key: float, rate: float, burst: int) -> None:
        if per_key < 0:
            raise ValueError(f"per_key must be >= 0, got {per_key!r}")
        if not rate > 0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst!r}")
        self.per_key = per_key
        self.rate = rate
        self.burst = burst
        self._last: dict[Hashable, float] = {}
        self._tokens = float(burst)
        self._tokens_at: float | None = None

    def _refill(self, now: float) -> None:
        if self._tokens_at is None:
            self._tokens_at = now
            return
        elapsed = max(0.0, now - self._tokens_at)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._tokens_at = max(self._tokens_at, now)

    def next_allowed(self, key: Hashable, now: float) -> float:
        """The earliest time (≥ ``now``) a write of ``key`` may go."""
        self._refill(now)
        at = now
        last = self._last.get(key)
        if last is not None:
            at = max(at, last + self.per_key)
        if self._tokens < 1.0:
            at = max(at, now + (1.0 - self._tokens) / self.rate)
        return at

    def take(self, key: Hashable, now: float) -> None:
        """Record a write of ``key`` at ``now`` (whether or not it was allowed)."""
        self._refill(now)
        self._tokens -= 1.0
        self._last[key] = now
        if len(self._last) > 64:
            horizon = now - self.per_key
            for k in [k for k, t in self._last.items() if t <= horizon]:
                del self._last[k]
