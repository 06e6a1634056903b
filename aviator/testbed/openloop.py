"""The open loop: every request of a planned timeline sent at its intended time.

One mechanism for every load Aviator's tools offer (the testbed's load generator,
:mod:`aviator.testbed.loadgen`, and ``aviator demo``'s live load, :mod:`aviator.demo.session`):

- the arrival times come from :func:`~aviator.testbed.loadspec.plan` (Poisson, seeded, fixed
  before the run);
- each request starts at its intended time whatever is still outstanding (never "send the
  next when one returns", which lets a slow server slow the load down and hide its tail);
- its latency runs from the *intended* time, so a generator running late counts against the
  result; a request not answered ``deadline_s`` after its intended time is a ``timeout``;
- how each request ended is one of a small vocabulary (:func:`error_kind`): ``None`` for a 2xx
  answer, ``http_<status>``, ``timeout``, ``connect``, ``disconnected``, ``client_<Error>``,
  ``other_<Error>``.

What is made of the requests is the caller's: an :class:`Observer` hears of each send and
each end (the load generator fills histograms, the demo keeps a list for its live table).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Mapping
from typing import Protocol

import aiohttp

from aviator.testbed.backend import BACKEND_HEADER
from aviator.testbed.loadspec import LoadSpec, plan

__all__ = ["Observer", "error_kind", "offer", "raise_fd_limit"]

# Behind schedule, the sender yields to the loop every this many requests, so that responses
# are still read (and their latencies recorded) while it catches up.
_YIELD_EVERY = 32
_KEEPALIVE_S = 60.0


class Observer(Protocol):
    """Hears of every request of an open-loop run (called on the loop's thread, in order)."""

    def on_sent(self, offset: float, lag: float, actual: float) -> None:
        """The request planned at ``offset`` s was sent ``lag`` s late, at loop time ``actual``."""

    def on_done(
        self, offset: float, latency: float, error: str | None, backend: str | None
    ) -> None:
        """It ended ``latency`` s (>= 0) after its intended time; ``error`` None for a 2xx answer;
        ``backend`` the testbed backend that answered (its ``x-testbed-backend``), if any."""


def error_kind(exc: BaseException) -> str:
    """The kind of a request that failed with ``exc`` (an aiohttp or OS error)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(exc, aiohttp.ClientError):
        return "client_" + type(exc).__name__
    return "other_" + type(exc).__name__


async def offer(spec: LoadSpec, observer: Observer, *, t0: float | None = None) -> int:
    """Send every request of ``spec``'s timeline, offset 0 at loop time ``t0`` (default now),
    and tell ``observer``; return the most requests outstanding at once.

    Returns when every request has ended: each ends by its deadline, so at most
    ``spec.deadline_s`` after the last arrival. Cancelled, it cancels the requests still
    outstanding (the observer hears nothing more of them) and closes its connections.
    """
    loop = asyncio.get_running_loop()
    times, target_idx = plan(spec)
    urls = [t.rstrip("/") + spec.path for t in spec.targets]
    headers: Mapping[str, str] = {"Host": spec.host} if spec.host else {}
    outstanding: set[asyncio.Task[None]] = set()
    max_outstanding = 0
    connector = aiohttp.TCPConnector(
        limit=spec.connection_limit, limit_per_host=0, keepalive_timeout=_KEEPALIVE_S
    )
    # No aiohttp timeout: the deadline (from the intended time) is enforced around each request.
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
    )

    async def one(offset: float, intended: float, url: str) -> None:
        sent = loop.time()
        observer.on_sent(offset, sent - intended, sent)
        error: str | None = None
        backend: str | None = None
        try:
            async with (
                asyncio.timeout_at(intended + spec.deadline_s),
                session.get(url, headers=headers) as resp,
            ):
                await resp.read()
                backend = resp.headers.get(BACKEND_HEADER)
                if not 200 <= resp.status < 300:
                    error = f"http_{resp.status}"
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = error_kind(exc)
        # A timer may fire up to the clock's resolution early: never a negative latency.
        observer.on_done(offset, max(loop.time() - intended, 0.0), error, backend)

    try:
        start = loop.time() if t0 is None else t0
        for i, offset in enumerate(times):
            intended = start + offset
            delay = intended - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)  # behind schedule: still let responses be read
            task = asyncio.create_task(one(offset, intended, urls[target_idx[i]]))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            max_outstanding = max(max_outstanding, len(outstanding))
        if outstanding:
            await asyncio.gather(*outstanding)
    finally:
        for task in outstanding:
            task.cancel()
        await asyncio.gather(*outstanding, return_exceptions=True)
        await session.close()
    return max_outstanding


def raise_fd_limit() -> None:
    """Raise this process's soft limit of open files to the hard one.

    Each outstanding request holds a socket, and they pile up when a backend stalls: the
    default soft limit (often 1024) is too low for an open loop. Best effort.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
