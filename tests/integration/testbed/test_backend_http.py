"""A real backend over loopback HTTP, with fake loop time (looptime) for service times."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from aviator.testbed.backend import BACKEND_HEADER, Backend, BackendSpec
from aviator.testbed.profile import Distribution, Phase, Profile
from tests.integration.testbed.hanging import hanging


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, str]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get(BACKEND_HEADER), await resp.text()


@pytest.mark.looptime
async def test_capacity_two_with_six_concurrent_http_requests(
    session: aiohttp.ClientSession,
) -> None:
    backend = Backend(
        BackendSpec("cap2", Profile.constant(2.0, 2), distribution=Distribution.CONSTANT)
    )
    await backend.start()
    try:
        calls = [asyncio.create_task(_get(session, backend.url + f"/r{i}")) for i in range(6)]
        await asyncio.sleep(1.0)
        during = backend.stats()
        assert during.in_app == 6  # every request is inside the application...
        assert during.in_service == 2  # ...but only two hold a slot
        assert during.queued == 4
        results = await asyncio.gather(*calls)
        assert results == [(200, "cap2", "cap2\n")] * 6
        after = backend.stats()
        assert after.max_in_service == 2
        assert after.received == after.served == 6
        assert after.in_app == 0
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_a_health_check_queues_for_a_slot_and_holds_it_for_no_time(
    session: aiohttp.ClientSession,
) -> None:
    backend = Backend(
        BackendSpec("health", Profile.constant(2.0, 1), distribution=Distribution.CONSTANT),
        health_path="/healthz",
    )
    await backend.start()
    loop = asyncio.get_running_loop()
    try:
        # At rest the check is answered at once.
        t0 = loop.time()
        assert await _get(session, backend.url + "/healthz") == (200, "health", "ok\n")
        assert loop.time() - t0 < 0.1
        # Sent at 1 s behind a request holding the only slot until 2 s and one queued to hold it
        # until 4 s, the check waits its turn (3 s: the queueing delay is its round trip)...
        first = asyncio.create_task(_get(session, backend.url + "/a"))
        await asyncio.sleep(0.5)
        second = asyncio.create_task(_get(session, backend.url + "/b"))
        await asyncio.sleep(0.5)
        t0 = loop.time()
        check = await _get(session, backend.url + "/healthz")
        assert check[0] == 200
        assert loop.time() - t0 == pytest.approx(3.0, abs=0.1)
        # ...and a request after it is not delayed by it: no service time was spent on it.
        t1 = loop.time()
        assert (await _get(session, backend.url + "/c"))[0] == 200
        assert loop.time() - t1 == pytest.approx(2.0, abs=0.1)
        await asyncio.gather(first, second)
        stats = backend.stats()
        assert (stats.received, stats.served, stats.health_checks) == (3, 3, 2)
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_error_phase_returns_503_with_the_backend_header(
    session: aiohttp.ClientSession,
) -> None:
    profile = Profile.of([Phase(0.0, mean_service_s=0.01), Phase(10.0, error_rate=1.0)])
    backend = Backend(BackendSpec("flaky", profile, seed=2))
    await backend.start()
    try:
        assert (await _get(session, backend.url))[:2] == (200, "flaky")
        await asyncio.sleep(10)
        statuses = [(await _get(session, backend.url))[:2] for _ in range(5)]
        assert statuses == [(503, "flaky")] * 5
        stats = backend.stats()
        assert stats.failed_fast == 5
        assert stats.served == 1
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_middlewares_wrap_every_request_including_queued_ones(
    session: aiohttp.ClientSession,
) -> None:
    from aiohttp import web
    from aiohttp.typedefs import Handler

    seen_in_flight: list[int] = []
    in_flight = 0

    @web.middleware
    async def counting(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        in_flight += 1
        seen_in_flight.append(in_flight)
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    backend = Backend(
        BackendSpec("mw", Profile.constant(0.05, 1), distribution=Distribution.CONSTANT),
        middlewares=[counting],
    )
    await backend.start()
    try:
        await asyncio.gather(*(_get(session, backend.url) for _ in range(4)))
        # With one slot, the fourth request arrived while three were inside: queued requests
        # are in flight for the middleware (Prequal counts RIF from receipt to response).
        assert max(seen_in_flight) == 4
        assert backend.stats().max_in_service == 1
    finally:
        await backend.stop()


@pytest.mark.looptime
async def test_stop_does_not_wait_for_a_hanging_request(session: aiohttp.ClientSession) -> None:
    backend = hanging()
    await backend.start()
    call = asyncio.create_task(_get(session, backend.url))
    for _ in range(1000):  # fake time: until the request is inside the application
        if backend.stats().in_app:
            break
        await asyncio.sleep(0.01)
    assert backend.stats().in_app == 1
    await backend.stop()
    with pytest.raises(aiohttp.ClientError):
        await call
    assert asyncio.get_running_loop().time() < 5  # fake time: the handler was cancelled


@pytest.mark.looptime
async def test_stop_ends_requests_whose_client_went_away(session: aiohttp.ClientSession) -> None:
    # A client that gives up closes its connection; the server no longer tracks that
    # connection, but the application still holds the request (a real app keeps working on
    # it). stop() must end it too, or it runs on after the backend has stopped.
    backend = hanging()
    await backend.start()
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await _get(session, backend.url)
        await asyncio.sleep(0.1)  # the server sees the connection close
        assert backend.stats().in_app == 1  # abandoned, still inside the application
    finally:
        await backend.stop()
    assert backend.stats().in_app == 0


@pytest.mark.looptime
async def test_serve_fleet_in_process_with_a_wall_clock_origin(
    session: aiohttp.ClientSession,
) -> None:
    import time

    from aviator.testbed.fleetserver import FleetSpec, serve_fleet

    profile = Profile.of([Phase(0.0, capacity=4), Phase(10.0, capacity=1)])
    spec = FleetSpec(
        backends=(BackendSpec("w1", profile), BackendSpec("w2", profile)),
        agent=False,
        t0_wall=time.time() - 15.0,  # the schedule started 15 s ago: phase 2 is in force
    )
    info: dict[str, object] = {}
    stop = asyncio.Event()
    task = asyncio.create_task(serve_fleet(spec, ready=info.update, stop=stop))
    for _ in range(1000):
        if info:
            break
        await asyncio.sleep(0.01)
    try:
        control = str(info["control"])
        async with session.get(control + "/testbed/stats") as resp:
            stats = await resp.json()
        assert {s["phase"]["capacity"] for s in stats.values()} == {1}
        async with session.post(control + "/testbed/clock") as resp:
            assert resp.status == 200
        async with session.get(control + "/testbed/stats") as resp:
            stats = await resp.json()
        assert {s["phase"]["capacity"] for s in stats.values()} == {4}
        async with session.post(control + "/testbed/phase", json={"phases": []}) as resp:
            assert resp.status == 400
            assert "at least one phase" in (await resp.json())["error"]
    finally:
        stop.set()
        await task
