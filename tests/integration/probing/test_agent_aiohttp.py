"""The aiohttp agent in a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web
from aviator_agent import LoadTracker, setup_aiohttp
from aviator_agent.orca import ORCA_HEADER, parse_orca_header

from tests.integration.probing.servers import aiohttp_server


def make_app(gate: asyncio.Event, entered: list[int]) -> tuple[web.Application, LoadTracker]:
    async def work(request: web.Request) -> web.Response:
        entered.append(1)
        await gate.wait()
        return web.Response(text="done")

    async def fail(request: web.Request) -> web.Response:
        raise RuntimeError("application bug")

    async def busy(request: web.Request) -> web.Response:
        raise web.HTTPServiceUnavailable()

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"chunk")
        return response

    app = web.Application()
    app.router.add_get("/work", work)
    app.router.add_get("/fail", fail)
    app.router.add_get("/busy", busy)
    app.router.add_get("/missing", missing)
    app.router.add_get("/stream", stream)
    tracker = setup_aiohttp(app, tracker=LoadTracker(capacity=50))
    return app, tracker


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll a condition on state another task changes (bounded: fails after 10 s)."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 (the state has no event to wait on)
            await asyncio.sleep(0.005)


async def test_rif_exact_under_concurrency_with_probe_path() -> None:
    gate, entered = asyncio.Event(), []
    app, tracker = make_app(gate, entered)
    n = 30
    async with aiohttp_server(app) as port, aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{port}"

        async def work() -> str:
            async with client.get(f"{base}/work") as r:
                await r.read()
                assert r.status == 200
                return r.headers[ORCA_HEADER]

        requests = [asyncio.create_task(work()) for _ in range(n)]
        await wait_for(lambda: len(entered) == n)
        assert tracker.rif == n
        async with client.get(f"{base}/aviator/probe") as probe:
            assert probe.status == 200
            assert json.loads(await probe.read())["rif"] == n
            report = parse_orca_header(probe.headers[ORCA_HEADER])
        assert report.rif == n
        assert report.application_utilization == pytest.approx(n / 50)
        gate.set()
        headers = await asyncio.gather(*requests)
    assert tracker.rif == 0
    assert all(parse_orca_header(h).rif is not None for h in headers)


async def test_errors_raised_responses_and_streams() -> None:
    gate, entered = asyncio.Event(), []
    app, tracker = make_app(gate, entered)
    async with aiohttp_server(app) as port, aiohttp.ClientSession() as client:
        base = f"http://127.0.0.1:{port}"
        for path, status in (("/fail", 500), ("/busy", 503), ("/missing", 404), ("/nope", 404)):
            async with client.get(base + path) as r:
                assert r.status == status
                if path != "/fail":  # raised HTTP responses carry the report too
                    assert ORCA_HEADER in r.headers
        async with client.get(base + "/stream") as r:
            assert await r.read() == b"chunk"
    assert tracker.rif == 0
    report = tracker.report()
    # Completed: fail, busy, missing, nope, stream = 5; errors: fail and busy only.
    assert report.eps == pytest.approx(report.rps_fractional * 2 / 5)


async def test_client_disconnect_cancels_the_handler_without_leaking_rif() -> None:
    gate, entered = asyncio.Event(), []
    app, tracker = make_app(gate, entered)
    async with aiohttp_server(app, handler_cancellation=True) as port:
        client = aiohttp.ClientSession()
        requests = [
            asyncio.create_task(client.get(f"http://127.0.0.1:{port}/work")) for _ in range(4)
        ]
        await wait_for(lambda: len(entered) == 4)
        assert tracker.rif == 4
        for r in requests:
            r.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
        await client.close()  # the connections drop: aiohttp cancels the handlers
        await wait_for(lambda: tracker.rif == 0)
    assert tracker.rif == 0
