"""Debounced publishing: bursts of snapshots become one publish.

Producers call :meth:`Publisher.submit` as often as they like (the latest snapshot wins); the
:meth:`Publisher.run` task publishes once the submissions have been quiet for ``quiet`` seconds,
and never later than ``max_delay`` seconds after the first unpublished submission, so a steady
trickle cannot postpone a push forever. Time is the event loop's clock (fake in tests).

A snapshot that fails its consistency check is logged and dropped: the cache keeps serving the
previous one.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from aviator.xds.cache import Cache
from aviator.xds.snapshot import Snapshot, SnapshotError

log = structlog.get_logger(__name__)

# Deadlines closer than this count as reached: a timer shorter than the clock's resolution
# may fire without the clock moving, and the loop would spin.
_RESOLUTION = 1e-3


class Publisher:
    def __init__(self, cache: Cache, *, quiet: float = 0.1, max_delay: float = 1.0) -> None:
        if not 0 <= quiet <= max_delay:
            raise ValueError(
                f"need 0 <= quiet <= max_delay, got quiet={quiet} max_delay={max_delay}"
            )
        self._cache = cache
        self._quiet = quiet
        self._max_delay = max_delay
        self._pending: Snapshot | None = None
        self._first_at = 0.0
        self._last_at = 0.0
        self._event = asyncio.Event()
        self.published = 0  # publishes attempted (consistent or not)
        self.rejected = 0  # snapshots dropped by their consistency check

    def submit(self, snapshot: Snapshot) -> None:
        """Queue ``snapshot`` for publishing, replacing any not yet published."""
        now = asyncio.get_running_loop().time()
        if self._pending is None:
            self._first_at = now
        self._pending = snapshot
        self._last_at = now
        self._event.set()

    def publish_now(self) -> None:
        """Publish what is pending without waiting (shutdown, tests)."""
        snapshot, self._pending = self._pending, None
        self._event.clear()
        if snapshot is None:
            return
        self.published += 1
        try:
            self._cache.publish(snapshot)
        except SnapshotError as exc:
            self.rejected += 1
            log.error("snapshot rejected, keeping the previous one", problems=list(exc.problems))

    async def run(self) -> None:
        """Publish debounced snapshots until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._event.wait()
            self._event.clear()
            while self._pending is not None:
                deadline = min(self._last_at + self._quiet, self._first_at + self._max_delay)
                delay = deadline - loop.time()
                if delay <= _RESOLUTION:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._event.wait(), delay)
                self._event.clear()
            self.publish_now()
