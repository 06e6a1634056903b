"""Aviator's agent: Prequal's server half, for your own app.

It counts requests in flight (RIF), keeps recent latencies by RIF, and reports both in the
ORCA ``endpoint-load-metrics`` header on every response and at the probe path
(``/aviator/probe``), where Aviator's control plane (or Envoy's client-side weighted round
robin) reads them. The standard library only; the aiohttp middleware needs aiohttp, which
your app has already.

- :class:`AviatorASGIMiddleware` (:mod:`aviator_agent.asgi`): any ASGI app.
- :func:`setup_aiohttp` / :func:`aiohttp_middleware` (:mod:`aviator_agent.aiohttp`).
- :class:`LoadTracker` (:mod:`aviator_agent.tracker`): the counters, for other servers.
- :mod:`aviator_agent.orca`: the header's format and parser (TEXT, JSON, BIN).
"""

from __future__ import annotations

from aviator_agent.aiohttp import aiohttp_middleware, setup_aiohttp
from aviator_agent.asgi import ASGIApp, AviatorASGIMiddleware
from aviator_agent.tracker import DEFAULT_PROBE_PATH, LoadTracker, RequestTicket

__all__ = [
    "DEFAULT_PROBE_PATH",
    "ASGIApp",
    "AviatorASGIMiddleware",
    "LoadTracker",
    "RequestTicket",
    "__version__",
    "aiohttp_middleware",
    "setup_aiohttp",
]

__version__ = "0.1.0"
