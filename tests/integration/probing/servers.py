"""Real servers on loopback for the probing integration tests (random free ports)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from aiohttp import web
from aviator_agent import ASGIApp


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@asynccontextmanager
async def uvicorn_server(app: ASGIApp, *, graceful_s: float | None = None) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on 127.0.0.1 (a free port, yielded) in this event loop."""
    sock = free_socket()
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=graceful_s,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            # uvicorn exposes only a flag, no event, for "listening".
            while not server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def aiohttp_server(
    app: web.Application, host: str = "127.0.0.1", **runner_kwargs: object
) -> AsyncIterator[int]:
    """Serve ``app`` on ``host`` at a free port (yielded); cleaned up on exit."""
    runner = web.AppRunner(app, **runner_kwargs)  # type: ignore[arg-type]
    await runner.setup()
    sock = free_socket(host)
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield sock.getsockname()[1]
    finally:
        await runner.cleanup()
        sock.close()
