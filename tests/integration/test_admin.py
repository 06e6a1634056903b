from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import prometheus_client
import pytest

from aviator.admin import AdminServer


@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, list[bool]]]:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("aviator_test_total", "a test counter", registry=registry)
    counter.inc(3)
    state = [False]
    server = AdminServer(
        registry=registry,
        ready=lambda: (state[0], [] if state[0] else ["source not synced"]),
        views={"policies": lambda: [{"name": "web", "weight": 7}]},
    )
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        await server.stop()


async def test_health_readiness_metrics_and_views(admin: tuple[str, list[bool]]) -> None:
    base, state = admin
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 503
            assert "source not synced" in await r.text()
        state[0] = True
        async with http.get(f"{base}/readyz") as r:
            assert r.status == 200
        async with http.get(f"{base}/metrics") as r:
            assert "aviator_test_total 3.0" in await r.text()
        async with http.get(f"{base}/debug/policies") as r:
            assert await r.json() == [{"name": "web", "weight": 7}]
        async with http.get(f"{base}/debug/nope") as r:
            assert r.status == 404
            assert (await r.json())["views"] == ["policies"]
        async with http.get(f"{base}/") as r:
            assert "/debug/policies" in (await r.json())["endpoints"]
