"""The Reconciler on fake loop time: writes on change only, rate limits, settle, leadership."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from aviator.operator.elector import NotLeaderError
from aviator.operator.kube import ForbiddenError, UnavailableError
from aviator.operator.ratelimit import RateLimiter
from aviator.operator.reconciler import Reconciler


class Gate:
    def __init__(self, leading: bool = True) -> None:
        self.leading = leading

    def is_leader(self) -> bool:
        return self.leading


class Server:
    """A fake write target: records (time, key, value); can be made to fail or hang."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str, int | None]] = []
        self.fail: list[Exception] = []
        self.hang = False
        self.cancelled = 0

    async def write(self, key: str, value: int | None) -> None:
        now = asyncio.get_running_loop().time()
        if self.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail:
            raise self.fail.pop(0)
        self.writes.append((now, key, value))


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Reconciler[str, int], Server, Gate]]:
    server, gate = Server(), Gate()
    rec: Reconciler[str, int] = Reconciler(
        "test",
        server.write,
        limiter=RateLimiter(per_key=10.0, rate=100.0, burst=100),
        gate=gate,
        material=lambda a, b: a is None or b is None or abs(a - b) >= 5,
        settle=lambda v: 3.0 if v == 99 else 0.0,
        backoff=(1.0, 8.0),
    )
    task = asyncio.create_task(rec.run())
    yield rec, server, gate
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.looptime
async def test_only_material_changes_are_written_and_at_most_once_per_interval(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, _ = setup
    rec.set("a", 10)
    await asyncio.sleep(0.1)
    for v in (11, 12, 13, 14, 12):  # within 5 of what was written: not material
        rec.set("a", v)
        await asyncio.sleep(1)
    assert [(k, v) for _, k, v in server.writes] == [("a", 10)]
    rec.set("a", 30)  # material, but 10 s after the first write at the earliest
    rec.set("a", 40)  # the latest desire wins
    await asyncio.sleep(20)
    assert [(t, v) for t, _, v in server.writes] == [(0.0, 10), (10.0, 40)]
    assert rec.pending == 0


@pytest.mark.looptime
async def test_a_transient_desire_that_reverts_within_its_settle_time_is_never_written(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, _ = setup
    rec.set("a", 50)
    await asyncio.sleep(20)
    rec.set("a", 99)  # settles 3 s
    await asyncio.sleep(2)
    rec.set("a", 50)  # back to what is written
    await asyncio.sleep(10)
    assert [v for _, _, v in server.writes] == [50]
    rec.set("a", 99)
    await asyncio.sleep(10)
    t, _, v = server.writes[-1]
    assert v == 99
    assert t == pytest.approx(35.0, abs=0.1)


@pytest.mark.looptime
async def test_a_follower_writes_nothing_and_a_new_leader_rewrites_everything(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, gate = setup
    gate.leading = False
    rec.sync({"a": 1, "b": 2})
    await asyncio.sleep(30)
    assert server.writes == []
    gate.leading = True
    rec.leadership(True)
    await asyncio.sleep(1)
    assert sorted(k for _, k, _ in server.writes) == ["a", "b"]
    # A second term: what was written is unknown again (another leader may have written).
    gate.leading = False
    rec.leadership(False)
    gate.leading = True
    rec.leadership(True)
    await asyncio.sleep(11)
    assert len(server.writes) == 4


@pytest.mark.looptime
async def test_losing_leadership_cancels_the_write_in_flight_at_once(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, gate = setup
    server.hang = True
    rec.set("a", 1)
    await asyncio.sleep(5)
    gate.leading = False
    rec.leadership(False)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert server.cancelled == 1
    assert rec.pending == 1  # still to be written, by whoever leads next
    server.hang = False
    await asyncio.sleep(60)
    assert server.writes == []


@pytest.mark.looptime
async def test_failures_back_off_and_not_leader_is_not_a_failure(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, _ = setup
    unavailable = UnavailableError("PUT", "/x", None, "Timeout", "no answer")
    server.fail = [unavailable, unavailable, unavailable]
    rec.set("a", 1)
    await asyncio.sleep(60)
    # The per-key interval (10 s) dominates the 1, 2, 4 s back-off here.
    assert [t for t, _, _ in server.writes] == [30.0]
    assert rec.failures == 3
    server.fail = [ForbiddenError("PUT", "/y", 403, "Forbidden", "RBAC"), NotLeaderError("no")]
    rec.set("b", 1)
    await asyncio.sleep(9)
    assert rec.failures == 4
    await asyncio.sleep(20)  # permanent: retried at the ceiling (8 s, then per-key 10 s)
    assert [k for _, k, _ in server.writes] == ["a", "b"]
    assert rec.failures == 4  # NotLeaderError is not counted


@pytest.mark.looptime
async def test_removal_is_written_then_forgotten(
    setup: tuple[Reconciler[str, int], Server, Gate],
) -> None:
    rec, server, _ = setup
    rec.sync({"a": 1, "b": 2}, absent="remove")
    await asyncio.sleep(1)
    rec.sync({"a": 1}, absent="remove")
    await asyncio.sleep(20)
    assert [(k, v) for _, k, v in server.writes] == [("a", 1), ("b", 2), ("b", None)]
    assert rec.keys() == ["a"]
    rec.sync({}, absent="forget")
    await asyncio.sleep(20)
    assert len(server.writes) == 3
    assert rec.keys() == []
