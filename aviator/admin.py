"""Aviator's own admin HTTP server: health, readiness, Prometheus metrics and JSON debug views.

The server knows nothing about the control plane: it is given a readiness function and named
views (callables returning JSON-able values), so it is tested on its own and the composition
root decides what is shown. The same goes for metrics: :class:`ScrapeCollector` turns a
callable into metric families computed at scrape time, and :func:`add_process_metrics` puts
prometheus_client's process, platform and GC collectors on the (private) registry.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import prometheus_client
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.metrics_core import Metric

ReadyCheck = Callable[[], tuple[bool, list[str]]]
View = Callable[[], Any]

log = structlog.get_logger(__name__)

_ExcInfo = (
    bool
    | BaseException
    | tuple[type[BaseException], BaseException, TracebackType | None]
    | tuple[None, None, None]
    | None
)


class ScrapeCollector:
    """Metric families computed when ``/metrics`` is read, from ``families()``.

    For values the control plane already holds (problems, per-endpoint weights): computed
    from the current state at each scrape, a series that no longer exists is simply not
    there, with no gauge to keep in step or forget. ``families()`` runs on the event loop
    (the admin handler calls ``generate_latest`` there) and must be quick.
    """

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def describe(self) -> Iterable[Metric]:
        return []  # names are not checked for clashes: families carry aviator_ names only


def add_process_metrics(registry: prometheus_client.CollectorRegistry) -> None:
    """``process_*`` (CPU, memory, file descriptors, start time), ``python_info`` and
    ``python_gc_*`` on ``registry`` (prometheus_client registers them only on its global one)."""
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)


class _ServerLog(logging.Logger):
    """What aiohttp's request handler logs, as structured lines.

    aiohttp logs a request it cannot parse (garbage, TLS on this plain port, a bad header)
    with ``logger.exception``: a multi-line traceback of its own parser, outside structlog,
    for every scanner or misconfigured health check. Such a request is the client's fault and
    aiohttp already answered it 400: here it is one line. Anything else (a view that raised)
    is a bug in Aviator and keeps its traceback, in the structured log.
    """

    def __init__(self) -> None:
        super().__init__("aviator.admin.http", logging.DEBUG)

    def _log(  # the signature of logging.Logger._log
        self,
        level: int,
        msg: object,
        args: Any,
        exc_info: _ExcInfo = None,
        extra: Mapping[str, object] | None = None,
        stack_info: bool = False,
        stacklevel: int = 1,
    ) -> None:
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            reason = str(exc.message).strip().splitlines()
            log.info(
                "admin: bad request",
                peer=args[0] if args else None,
                status=exc.code,
                reason=reason[0].rstrip(":") if reason else None,
            )
            return
        text = str(msg) % args if args else str(msg)
        if level >= logging.ERROR:
            log.error(f"admin: {text}", exc_info=exc_info or False)
        elif level >= logging.WARNING:
            log.warning(f"admin: {text}")
        else:
            log.debug(f"admin: {text}")


class AdminServer:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/debug/<view>`` on one aiohttp site."""

    def __init__(
        self,
        *,
        registry: prometheus_client.CollectorRegistry,
        ready: ReadyCheck,
        views: Mapping[str, View],
        debug: bool = True,
    ) -> None:
        """``debug=False``: no ``/debug/*`` route at all (``aviator run --no-debug-views``);
        the views show pod addresses, node ids and specs, which a shared network may not
        need to see."""
        self._registry = registry
        self._ready = ready
        self._views = dict(views) if debug else {}
        self._debug = debug
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        if self._debug:
            app.router.add_get("/debug/{view}", self._view)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); return the bound port."""
        self._runner = web.AppRunner(self._app(), access_log=None, logger=_ServerLog())
        await self._runner.setup()
        # Bind the socket ourselves so the bound port is known without aiohttp internals.
        sock = socket.create_server((host, port), reuse_port=False)
        await web.SockSite(self._runner, sock).start()
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _index(self, _: web.Request) -> web.Response:
        links = ["/healthz", "/readyz", "/metrics", *(f"/debug/{v}" for v in sorted(self._views))]
        return web.json_response({"endpoints": links})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, reasons = self._ready()
        body = "ok\n" if ok else "not ready: " + "; ".join(reasons) + "\n"
        return web.Response(status=200 if ok else 503, text=body)

    async def _metrics(self, _: web.Request) -> web.Response:
        data = prometheus_client.generate_latest(self._registry)
        content_type = prometheus_client.CONTENT_TYPE_LATEST
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def _view(self, request: web.Request) -> web.Response:
        name = request.match_info["view"]
        view = self._views.get(name)
        if view is None:
            return web.json_response(
                {"error": f"no view {name!r}", "views": sorted(self._views)}, status=404
            )
        return web.json_response(view(), dumps=lambda v: json.dumps(v, indent=2, default=str))
