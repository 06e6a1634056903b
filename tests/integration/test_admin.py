from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import prometheus_client
import pytest

from aviator import log as aviator_log
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


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)),  # TLS on the plain port
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nBad Header Name: 1\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",  # a request line over aiohttp's limit
    ],
    ids=["tls", "binary", "content-length", "header-name", "long-line"],
)
async def test_a_bad_request_is_one_log_line_without_a_traceback(
    garbage: bytes, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    aviator_log.configure("debug")
    caplog.set_level(logging.DEBUG)  # stdlib records (aiohttp's own logger) land here
    server = AdminServer(
        registry=prometheus_client.CollectorRegistry(), ready=lambda: (True, []), views={}
    )
    port = await server.start("127.0.0.1", 0)
    try:
        for _ in range(2):  # the first request on a connection and a later one
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" if _ else b"")
            writer.write(garbage)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert b" 400 " in answer.split(b"\r\n", 1)[0] or b" 400 " in answer, answer[:200]
    finally:
        await server.stop()
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 2, text  # one line per bad request
    assert all("admin: bad request" in ln and "status=400" in ln for ln in lines), text


async def test_a_view_that_raises_is_a_500_logged_with_its_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    aviator_log.configure("info")

    def broken() -> None:
        raise RuntimeError("view bug")

    server = AdminServer(
        registry=prometheus_client.CollectorRegistry(),
        ready=lambda: (True, []),
        views={"broken": broken},
    )
    port = await server.start("127.0.0.1", 0)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/debug/broken") as r,
        ):
            assert r.status == 500
    finally:
        await server.stop()
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert "[error" in first, err
    assert "admin: Error handling request" in first, err
    assert "RuntimeError: view bug" in err  # a bug in Aviator keeps its traceback
