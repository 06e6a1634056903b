"""The seam between state sources and everything downstream.

A source (``--source dir:PATH``: :mod:`aviator.source.directory`; ``--source kubernetes``:
:mod:`aviator.source.kubernetes`) publishes whole :class:`~aviator.k8s.state.ClusterState`
values to a :class:`Store`; the control plane follows the store. A small asyncio notifier: no
I/O here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from aviator.k8s.state import EMPTY_STATE, ClusterState

__all__ = ["StateSource", "Store"]


class Store:
    """Holds the latest :class:`ClusterState` and wakes consumers when it changes.

    Latest wins: a slow consumer skips intermediate states and sees the newest one, which
    is what every consumer here wants (each state is complete). ``synced`` turns true at
    the first publish (a source publishes once it has read everything once).
    """

    def __init__(self) -> None:
        self._state = EMPTY_STATE
        self._synced = False
        self._generation = 0  # number of accepted publishes
        self._changed = asyncio.Event()

    @property
    def current(self) -> ClusterState:
        return self._state

    @property
    def synced(self) -> bool:
        return self._synced

    def publish(self, state: ClusterState) -> bool:
        """Make ``state`` current; False (and no wake-up) if its version is already current."""
        if self._synced and state.version == self._state.version:
            return False
        self._synced = True
        self._state = state
        self._generation += 1
        # Wake every waiter of this generation; later waiters wait on a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    async def updates(self) -> AsyncIterator[ClusterState]:
        """The current state once synced, then each newer one (intermediate ones skipped)."""
        seen = 0
        while True:
            while self._generation == seen:
                await self._changed.wait()
            seen = self._generation
            yield self._state


class StateSource(Protocol):
    """A producer of cluster states (``--source dir:PATH`` or ``--source kubernetes``)."""

    @property
    def name(self) -> str:
        """How the source is named in logs and ``/readyz``, e.g. ``dir:/etc/aviator``."""
        ...

    async def run(self, store: Store) -> None:
        """Publish the first complete state as soon as it is read, then every change,
        until cancelled. Raise only for failures the source cannot recover from."""
        ...
