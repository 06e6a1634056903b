"""ASGI middleware: Prequal's server half for Starlette, FastAPI, Django (ASGI), Quart...

``app = AviatorASGIMiddleware(app)``: every HTTP response then carries the
``endpoint-load-metrics`` header, and the probe path (default ``/aviator/probe``) answers
``200`` with the same header and a small JSON body, without reaching the application.
No dependency: ASGI is a calling convention.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aviator_agent.orca import ORCA_HEADER
from aviator_agent.tracker import DEFAULT_PROBE_PATH, LoadTracker

__all__ = ["ASGIApp", "AviatorASGIMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AviatorASGIMiddleware:
    """ASGI middleware: tracks RIF and latency of ``app``'s HTTP requests, adds the ORCA
    header to every response and answers the probe path itself. Lifespan and websocket
    scopes pass through untouched."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tracker: LoadTracker | None = None,
        probe_path: str | None = DEFAULT_PROBE_PATH,
    ) -> None:
        self.app = app
        self.tracker = tracker or LoadTracker()
        self.probe_path = probe_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracker = self.tracker
        if scope["path"] == self.probe_path and scope["method"] in ("GET", "HEAD"):
            await self._answer_probe(scope, send)
            return
        with tracker.track() as ticket:

            async def send_with_report(message: Message) -> None:
                if message["type"] == "http.response.start":
                    ticket.error = message["status"] >= 500
                    headers = list(message.get("headers", ()))
                    headers.append((ORCA_HEADER.encode(), tracker.header_value().encode()))
                    message = {**message, "headers": headers}
                await send(message)

            await self.app(scope, receive, send_with_report)

    async def _answer_probe(self, scope: Scope, send: Send) -> None:
        body = self.tracker.probe_body()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    (ORCA_HEADER.encode(), self.tracker.header_value().encode()),
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )
