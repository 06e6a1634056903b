"""Waiting for an ``aviator run`` process's admin port to answer ``/readyz`` 200."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest


async def wait_ready(
    http: aiohttp.ClientSession, admin_port: int, *, within_s: float = 20.0, every_s: float = 0.05
) -> None:
    """Poll ``/readyz`` on 127.0.0.1:``admin_port`` until it answers 200; fail the test after
    ``within_s`` (a process that is still starting refuses connections: that is polled too)."""
    url = f"http://127.0.0.1:{admin_port}/readyz"
    for _ in range(max(1, round(within_s / every_s))):
        try:
            async with http.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(every_s)
    pytest.fail(f"aviator run never became ready ({url} within {within_s:g} s)")
