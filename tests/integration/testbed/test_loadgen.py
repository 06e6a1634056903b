"""The load generator against real backends on loopback, in fake loop time (looptime).

Fake time makes the Poisson timeline, the service times and the deadlines exact and instant;
the HTTP traffic is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from aviator.testbed.backend import Backend, BackendSpec
from aviator.testbed.loadgen import run_load
from aviator.testbed.loadresult import NO_BACKEND, LoadResult
from aviator.testbed.loadspec import LoadSpec, Split, plan
from aviator.testbed.profile import Profile
from tests.integration.testbed.hanging import hanging


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [
        Backend(BackendSpec("fast", Profile.constant(0.01, 8), seed=1)),
        Backend(BackendSpec("slow", Profile.constant(0.05, 8), seed=2)),
    ]
    try:
        for b in started:
            await b.start()
        yield started
    finally:
        for b in started:
            await b.stop()


def _check_accounting(result: LoadResult) -> None:
    """The invariants every finished run keeps."""
    assert result.measured + result.warmup == result.scheduled
    assert result.ok + sum(result.errors.values()) == result.measured
    assert result.latency_all.count == result.measured
    assert result.latency_ok.count == result.ok
    assert result.decode_histogram("all").get_total_count() == result.measured
    assert result.decode_histogram("ok").get_total_count() == result.ok
    assert sum(result.by_backend.values()) == result.measured
    assert sum(b.sent for b in result.per_second) == result.measured
    for bucket in result.per_second:
        assert sum(bucket.by_backend.values()) == bucket.sent == bucket.ok + bucket.errors
    per_backend_total: dict[str, int] = {}
    for bucket in result.per_second:
        for name, n in bucket.by_backend.items():
            per_backend_total[name] = per_backend_total.get(name, 0) + n
    assert per_backend_total == dict(result.by_backend)


@pytest.mark.looptime
async def test_every_scheduled_request_is_sent_recorded_and_attributed(
    backends: list[Backend],
) -> None:
    spec = LoadSpec(
        tuple(b.url for b in backends), duration_s=5.0, rate=200.0, seed=3, split=Split.RANDOM
    )
    times, targets = plan(spec)
    result = await run_load(spec)
    _check_accounting(result)
    assert result.scheduled == len(times)
    assert result.measured == len(times)
    assert result.errors == {}
    # The backends saw exactly the requests of the plan, split as planned.
    assert [b.stats().received for b in backends] == [targets.count(0), targets.count(1)]
    assert result.by_backend == {"fast": targets.count(0), "slow": targets.count(1)}
    # Fake time: the generator sent every request on time (to the fake clock's 1 µs).
    assert result.send_lag.max_ms <= 0.001
    assert result.keeping_up
    assert result.offered_rate == pytest.approx(len(times) / 5.0)
    assert len(result.per_second) == 5
    assert result.latency_ok_by_backend["slow"].count == targets.count(1)


@pytest.mark.looptime
async def test_warmup_requests_are_sent_but_not_measured(backends: list[Backend]) -> None:
    spec = LoadSpec((backends[0].url,), duration_s=4.0, rate=100.0, seed=5, warmup_s=1.0)
    times, _ = plan(spec)
    result = await run_load(spec)
    _check_accounting(result)
    assert result.warmup == sum(1 for t in times if t < 1.0)
    assert result.measured == sum(1 for t in times if t >= 1.0)
    assert backends[0].stats().received == len(times)
    assert [b.t for b in result.per_second] == [1, 2, 3]


@pytest.mark.looptime
async def test_deadline_turns_a_hanging_backend_into_timeouts() -> None:
    stuck = hanging()
    await stuck.start()
    try:
        spec = LoadSpec((stuck.url,), duration_s=2.0, rate=20.0, seed=7, deadline_s=0.5)
        times, _ = plan(spec)
        result = await run_load(spec)
    finally:
        await stuck.stop()
    _check_accounting(result)
    assert result.errors == {"timeout": len(times)}
    assert result.ok == 0
    assert result.by_backend == {NO_BACKEND: len(times)}
    # Timeouts are recorded at the deadline, measured from the intended send time.
    assert result.latency_all.p50_ms == pytest.approx(500, rel=0.01)
    assert result.latency_all.max_ms == pytest.approx(500, rel=0.01)


@pytest.mark.looptime
async def test_errors_are_counted_by_kind() -> None:
    failing = Backend(BackendSpec("fails", Profile.constant(0.01, 4, error_rate=1.0)))
    await failing.start()
    # A port nobody listens on: bind one, note it, close it.
    probe = Backend(BackendSpec("gone"))
    await probe.start()
    dead_url = probe.url
    await probe.stop()
    try:
        spec = LoadSpec((failing.url, dead_url), duration_s=2.0, rate=50.0, seed=9)
        _, targets = plan(spec)
        result = await run_load(spec)
    finally:
        await failing.stop()
    _check_accounting(result)
    assert result.errors == {"http_503": targets.count(0), "connect": targets.count(1)}
    assert result.by_backend == {"fails": targets.count(0), NO_BACKEND: targets.count(1)}


@pytest.mark.looptime
async def test_host_header_and_path_reach_the_target() -> None:
    seen: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.host, request.path))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        spec = LoadSpec(
            (f"http://127.0.0.1:{port}",),
            duration_s=1.0,
            rate=20.0,
            host="echo.default.svc",
            path="/api/x",
        )
        result = await run_load(spec)
    finally:
        await runner.cleanup()
    assert result.ok == len(seen) > 0
    assert set(seen) == {("echo.default.svc", "/api/x")}
    assert result.by_backend == {NO_BACKEND: len(seen)}  # no testbed header on this server


@pytest.mark.looptime
async def test_open_loop_sends_on_schedule_while_requests_are_outstanding() -> None:
    # One slot, 1 s per request, 10 requests per second: a closed-loop client would send one
    # request per second; an open-loop one sends them all on time and they pile up.
    backend = Backend(BackendSpec("narrow", Profile.constant(1.0, 1), seed=4))
    await backend.start()
    try:
        spec = LoadSpec((backend.url,), duration_s=3.0, rate=10.0, seed=4, deadline_s=60.0)
        times, _ = plan(spec)
        task = asyncio.create_task(run_load(spec))
        await asyncio.sleep(3.0)
        assert backend.stats().received == len(times)
        assert backend.stats().served < len(times) / 2
        result = await task
    finally:
        await backend.stop()
    _check_accounting(result)
    assert result.ok == len(times)
    assert result.max_outstanding > len(times) / 2
    assert result.send_lag.max_ms <= 0.001
