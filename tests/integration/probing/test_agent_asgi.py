"""The ASGI agent under a real uvicorn on loopback: exact RIF, ORCA on every response,
the probe path, no leaked count on error or cancellation."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aviator_agent import AviatorASGIMiddleware, LoadTracker
from aviator_agent.orca import ORCA_HEADER, parse_orca_header

from tests.integration.probing.servers import uvicorn_server


class GatedApp:
    """``/work`` blocks until the gate opens; ``/fail`` raises; ``/busy`` answers 503."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.all_entered = asyncio.Event()
        self.expected = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/fail":
            raise RuntimeError("application bug")
        status = 503 if path == "/busy" else 200
        if path == "/work":
            self.entered += 1
            if self.entered >= self.expected:
                self.all_entered.set()
            await self.gate.wait()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def test_rif_is_exact_under_concurrency_and_reported_everywhere() -> None:
    app = GatedApp()
    tracker = LoadTracker(capacity=100)
    n = 25
    app.expected = n
    async with uvicorn_server(AviatorASGIMiddleware(app, tracker=tracker)) as port:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:

            async def work() -> tuple[int, str]:
                async with client.get(f"{base}/work") as r:
                    await r.read()
                    return r.status, r.headers[ORCA_HEADER]

            requests = [asyncio.create_task(work()) for _ in range(n)]
            async with asyncio.timeout(10):
                await app.all_entered.wait()
            assert tracker.rif == n
            async with client.get(f"{base}/aviator/probe") as probe:
                assert probe.status == 200
                body = json.loads(await probe.read())
                report = parse_orca_header(probe.headers[ORCA_HEADER])
            assert body["rif"] == n  # the probe itself is not counted
            assert report.rif == n
            assert report.application_utilization == pytest.approx(n / 100)
            app.gate.set()
            results = await asyncio.gather(*requests)
        assert tracker.rif == 0
        assert {status for status, _ in results} == {200}
        # Each response reported the RIF when its headers went out, itself included.
        assert all(1 <= parse_orca_header(h).rif <= n for _, h in results)  # type: ignore[operator]
        assert tracker.latency_estimate_s() is not None


async def test_errors_and_5xx_do_not_leak_rif_and_count_as_errors() -> None:
    app = GatedApp()
    tracker = LoadTracker()
    async with uvicorn_server(AviatorASGIMiddleware(app, tracker=tracker)) as port:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:
            for path in ("/fail", "/busy", "/fail"):
                async with client.get(base + path) as r:
                    assert r.status in (500, 503)
            async with client.get(base + "/ok") as r:
                assert r.status == 200
                assert ORCA_HEADER in r.headers
            async with client.head(base + "/aviator/probe") as r:
                assert r.status == 200
                assert parse_orca_header(r.headers[ORCA_HEADER]).rif == 0
    assert tracker.rif == 0
    report = tracker.report()
    assert report.eps > 0
    assert report.eps == pytest.approx(report.rps_fractional * 3 / 4)


async def test_cancelled_requests_do_not_leak_rif() -> None:
    app = GatedApp()
    app.expected = 3
    tracker = LoadTracker()
    # Graceful shutdown of 0.2 s: uvicorn then cancels the three requests still blocked.
    async with uvicorn_server(AviatorASGIMiddleware(app, tracker=tracker), graceful_s=0.2) as port:
        client = aiohttp.ClientSession()
        requests = [
            asyncio.create_task(client.get(f"http://127.0.0.1:{port}/work")) for _ in range(3)
        ]
        async with asyncio.timeout(10):
            await app.all_entered.wait()
        assert tracker.rif == 3
    assert tracker.rif == 0
    for r in requests:
        r.cancel()
    await asyncio.gather(*requests, return_exceptions=True)
    await client.close()


async def test_direct_cancellation_and_pass_through_scopes() -> None:
    app = GatedApp()
    app.expected = 1
    tracker = LoadTracker()
    middleware = AviatorASGIMiddleware(app, tracker=tracker)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "path": "/work", "method": "GET", "headers": []}
    task = asyncio.create_task(middleware(scope, receive, send))
    await app.all_entered.wait()
    assert tracker.rif == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracker.rif == 0

    seen: list[str] = []

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await AviatorASGIMiddleware(lifespan_app, tracker=tracker)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]
    assert tracker.rif == 0
