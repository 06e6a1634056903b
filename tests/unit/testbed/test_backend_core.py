"""The backend's request logic without sockets: capacity gate, phases, errors, hidden load.

Time is fake (looptime): service times of seconds cost nothing, and phase switches happen at
exact loop times.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from aviator.testbed.backend import Backend, BackendSpec
from aviator.testbed.gate import CapacityGate
from aviator.testbed.profile import Distribution, Phase, Profile

# -- CapacityGate -------------------------------------------------------------------------------


async def test_gate_admits_up_to_capacity_then_fifo() -> None:
    gate = CapacityGate(2)
    order: list[int] = []

    async def holder(i: int, release: asyncio.Event) -> None:
        await gate.acquire()
        order.append(i)
        await release.wait()
        gate.release()

    events = [asyncio.Event() for _ in range(5)]
    tasks = [asyncio.create_task(holder(i, events[i])) for i in range(5)]
    await asyncio.sleep(0)
    assert gate.in_use == 2
    assert gate.waiting == 3
    assert order == [0, 1]
    events[1].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == [0, 1, 2]
    for e in events:
        e.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert gate.in_use == 0
    assert gate.max_in_use == 2


async def test_gate_grow_admits_waiters_and_shrink_blocks_new_ones() -> None:
    gate = CapacityGate(1)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert gate.waiting == 3
    gate.resize(3)
    await asyncio.sleep(0)
    assert gate.in_use == 3
    assert gate.waiting == 1
    gate.resize(1)
    gate.release()
    gate.release()
    await asyncio.sleep(0)
    # Two slots were given back but capacity is now 1 and one holder remains: nobody enters.
    assert gate.in_use == 1
    assert gate.waiting == 1
    gate.release()
    await asyncio.sleep(0)
    assert gate.in_use == 1
    assert gate.waiting == 0
    await asyncio.gather(*waiters)


async def test_gate_cancelled_waiter_leaks_no_slot() -> None:
    gate = CapacityGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.release()
    assert gate.in_use == 0
    await gate.acquire()  # the slot is free, not held by the cancelled waiter
    assert gate.in_use == 1


async def test_gate_waiter_cancelled_after_grant_hands_the_slot_back() -> None:
    gate = CapacityGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # grants the slot to the waiter, which has not run yet
    assert gate.in_use == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.in_use == 0


def test_gate_rejects_bad_use() -> None:
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        CapacityGate(0)
    with pytest.raises(RuntimeError, match="more times than acquire"):
        CapacityGate(1).release()


# -- Backend request logic ---------------------------------------------------------------------


def _backend(profile: Profile, **kwargs: object) -> Backend:
    return Backend(BackendSpec("b1", profile, seed=1, **kwargs))  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_capacity_two_serves_six_requests_at_most_two_at_once() -> None:
    backend = _backend(Profile.constant(1.0, 2), distribution=Distribution.CONSTANT)
    await backend.start(listen=False)
    try:
        requests = [asyncio.create_task(backend.serve_one()) for _ in range(6)]
        await asyncio.sleep(0.5)
        stats = backend.stats()
        assert stats.in_service == 2
        assert stats.queued == 4
        assert await asyncio.gather(*requests) == [True] * 6
        stats = backend.stats()
        assert stats.max_in_service == 2
        assert stats.served == 6
        assert stats.in_service == 0
        # Three waves of two: the queue, not parallelism, set the finishing time.
        assert asyncio.get_running_loop().time() == pytest.approx(3.0)
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_phases_switch_on_the_schedule() -> None:
    profile = Profile.of(
        [
            Phase(0.0, mean_service_s=0.01, capacity=4),
            Phase(10.0, mean_service_s=0.5, capacity=1),
            Phase(20.0, mean_service_s=0.01, capacity=8, error_rate=1.0),
        ]
    )
    backend = _backend(profile)
    await backend.start(listen=False)
    try:
        await asyncio.sleep(5)
        assert backend.phase == profile.phases[0]
        await asyncio.sleep(10)  # t = 15
        assert backend.phase == profile.phases[1]
        assert backend._gate.capacity == 1
        await asyncio.sleep(10)  # t = 25
        assert backend.phase == profile.phases[2]
        assert backend._gate.capacity == 8
        assert await backend.serve_one() is False
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_set_profile_applies_now_and_restarts_the_schedule() -> None:
    backend = _backend(Profile.constant(0.01, 4))
    await backend.start(listen=False)
    try:
        await asyncio.sleep(100)
        new = Profile.of([Phase(0.0, capacity=1), Phase(5.0, capacity=3)])
        backend.set_profile(new)
        await asyncio.sleep(0)
        assert backend.phase.capacity == 1
        await asyncio.sleep(4)  # t = 104: 4 s into the new profile
        assert backend.phase.capacity == 1
        await asyncio.sleep(2)  # 6 s into it
        assert backend.phase.capacity == 3
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_error_mode_fails_fast_without_taking_a_slot() -> None:
    backend = _backend(Profile.constant(10.0, 1, error_rate=0.5))
    await backend.start(listen=False)
    try:
        # Fast failures return at once, so only the successes hold the single slot.
        results = await asyncio.gather(*(backend.serve_one() for _ in range(40)))
        stats = backend.stats()
        assert stats.failed_fast == results.count(False)
        assert stats.served == results.count(True)
        assert 0 < stats.failed_fast < 40
        assert stats.max_in_service == 1
    finally:
        await backend.stop()


class CountingTracker:
    def __init__(self) -> None:
        self.current = 0
        self.entered = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.current += 1
        self.entered += 1
        try:
            yield
        finally:
            self.current -= 1


@pytest.mark.looptime
async def test_hidden_load_starts_with_its_phase_and_uses_slots() -> None:
    tracker = CountingTracker()
    profile = Profile.of(
        [
            Phase(0.0, mean_service_s=1.0, capacity=4),
            # Hidden jobs at 50% of 4 slots with 1 s service: 2 jobs per second.
            Phase(10.0, mean_service_s=1.0, capacity=4, hidden_load=0.5),
            Phase(110.0, mean_service_s=1.0, capacity=4),
        ]
    )
    backend = Backend(BackendSpec("h", profile, seed=5), job_tracker=tracker)
    await backend.start(listen=False)
    try:
        await asyncio.sleep(9)
        assert backend.stats().hidden_started == 0
        await asyncio.sleep(101)  # t = 110: the hidden phase is over
        stats = backend.stats()
        assert 150 <= stats.hidden_started <= 250  # Poisson around 200
        assert tracker.entered == stats.hidden_started
        assert stats.max_in_service >= 2  # hidden jobs really held slots
        await asyncio.sleep(50)  # the last jobs drain; no new ones start
        stats = backend.stats()
        assert stats.hidden_served == stats.hidden_started
        assert stats.in_service == 0
        assert tracker.current == 0
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_hidden_overload_is_bounded() -> None:
    # hidden_load 3 asks for 300% of the capacity: the backlog is capped, the rest dropped.
    backend = _backend(Profile.constant(1.0, 2, hidden_load=3.0))
    await backend.start(listen=False)
    try:
        await asyncio.sleep(60)
        stats = backend.stats()
        assert stats.hidden_dropped > 0
        assert len(backend._hidden_jobs) <= 4 * 2
        assert stats.max_in_service == 2
    finally:
        await backend.stop()


def test_spec_json_round_trip_and_validation() -> None:
    spec = BackendSpec(
        "b7",
        Profile.of([Phase(0.0), Phase(3.0, capacity=1)]),
        host="127.0.0.7",
        port=8080,
        seed=3,
        distribution=Distribution.CONSTANT,
    )
    assert BackendSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unknown backend field"):
        BackendSpec.from_json({"name": "x", "prot": 1})
    with pytest.raises(ValueError, match="port must be in"):
        BackendSpec("x", port=70000)
