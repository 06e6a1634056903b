"""A FIFO capacity gate whose capacity can change while it is in use.

A testbed backend admits at most ``capacity`` requests (and hidden jobs) into service at once
and queues the rest in arrival order; capacity phases resize it while requests hold it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

__all__ = ["CapacityGate"]


class CapacityGate:
    """A FIFO semaphore whose capacity can change while it is in use.

    Invariants: ``in_use`` never exceeds ``capacity`` except right after a shrink (the holders
    finish, and nobody is admitted until ``in_use < capacity``); waiters are admitted in arrival
    order; a waiter cancelled before or after being granted never leaks a slot.
    (``asyncio.Semaphore`` cannot be resized, and capacity phases need that.)
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._in_use = 0
        self._max_in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def max_in_use(self) -> int:
        """Highest ``in_use`` seen since construction (or the last :meth:`reset_max`)."""
        return self._max_in_use

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def reset_max(self) -> None:
        self._max_in_use = self._in_use

    async def acquire(self) -> None:
        if self._in_use < self._capacity and not self._waiters:
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted, then cancelled before the holder ran: hand the slot back.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("CapacityGate.release() called more times than acquire()")
        self._in_use -= 1
        self._wake()

    def resize(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._wake()

    def _take(self) -> None:
        self._in_use += 1
        self._max_in_use = max(self._max_in_use, self._in_use)

    def _wake(self) -> None:
        while self._waiters and self._in_use < self._capacity:
            fut = self._waiters.popleft()
            if fut.done():  # cancelled while waiting
                continue
            self._take()
            fut.set_result(None)
