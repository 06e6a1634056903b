"""Backends with the probing agent: RIF counts queued requests and hidden load; capacity
follows the phases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aviator_agent.orca import ORCA_HEADER, parse_orca_header

from aviator.testbed.backend import Backend, BackendSpec, agent_backend
from aviator.testbed.profile import Distribution, Phase, Profile


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _probe(session: aiohttp.ClientSession, backend: Backend) -> dict[str, float]:
    async with session.get(backend.url + "/aviator/probe") as resp:
        assert resp.status == 200
        report = parse_orca_header(resp.headers[ORCA_HEADER])
        body: dict[str, float] = await resp.json()
    assert report.rif == body["rif"]
    return {**body, "utilization": report.application_utilization}


@pytest.mark.looptime
async def test_rif_counts_queued_requests_and_the_probe_bypasses_the_gate(
    session: aiohttp.ClientSession,
) -> None:
    loop = asyncio.get_running_loop()
    spec = BackendSpec("a1", Profile.constant(2.0, 1), distribution=Distribution.CONSTANT)
    backend = agent_backend(spec, clock=loop.time)
    await backend.start()
    try:
        calls = [asyncio.create_task(session.get(backend.url + "/work")) for _ in range(3)]
        await asyncio.sleep(1.0)
        probe = await _probe(session, backend)
        # One in service, two queued: all three are in flight; the probe itself is not.
        assert probe["rif"] == 3
        assert probe["capacity"] == 1
        assert probe["utilization"] == pytest.approx(3.0)
        responses = await asyncio.gather(*calls)
        for resp in responses:
            assert resp.status == 200
            assert parse_orca_header(resp.headers[ORCA_HEADER]).rif is not None
            resp.release()
        assert backend.stats().received == 3  # the probe never reached the handler
        assert (await _probe(session, backend))["rif"] == 0
    finally:
        await backend.stop()


async def test_hidden_load_shows_in_rif_and_capacity_follows_the_phase(
    session: aiohttp.ClientSession,
) -> None:
    # Real time, polled: under fake loop time the phase timer races the real socket I/O of
    # the probes when the machine is loaded (seen as a flaky "capacity still 4").
    profile = Profile.of(
        [
            Phase(0.0, mean_service_s=1.0, capacity=4),
            Phase(0.3, mean_service_s=1.0, capacity=2, hidden_load=2.0),
        ]
    )
    backend = agent_backend(BackendSpec("h1", profile, seed=3))
    await backend.start()
    try:
        first = await _probe(session, backend)
        assert first["capacity"] == 4
        # Hidden load at 200% of capacity 2: jobs queue inside the application.
        for _ in range(200):
            probe = await _probe(session, backend)
            if probe["capacity"] == 2 and probe["rif"] > 2:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"hidden load never showed: last probe {probe}")
        stats = backend.stats()
        assert stats.hidden_started > 0
        assert backend.stats().received == 0  # no HTTP request was served
    finally:
        await backend.stop()
