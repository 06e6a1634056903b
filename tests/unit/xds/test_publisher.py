"""Debouncing, on fake loop time: a quiet period, bounded by a maximum delay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from aviator.model import WorkloadKey
from aviator.xds import resources as r
from aviator.xds.cache import Cache, Changes
from aviator.xds.publisher import Publisher
from aviator.xds.snapshot import Snapshot, build_snapshot
from tests.unit.xds.fakes import workload


class TimedCache(Cache):
    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def publish(self, snapshot: Snapshot, *, check: bool = True) -> Changes:
        self.times.append(asyncio.get_running_loop().time())
        return super().publish(snapshot, check=check)


@pytest.fixture
async def running() -> AsyncIterator[tuple[TimedCache, Publisher]]:
    cache = TimedCache()
    publisher = Publisher(cache, quiet=0.1, max_delay=1.0)
    task = asyncio.create_task(publisher.run())
    yield cache, publisher
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.looptime
async def test_a_burst_is_published_once_after_the_quiet_period(
    running: tuple[TimedCache, Publisher],
) -> None:
    cache, publisher = running
    start = asyncio.get_running_loop().time()
    for weight in (1, 2, 3):
        publisher.submit(build_snapshot([workload("a", weight)]))
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    assert cache.times == [pytest.approx(start + 0.1 + 0.1)]  # last submit at 0.1, quiet 0.1
    entry = cache.get(r.ENDPOINT_TYPE, "default/a")
    assert entry is not None
    assert entry.message.endpoints[0].lb_endpoints[0].load_balancing_weight.value == 3  # type: ignore[attr-defined]


@pytest.mark.looptime
async def test_a_steady_trickle_is_published_at_the_maximum_delay(
    running: tuple[TimedCache, Publisher],
) -> None:
    cache, publisher = running
    start = asyncio.get_running_loop().time()
    for i in range(60):  # every 0.05 s for 3 s: never quiet for 0.1 s
        publisher.submit(build_snapshot([workload("a", 1 + i)]))
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)
    # Each publish comes max_delay after the first submission it covers (0 and 1.05), and
    # the last one a quiet period after the last submission (2.95).
    assert [t - start for t in cache.times] == [
        pytest.approx(1.0),
        pytest.approx(2.05),
        pytest.approx(3.05),
    ]


@pytest.mark.looptime
async def test_an_inconsistent_snapshot_is_dropped_and_the_old_one_kept(
    running: tuple[TimedCache, Publisher],
) -> None:
    cache, publisher = running
    publisher.submit(build_snapshot([workload("a", 1)]))
    await asyncio.sleep(1)
    publisher.submit(
        Snapshot.from_messages(clusters=[r.build_cluster(WorkloadKey("default", "x"))])
    )
    await asyncio.sleep(1)
    assert publisher.published == 2
    assert publisher.rejected == 1
    assert set(cache.resources(r.CLUSTER_TYPE)) == {"default/a"}


def test_invalid_timings_are_rejected() -> None:
    with pytest.raises(ValueError, match="quiet <= max_delay"):
        Publisher(Cache(), quiet=2, max_delay=1)
