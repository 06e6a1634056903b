"""Leader election decisions (client-go's tryAcquireOrRenew) and the rate limiter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aviator.operator.election import (
    Action,
    ElectionTiming,
    LeaseRecord,
    decide,
    micro_time,
    released,
)
from aviator.operator.ratelimit import RateLimiter

WALL = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
TIMING = ElectionTiming()


def lease(holder: str, rv: str = "1", *, seconds: int = 15, transitions: int = 0) -> dict[str, Any]:
    record = LeaseRecord(holder, seconds, micro_time(WALL), micro_time(WALL), transitions)
    return {"metadata": {"name": "l", "resourceVersion": rv}, "spec": record.spec()}


def test_no_lease_is_created_held() -> None:
    d = decide("a", None, None, TIMING, now=0.0, wall=WALL)
    assert d.action is Action.CREATE
    assert d.record == LeaseRecord("a", 15, micro_time(WALL), micro_time(WALL), 0)


def test_a_live_lease_of_another_waits_a_full_duration_from_when_it_was_seen_to_change() -> None:
    d = decide("b", lease("a", "1"), None, TIMING, now=100.0, wall=WALL)
    assert d.action is Action.WAIT
    obs = d.observation
    # The record's own timestamps are another machine's clock: never used. Unchanged for
    # 14.9 s of *our* time → still waiting; at 15 s → take over.
    d = decide("b", lease("a", "1"), obs, TIMING, now=114.9, wall=WALL + timedelta(days=9))
    assert d.action is Action.WAIT
    d = decide("b", lease("a", "1"), obs, TIMING, now=115.0, wall=WALL)
    assert d.action is Action.UPDATE
    assert d.record is not None
    assert d.record.holder == "b"
    assert d.record.transitions == 1


def test_a_renewal_seen_restarts_the_wait() -> None:
    obs = decide("b", lease("a", "1"), None, TIMING, now=0.0, wall=WALL).observation
    d = decide("b", lease("a", "2"), obs, TIMING, now=14.0, wall=WALL)  # renewed
    assert d.action is Action.WAIT
    d2 = decide("b", lease("a", "2"), d.observation, TIMING, now=28.0, wall=WALL)
    assert d2.action is Action.WAIT  # 14 s since the change was seen
    d3 = decide("b", lease("a", "2"), d2.observation, TIMING, now=29.0, wall=WALL)
    assert d3.action is Action.UPDATE


def test_the_holder_renews_keeping_acquire_time_and_transitions() -> None:
    current = lease("a", transitions=3)
    current["spec"]["acquireTime"] = "2024-01-01T00:00:00.000000Z"
    later = WALL + timedelta(seconds=2)
    d = decide("a", current, None, TIMING, now=0.0, wall=later)
    assert d.action is Action.UPDATE
    assert d.record == LeaseRecord("a", 15, "2024-01-01T00:00:00.000000Z", micro_time(later), 3)


def test_a_released_lease_is_taken_at_once() -> None:
    rel = {"metadata": {"resourceVersion": "9"}, "spec": released(LeaseRecord("a"), WALL).spec()}
    assert rel["spec"]["holderIdentity"] == ""
    d = decide("b", rel, None, TIMING, now=0.0, wall=WALL)
    assert d.action is Action.UPDATE


def test_timing_is_validated_as_client_go_does() -> None:
    with pytest.raises(ValueError, match=r"lease_duration .* greater than renew_deadline"):
        ElectionTiming(10, 10, 2)
    with pytest.raises(ValueError, match=r"1\.2 x retry_period"):
        ElectionTiming(15, 2, 2)
    assert ElectionTiming(2.5, 1.5, 0.25).lease_seconds == 3  # rounded up, never less


def test_rate_limiter_per_key_and_global() -> None:
    rl = RateLimiter(per_key=10.0, rate=1.0, burst=2)
    assert rl.next_allowed("a", 0.0) == 0.0
    rl.take("a", 0.0)
    assert rl.next_allowed("a", 0.0) == 10.0  # per key
    assert rl.next_allowed("b", 0.0) == 0.0  # one token left
    rl.take("b", 0.0)
    assert rl.next_allowed("c", 0.0) == pytest.approx(1.0)  # bucket empty: 1 token/s
    assert rl.next_allowed("c", 0.5) == pytest.approx(1.0)
    assert rl.next_allowed("c", 3.0) == 3.0  # refilled
    assert rl.next_allowed("a", 3.0) == 10.0


def test_rate_limiter_memory_is_bounded() -> None:
    rl = RateLimiter(per_key=1.0, rate=1000.0, burst=1000)
    for i in range(10_000):
        rl.take(i, i * 0.01)
    assert len(rl._last) < 300
