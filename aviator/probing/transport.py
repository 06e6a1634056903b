"""How a probe reaches a pod: one keep-alive HTTP/1.1 connection per target.

A probe is one ``GET`` whose answer is a status and a few headers, sent every interval to
every pod: with 10,000 pods it is the control plane's most frequent piece of work, and what
it keeps per pod is most of what the garbage collector walks. So the default transport is a
small :class:`asyncio.Protocol` (one socket, one parser, a few fields per target) with
responses parsed by ``httptools`` (Node's llhttp, the parser uvicorn uses), not an aiohttp
``ClientSession`` per target (a connector, its pool, timers and a cookie jar each). Measured
in one run (``aviator bench probe``, docs/benchmarks/probe.md and source.md): the CPU per probe
and the objects per target both fell, and with them the full collections that stalled the
loop for a second at 10,000 targets.

Bounds, whatever the pod sends (issue 14): at most :data:`MAX_RESPONSE_HEADERS` headers, each
line at most :data:`MAX_LINE` bytes (aiohttp's limits, and what kubelet allows is smaller); a
body of at most :data:`MAX_RESPONSE_BODY` bytes, declared or read, drained and discarded;
bytes that are not HTTP fail the probe. Anything unexpected (bytes before a request, an
answer cut short, an upgrade) closes the connection; the next probe opens a new one. The
prober enforces the timeout around :meth:`HttpProbeTransport.get`: a cancelled probe closes
its connection, whose state is then unknown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import httptools

from aviator.probing.results import ProbeTarget

__all__ = [
    "MAX_LINE",
    "MAX_RESPONSE_BODY",
    "MAX_RESPONSE_HEADERS",
    "HttpProbeTransport",
    "ProbeConnectError",
    "ProbeResponse",
    "ProbeResponseError",
    "ProbeTransport",
    "TransportFactory",
    "http_transport_factory",
]

#: A probe answer's body is read (and discarded) up to this many bytes; a longer one fails the
#: probe. The agent answers ``ok``; 64 KiB leaves room for a health page (kubelet reads 10 KB).
MAX_RESPONSE_BODY = 64 * 1024
#: Headers of a probe answer (aiohttp's limit since 3.13.4).
MAX_RESPONSE_HEADERS = 128
#: The longest status or header line of a probe answer, in bytes (aiohttp's limit).
MAX_LINE = 8190
_INVALID = "not a valid HTTP response"
_LONG_LINE = f"{_INVALID}: a line longer than {MAX_LINE} bytes"


class ProbeConnectError(Exception):
    """The transport could not reach the endpoint (refused, reset, unreachable)."""


class ProbeResponseError(Exception):
    """The endpoint answered, but not with a small HTTP response (bytes that are not HTTP,
    headers over the limits, a body over :data:`MAX_RESPONSE_BODY`)."""


class ProbeResponse:
    """What a transport returns: the status and the response headers, names lowercase (the
    ORCA parser looks them up case-insensitively; a repeated header keeps its first value)."""

    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers


class ProbeTransport(Protocol):
    """How one target is reached. One transport per target, used by one task at a time.

    ``get`` raises :class:`ProbeConnectError` when the endpoint cannot be reached and any
    other exception for anything else; the prober enforces the timeout around it.
    """

    async def get(self, target: ProbeTarget) -> ProbeResponse: ...

    async def aclose(self) -> None: ...


TransportFactory = Callable[[ProbeTarget], ProbeTransport]


class _Connection(asyncio.Protocol):
    """One socket to a pod and the parser of its answers; one request at a time.

    The parser's callbacks record what they see; a violation is kept in ``_error`` (raising
    inside httptools' callbacks would only come back wrapped) and ends the exchange after the
    bytes at hand are fed."""

    __slots__ = (
        "_body",
        "_count",
        "_done",
        "_error",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_line",
        "_max_body",
        "_parser",
        "_status",
        "_until_eof",
        "_waiter",
        "closed",
        "reusable",
        "transport",
    )

    def __init__(self, max_body: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self._max_body = max_body
        self._waiter: asyncio.Future[ProbeResponse] | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self._headers: dict[str, str] = {}
        self._status = 0
        self._count = 0  # headers read (a repeated name counts each time)
        self._line = 0  # bytes of the line being read, while the headers last
        self._body = 0
        self._headers_done = False
        self._until_eof = False
        self._done = False
        self._keep_alive = False
        self._error: Exception | None = None

    # -- the exchange ------------------------------------------------------------------------

    async def request(self, data: bytes) -> ProbeResponse:
        assert self.transport is not None
        assert self._waiter is None
        self.reusable = False
        self._reset()
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            response: ProbeResponse = await waiter
        finally:
            self._waiter = None
        return response

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    def _finish(self, result: ProbeResponse | Exception) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if isinstance(result, Exception):
            self.close()  # mid-answer: the connection's state is unknown
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._headers_done and self._until_eof and self._error is None:
            # A body without a length ends with the connection: that is the answer.
            self._finish(ProbeResponse(self._status, self._headers))
        elif self._headers_done:
            self._finish(ProbeResponseError("a broken response body: the answer was cut short"))
        else:
            detail = f"{type(exc).__name__}: {exc}" if exc else "the server closed the connection"
            self._finish(ProbeConnectError(detail))

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the next answer could not be told from them.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._error = self._error or ProbeResponseError(f"{_INVALID}: it asks for an upgrade")
        except httptools.HttpParserError as exc:
            self._error = self._error or ProbeResponseError(f"{_INVALID}: {exc}")
        if not self._headers_done and self._error is None:
            # httptools buffers a header until its line ends: bound the line as it comes (by
            # one read, at most, past the limit).
            end = data.rfind(b"\n")
            self._line = self._line + len(data) if end < 0 else len(data) - end - 1
            if self._line > MAX_LINE + 2:
                self._error = ProbeResponseError(_LONG_LINE)
        if self._error is not None:
            self._finish(self._error)
        elif self._done:
            self.reusable = not self.closed and self._keep_alive
            self._finish(ProbeResponse(self._status, self._headers))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost decides what the answer was

    # -- httptools callbacks -----------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        if len(status) > MAX_LINE:
            self._error = self._error or ProbeResponseError(_LONG_LINE)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._error is not None:
            return
        if len(name) + len(value) + 2 > MAX_LINE:
            self._error = ProbeResponseError(_LONG_LINE)
        elif self._count >= MAX_RESPONSE_HEADERS:
            self._error = ProbeResponseError(
                f"{_INVALID}: more than {MAX_RESPONSE_HEADERS} headers"
            )
        else:
            self._count += 1
            self._headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self._parser.get_status_code()
        headers = self._headers
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body:
            self._error = self._error or ProbeResponseError(
                f"the response declares a body of {declared} bytes; a probe reads "
                f"at most {self._max_body}"
            )
        self._until_eof = (
            declared is None and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body += len(body)
        if self._body > self._max_body and self._error is None:
            self._error = ProbeResponseError(
                f"the response body is longer than {self._max_body} bytes; "
                "a probe answer must be small"
            )

    def on_message_complete(self) -> None:
        self._done = True
        self._keep_alive = self._parser.should_keep_alive()  # read here: the parser resets


class HttpProbeTransport:
    """``GET http://<ip>:<port><path>`` over one keep-alive connection, opened on the first
    probe and again after the pod closed it or an answer broke it."""

    __slots__ = ("_conn", "_max_body", "_request", "_request_for", "_user_agent")

    def __init__(self, *, user_agent: str = "aviator-prober", max_body: int = MAX_RESPONSE_BODY):
        if max_body < 0:
            raise ValueError(f"max_body must be >= 0, got {max_body}")
        self._user_agent = user_agent
        self._max_body = max_body
        self._conn: _Connection | None = None
        self._request = b""
        self._request_for: tuple[str, int, str] | None = None

    def _request_bytes(self, target: ProbeTarget) -> bytes:
        key = (target.ip, target.port, target.path)
        if key != self._request_for:  # built once per target, not per probe
            host = f"[{target.ip}]" if ":" in target.ip else target.ip
            self._request = (
                f"GET {target.path} HTTP/1.1\r\nHost: {host}:{target.port}\r\n"
                f"User-Agent: {self._user_agent}\r\nAccept: */*\r\n\r\n"
            ).encode("ascii")
            self._request_for = key
        return self._request

    async def get(self, target: ProbeTarget) -> ProbeResponse:
        request = self._request_bytes(target)
        conn = self._conn
        if conn is None or not conn.reusable:
            if conn is not None:
                conn.close()
            self._conn = None
            max_body = self._max_body
            try:
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: _Connection(max_body), target.ip, target.port
                )
            except OSError as exc:
                raise ProbeConnectError(
                    f"cannot connect to {target.ip}:{target.port}: {exc.strerror or exc}"
                ) from None
            self._conn = conn
        try:
            return await conn.request(request)
        except BaseException:
            conn.close()  # timed out or failed mid-answer: never reused
            self._conn = None
            raise

    async def aclose(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def http_transport_factory(
    *, user_agent: str = "aviator-prober", max_body: int = MAX_RESPONSE_BODY
) -> TransportFactory:
    """A :class:`HttpProbeTransport` per target (each target's connection closes with it)."""
    if max_body < 0:
        raise ValueError(f"max_body must be >= 0, got {max_body}")

    def factory(target: ProbeTarget) -> ProbeTransport:
        return HttpProbeTransport(user_agent=user_agent, max_body=max_body)

    return factory
