"""k6 drives real testbed backends: the per-backend shares come from the response header,
the backends' clock restarts when the load starts, and a starved generator (one VU against a
slow backend) drops iterations and is reported as not keeping up. Nothing here asserts speed:
only counts and the keep-up verdict, which depends on ``dropped_iterations``."""

from __future__ import annotations

import pytest

from aviator.testbed.backend import BackendSpec
from aviator.testbed.fleet import Fleet
from aviator.testbed.fleetserver import FleetSpec
from aviator.testbed.k6load import find_k6, run_k6_load
from aviator.testbed.loadspec import LoadSpec
from aviator.testbed.profile import Phase, Profile

pytestmark = pytest.mark.timeout(240)


def _fleet(n: int, mean_s: float, capacity: int) -> FleetSpec:
    profile = Profile((Phase(0.0, mean_service_s=mean_s, capacity=capacity),))
    return FleetSpec(tuple(BackendSpec(f"b{i}", profile, seed=i) for i in range(n)), agent=False)


def test_k6_is_found() -> None:
    assert find_k6().name == "k6"


async def test_k6_run_measures_every_request_and_the_shares() -> None:
    async with Fleet(_fleet(2, 0.002, 8)) as fleet:
        spec = LoadSpec(
            targets=tuple(fleet.backend_urls.values()),
            duration_s=3.0,
            rate=50.0,
            warmup_s=1.0,
            deadline_s=2.0,
            seed=1,
        )
        info = await run_k6_load(spec, clock_url=fleet.control_url + "/testbed/clock", thinning=1)
        stats = await fleet.stats()
    r = info.result
    assert r.generator == "k6"
    assert r.dropped == 0
    assert r.measured == 100
    assert r.warmup == 50
    assert r.errors == {}
    assert r.by_backend == {"b0": 50, "b1": 50}  # round robin over the two targets
    assert sum(s.received for s in stats.values()) == 150
    assert r.latency_all.p50_ms > 0
    # setup() restarted the backends' clock right before the first slot.
    assert info.clock_lead_ms is not None
    assert abs(info.clock_lead_ms) < 1000


async def test_a_starved_generator_does_not_keep_up() -> None:
    # One VU against a backend that takes 200 ms: at 20/s most slots find no free VU.
    async with Fleet(_fleet(1, 0.2, 1)) as fleet:
        spec = LoadSpec(
            targets=tuple(fleet.backend_urls.values()),
            duration_s=2.0,
            rate=20.0,
            deadline_s=5.0,
            seed=1,
        )
        info = await run_k6_load(spec, vus=1)
    assert info.dropped > 0
    assert info.result.dropped == info.dropped
    assert not info.result.keeping_up
