"""aiohttp middleware: Prequal's server half for an ``aiohttp.web`` application.

``setup_aiohttp(app)`` installs it as the outermost middleware. Needs aiohttp (the
``aviator-agent[aiohttp]`` extra, or the aiohttp your app already has); importing this module
does not import aiohttp, calling :func:`aiohttp_middleware` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aviator_agent.orca import ORCA_HEADER
from aviator_agent.tracker import DEFAULT_PROBE_PATH, LoadTracker

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Handler, Middleware

__all__ = ["aiohttp_middleware", "setup_aiohttp"]


def aiohttp_middleware(
    tracker: LoadTracker, *, probe_path: str | None = DEFAULT_PROBE_PATH
) -> Middleware:
    """An aiohttp middleware doing what :class:`AviatorASGIMiddleware` does.

    Headers are added only to responses not yet prepared (a streaming handler that called
    ``prepare()`` itself has sent its headers already); RIF and latency count either way.
    """
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == probe_path and request.method in ("GET", "HEAD"):
            return web.Response(
                body=tracker.probe_body(),
                content_type="application/json",
                headers={ORCA_HEADER: tracker.header_value(), "Cache-Control": "no-store"},
            )
        with tracker.track() as ticket:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                # Raised responses (404, 503 …) are responses: status decides if it is an error.
                ticket.error = exc.status >= 500
                exc.headers[ORCA_HEADER] = tracker.header_value()
                raise
            ticket.error = response.status >= 500
            if not response.prepared:
                response.headers[ORCA_HEADER] = tracker.header_value()
            return response

    return middleware


def setup_aiohttp(
    app: web.Application,
    *,
    tracker: LoadTracker | None = None,
    probe_path: str | None = DEFAULT_PROBE_PATH,
) -> LoadTracker:
    """Install the agent as ``app``'s outermost middleware; returns its tracker."""
    tracker = tracker or LoadTracker()
    app.middlewares.insert(0, aiohttp_middleware(tracker, probe_path=probe_path))
    return tracker
