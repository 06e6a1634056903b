"""The Kubernetes source's coalescing of change bursts into publishes, on fake loop time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from aviator.k8s.state import EMPTY_STATE, ClusterState
from aviator.source.kubernetes.source import Coalescer

pytestmark = pytest.mark.looptime


class Harness:
    def __init__(self, *, build_seconds: float = 0.0, ready: bool = True) -> None:
        self.loop = asyncio.get_running_loop()
        self.ready = ready
        self.build_seconds = build_seconds
        self.offset = 0.0  # what builds "took", added to the loop's clock
        self.published: list[float] = []
        self.coalescer = Coalescer(
            self.build, ready=lambda: self.ready, coalesce=0.05, clock=self.clock
        )

    def clock(self) -> float:
        return self.loop.time() + self.offset

    def build(self) -> ClusterState:
        self.offset += self.build_seconds
        return EMPTY_STATE

    def publish(self, state: ClusterState) -> None:
        self.published.append(self.loop.time())


@contextlib.asynccontextmanager
async def running(h: Harness) -> AsyncIterator[Harness]:
    task = asyncio.create_task(h.coalescer.run(h.publish))
    try:
        yield h
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_lone_change_is_published_after_the_coalescing_delay() -> None:
    async with running(Harness()) as h:
        start = h.loop.time()
        h.coalescer.changed()
        await asyncio.sleep(1.0)
        assert [round(t - start, 3) for t in h.published] == [0.05]


async def test_nothing_is_published_before_ready_then_the_first_change_after_it_is() -> None:
    async with running(Harness(ready=False)) as h:
        for _ in range(10):
            h.coalescer.changed()
            await asyncio.sleep(0.1)
        assert h.published == []
        h.ready = True
        h.coalescer.changed()  # what the last informer to sync does
        await asyncio.sleep(0.1)
        assert len(h.published) == 1


async def test_a_thousand_changes_in_a_second_are_a_few_publishes() -> None:
    async with running(Harness()) as h:
        for _ in range(1000):
            h.coalescer.changed()
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        # One publish per coalescing window, and the last change is never left behind.
        assert 15 <= len(h.published) <= 21
        assert h.coalescer.builds == len(h.published)
        assert h.published[-1] >= h.loop.time() - 0.2 - 0.001


async def test_under_constant_churn_builds_are_one_build_apart() -> None:
    async with running(Harness(build_seconds=0.2)) as h:
        for _ in range(2000):
            h.coalescer.changed()
            await asyncio.sleep(0.001)
        gaps = [b - a for a, b in zip(h.published, h.published[1:], strict=False)]
        assert gaps
        assert min(gaps) >= 0.2 - 1e-9
        # A lone change after a quiet spell waits only the coalescing delay again.
        await asyncio.sleep(5.0)
        start = h.loop.time()
        h.coalescer.changed()
        await asyncio.sleep(1.0)
        assert round(h.published[-1] - start, 3) == 0.05
