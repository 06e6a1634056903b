"""HeapKeeper: what survives a round is frozen; garbage never is; a grown heap thaws.

The rules on a fake collector and heap size (which calls, in which order, when it thaws),
then the claims that matter on CPython's own collector: a round collects cyclic garbage made
since the last one (it is not frozen with the survivors), a round that does not thaw keeps
the frozen objects frozen, and a thaw collects a frozen cycle that died after it was frozen.
The real-collector tests thaw at the end (``unfreeze``), leaving the process's collector as
it found it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from aviator.heap import HeapKeeper


class FakeCollector:
    """Records the calls; ``size`` is the heap's size, as the test sets it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.size = 0

    def collect(self, generation: int = 2) -> int:
        self.calls.append("collect")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


def test_each_round_collects_then_freezes_and_a_heap_grown_by_half_thaws_first() -> None:
    fake = FakeCollector()
    keeper = HeapKeeper(collector=fake, heap_size=lambda: fake.size)
    fake.size = 100_000
    assert keeper.round()  # the first round is a whole collection: nothing is frozen yet
    assert fake.calls == ["unfreeze", "collect", "freeze"]
    for size in (120_000, 150_000, 90_000, 150_000):  # up to half as big again: no thaw
        fake.calls.clear()
        fake.size = size
        assert not keeper.round()
        assert fake.calls == ["collect", "freeze"]
    fake.size = 150_001
    assert keeper.round()  # past 1.5 x 100,000: thawed, collected whole, frozen again
    assert fake.calls[-3:] == ["unfreeze", "collect", "freeze"]
    assert keeper.thaws == 2
    fake.size = 220_000
    assert not keeper.round()  # the baseline is now the heap after that thaw (150,001)
    assert keeper.rounds == 7


class Node:
    """An object in a reference cycle with itself (collected only by the cycle collector)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    yield None
    gc.unfreeze()


def test_garbage_is_collected_not_frozen_and_survivors_stay_frozen(thawed: None) -> None:
    keeper = HeapKeeper()
    keeper.round()
    kept = Node()
    dead = weakref.ref(Node())  # cyclic garbage made since the last round
    assert dead() is not None
    keeper.round()
    assert dead() is None  # collected by the round, not frozen with the survivors
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert not keeper.round()
    assert gc.get_freeze_count() >= frozen  # a round that does not thaw keeps them frozen
    assert kept.me is kept


def test_a_thaw_collects_a_cycle_that_died_after_it_was_frozen(thawed: None) -> None:
    keeper = HeapKeeper(growth=1.01)
    keeper.round()
    node = Node()
    dead = weakref.ref(node)
    keeper.round()  # node survives, and is frozen
    del node
    gc.collect()
    assert dead() is not None  # frozen: a full collection does not walk it
    # Grow the heap by more than 1 %: the next round thaws.
    padding: list[list[int]] = [[] for _ in range(sys.getallocatedblocks() // 50 + 20_000)]
    assert keeper.round()
    assert dead() is None
    del padding


async def test_run_rounds_until_cancelled_then_thaws(thawed: None) -> None:
    keeper = HeapKeeper(interval_s=0.01)
    task = asyncio.create_task(keeper.run())
    while keeper.rounds < 2:  # noqa: ASYNC110 (the keeper's rounds have no event)
        await asyncio.sleep(0.01)
    assert gc.get_freeze_count() > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gc.get_freeze_count() == 0
