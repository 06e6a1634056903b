"""Short garbage-collector pauses for a big, long-lived heap (issue 9, item 6).

With 10,000 pods served, the control plane holds ~575k objects the collector tracks (pods,
endpoints, connections, probe state), nearly all of them as long-lived as the state. CPython
3.11 walks every one of them in a full collection (300-400 ms on this machine), and starts
one whenever the objects that outlived two young collections since the last full one reach a
quarter of the heap: at rest that was every ~8 s, each probe's timer, future and result living
one interval. Each such pause held the event loop that serves xDS, admin and probes.

:class:`HeapKeeper` makes the long-lived heap the collector's permanent generation: every
``interval_s`` it runs a full collection, which walks only what is not frozen yet (what was
made since its last round, so it is short), then ``gc.freeze()``: what survived is frozen,
and no later collection walks it. Garbage is never frozen (the collection just before found
it all). A frozen object is still freed when its last reference goes (reference counting);
what freezing stops is collecting one that dies in a reference cycle after it was frozen. So
when the heap has grown by half since the last thaw, the keeper thaws it (``gc.unfreeze()``)
and collects it whole once: CPython's own rule (a full collection when the long-lived heap
grew by a quarter), at a half, on the keeper's schedule. A steady heap is never walked whole
again. The heap's size is ``sys.getallocatedblocks()`` (tens of microseconds), not
``gc.get_freeze_count()``, which walks the frozen objects to count them (65 ms a call at
575k, as long as the pauses this is here to remove).

Process-wide (the collector is): ``aviator run`` turns it on; a control plane embedded in
another program (the tests) leaves it off. :meth:`HeapKeeper.run` thaws on its way out.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable
from typing import Protocol

import structlog

__all__ = ["DEFAULT_INTERVAL_S", "THAW_GROWTH", "Collector", "HeapKeeper"]

log = structlog.get_logger(__name__)

DEFAULT_INTERVAL_S = 1.0
#: The heap thaws (and is collected whole) once it is this many times its size after the last
#: thaw.
THAW_GROWTH = 1.5


class Collector(Protocol):
    """What the keeper uses of :mod:`gc` (a fake in the unit tests)."""

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...


class HeapKeeper:
    """Freezes what survives each round; thaws when the heap grew by half.

    ``collector`` and ``heap_size`` (the heap's size, in any unit that grows with it) are
    :mod:`gc` and :func:`sys.getallocatedblocks` unless given (the unit tests give fakes)."""

    def __init__(
        self,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        growth: float = THAW_GROWTH,
        collector: Collector | None = None,
        heap_size: Callable[[], int] = sys.getallocatedblocks,
    ) -> None:
        if not interval_s > 0 or not growth > 1:
            raise ValueError("interval_s must be > 0 and growth > 1")
        self._interval_s = interval_s
        self._growth = growth
        self._gc: Collector = collector if collector is not None else gc
        self._heap_size = heap_size
        self._baseline = 0  # the heap's size just after the last thaw
        self.rounds = 0
        self.thaws = 0

    def round(self) -> bool:
        """One round: collect what is not frozen, freeze the survivors; first thaw (and so
        collect everything) if the heap grew past ``growth`` times its size after the last
        thaw. True if it thawed."""
        gc_ = self._gc
        size = self._heap_size()
        # The first round collects the whole heap anyway (nothing is frozen yet).
        thaw = self.rounds == 0 or size > self._growth * self._baseline
        if thaw:
            gc_.unfreeze()
        gc_.collect()
        if thaw:
            self._baseline = self._heap_size()
            self.thaws += 1
            log.debug("heap thawed and collected", size_before=size, size=self._baseline)
        gc_.freeze()
        self.rounds += 1
        return thaw

    async def run(self) -> None:
        """A round every ``interval_s`` until cancelled; then thaw (the process's collector
        is as it was)."""
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                self.round()
        finally:
            self._gc.unfreeze()
