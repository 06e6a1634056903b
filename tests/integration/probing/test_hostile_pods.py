"""Hostile pods against the real prober (issue 14): real sockets on 127.0.0.x, real aiohttp.

A pod that hangs, resets the connection, answers byte by byte, or answers with bytes that
are not HTTP, a huge header, too many headers, a huge declared body or an endless one sits
next to three healthy pods (aiohttp apps with the probing agent). For each:

- every probe of the hostile pod fails, with the expected outcome, within its timeout (plus
  a generous margin for a loaded machine), and reads at most a few MiB from it (the pod's
  own count of bytes it got into the socket; an endless body was read at 140 MB/s before the
  body cap), over at most two connections at a time, all closed at the end;
- the failure is reported once ("probe target failing" with the outcome and a detail of at
  most ``MAX_DETAIL`` printable characters: the pod's bytes never reach the log raw);
- the estimator and the weigher floor it (the one hot endpoint), and the healthy pods keep
  ordinary weights;
- the healthy pods' probes all succeed and keep their cadence (no gap of ten intervals).

Real time (sockets cannot run on fake loop time): short intervals, conditions waited for
with an upper bound, and timing bounds far above what the code needs.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import socket
import statistics
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
import structlog
from aiohttp import web
from aviator_agent import setup_aiohttp

from aviator.model import MAX_WEIGHT, EndpointAddress, Health, WeigherKnobs
from aviator.probing.estimator import Estimator
from aviator.probing.prober import MAX_DETAIL, Prober, bounded_detail
from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.transport import MAX_RESPONSE_BODY
from aviator.probing.weigher import weigh
from tests.integration.probing.servers import aiohttp_server

INTERVAL_S = 0.1
TIMEOUT_S = 0.3
# Margins for a machine shared with other test runs: far above what the prober needs.
LATE_S = 0.5  # a probe may end this long after its timeout
MAX_GAP_S = 10 * INTERVAL_S  # the longest gap between two probes of a healthy pod
MAX_READ = 8 * 1024 * 1024  # bytes a hostile pod may get into one connection
HEALTHY = ("127.0.0.61", "127.0.0.62", "127.0.0.63")
HOSTILE = "127.0.0.64"
REQUEST_END = b"\r\n\r\n"

Writer = Callable[[asyncio.StreamWriter], Awaitable[None]]


@dataclass
class HostilePod:
    """An asyncio server that reads each request and then does ``behaviour`` to the client.

    Counts the bytes it got into each connection (``sent``) and the most connections open
    at once; every handler ends when the client goes (or at :meth:`stop`)."""

    behaviour: Callable[[HostilePod, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    sent: list[int] = field(default_factory=list)
    open_now: int = 0
    open_max: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self, host: str) -> int:
        self._server = await asyncio.start_server(self._handle, host, 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()  # each handler then ends on its own
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def closed(self) -> None:
        """Wait (at most 5 s) until the client has closed every connection."""
        async with asyncio.timeout(5):
            while self.open_now:  # noqa: ASYNC110 (a handler notices at its next read or write)
                await asyncio.sleep(0.01)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        self.sent.append(0)
        try:
            await reader.readuntil(REQUEST_END)
            await self.behaviour(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the prober gave up on this connection
        finally:
            self.open_now -= 1
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` and wait until the socket took it (raises once the client left)."""
        if writer.transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        writer.write(data)
        await writer.drain()
        self.sent[-1] += len(data)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Read (and drop) whatever the client sends until it closes the connection."""
    while await reader.read(65536):
        pass


async def hang(pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await until_closed(reader)  # accepts, reads the request, never answers


async def reset(pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()  # linger 0: the close is a TCP RST


async def byte_by_byte(
    pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: slowloris\r\n\r\nok"
    for i in range(len(answer)):
        await pod.write(w, answer[i : i + 1])
        await asyncio.sleep(0.05)  # 56 bytes: 2.8 s, far past the timeout
    await until_closed(reader)


# Terminal escapes, NULs, a fake log line: none of it may reach a log line as it is.
GARBAGE = b"\x1b[2J\x00\xff\xfe INFO fake log line\r\n" + random.Random(14).randbytes(4096)


async def garbage(pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await pod.write(w, GARBAGE)
    await until_closed(reader)


async def stream(pod: HostilePod, w: asyncio.StreamWriter, head: bytes, chunk: bytes) -> None:
    """``head``, then ``chunk`` again and again, as fast as the client takes it."""
    await pod.write(w, head)
    while True:
        await pod.write(w, chunk)


async def huge_header(
    pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    await stream(pod, w, b"HTTP/1.1 200 OK\r\nX-Huge: ", b"a" * 65536)


async def many_headers(
    pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    line = b"X-Many: " + b"m" * 4000 + b"\r\n"
    await stream(pod, w, b"HTTP/1.1 200 OK\r\n", line * 16)


async def declared_huge_body(
    pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n"
    await stream(pod, w, head, b"b" * 65536)


async def endless_body(
    pod: HostilePod, reader: asyncio.StreamReader, w: asyncio.StreamWriter
) -> None:
    chunk = b"%x\r\n%s\r\n" % (65536, b"e" * 65536)
    await stream(pod, w, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunk)


# behaviour, the outcome of every probe of it, and a word the reported detail must contain.
CASES = {
    "hang": (hang, ProbeOutcome.TIMEOUT, "timed out"),
    "reset": (reset, ProbeOutcome.CONNECT_ERROR, ""),
    "byte-by-byte": (byte_by_byte, ProbeOutcome.TIMEOUT, "timed out"),
    "garbage": (garbage, ProbeOutcome.ERROR, "not a valid HTTP response"),
    "huge-header": (huge_header, ProbeOutcome.ERROR, "not a valid HTTP response"),
    "many-headers": (many_headers, ProbeOutcome.ERROR, "not a valid HTTP response"),
    "declared-huge-body": (declared_huge_body, ProbeOutcome.ERROR, "1000000000000 bytes"),
    "endless-body": (endless_body, ProbeOutcome.ERROR, f"longer than {MAX_RESPONSE_BODY}"),
}


def healthy_app() -> web.Application:
    app = web.Application()
    setup_aiohttp(app)  # the agent answers the probe path with its load report
    return app


@asynccontextmanager
async def pods(
    behaviour: Callable[[HostilePod, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[HostilePod, dict[str, ProbeTarget]]]:
    async with AsyncExitStack() as stack:
        targets = {}
        for ip in HEALTHY:
            server = aiohttp_server(healthy_app(), host=ip, handler_cancellation=True)
            port = await stack.enter_async_context(server)
            targets[ip] = ProbeTarget(ip, port, interval_s=INTERVAL_S, timeout_s=TIMEOUT_S)
        hostile = HostilePod(behaviour)
        port = await hostile.start(HOSTILE)
        stack.push_async_callback(hostile.stop)
        targets[HOSTILE] = ProbeTarget(HOSTILE, port, interval_s=INTERVAL_S, timeout_s=TIMEOUT_S)
        yield hostile, targets


@pytest.mark.parametrize("case", list(CASES))
async def test_a_hostile_pod_is_bounded_floored_and_reported_the_others_unaffected(
    case: str,
) -> None:
    behaviour, outcome, word = CASES[case]
    loop = asyncio.get_running_loop()
    estimator: Estimator[str] = Estimator()
    results: dict[str, list[ProbeResult]] = defaultdict(list)
    changed = asyncio.Event()

    def sink(key: str, result: ProbeResult) -> None:
        estimator.observe(key, result, result.finished_at)
        results[key].append(result)
        changed.set()

    def enough() -> bool:
        return len(results[HOSTILE]) >= 5 and all(len(results[ip]) >= 15 for ip in HEALTHY)

    prober: Prober[str] = Prober(sink)
    with structlog.testing.capture_logs() as logs:
        async with pods(behaviour) as (hostile, targets):
            prober.set_targets(targets)
            task = asyncio.create_task(prober.run())
            try:
                async with asyncio.timeout(30):
                    while not enough():
                        changed.clear()
                        await changed.wait()
                now = loop.time()
                stats = {
                    EndpointAddress(ip, t.port): estimator.stats(ip, now)
                    for ip, t in targets.items()
                }
            finally:
                await prober.close()
                await task
            await hostile.closed()  # every connection to it closed with the prober

    bad = results[HOSTILE]
    # Bounded memory: what the pod got into a connection, the kernel's buffers included.
    assert max(hostile.sent) <= MAX_READ, hostile.sent
    assert hostile.open_max <= 2  # the target's connection pool: no pile of sockets
    assert max(r.rtt_s for r in bad) <= TIMEOUT_S + LATE_S, [r.rtt_s for r in bad]
    # Every probe fails the expected way; on a starved machine (load 15 on 2 cores) the loop
    # may notice a reset only after the probe's timeout, so a timeout is a failure too.
    outcomes = {r.outcome for r in bad}
    assert outcome in outcomes, [(r.outcome, r.detail) for r in bad]
    assert outcomes <= {outcome, ProbeOutcome.TIMEOUT}, [(r.outcome, r.detail) for r in bad]
    for r in bad:
        assert len(r.detail) <= MAX_DETAIL, r.detail
        assert r.outcome is not outcome or word in r.detail, r.detail
        assert all(" " <= c <= "~" for c in r.detail), r.detail  # no escape, no CR/LF

    failing = [e for e in logs if e["event"] == "probe target failing"]
    assert [e["key"] for e in failing] == [HOSTILE]  # once, and only the hostile pod
    assert failing[0]["outcome"] in {r.outcome.value for r in bad}
    assert failing[0]["detail"] in {r.detail for r in bad}

    for ip in HEALTHY:
        good = results[ip]
        assert {r.outcome for r in good} == {ProbeOutcome.OK}, ip
        starts = [r.started_at for r in good]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # The cadence holds: interval ± 10% jitter, plus whatever the loaded machine adds.
        assert max(gaps) <= MAX_GAP_S, (ip, gaps)
        assert statistics.median(gaps) <= 2 * INTERVAL_S, (ip, gaps)

    knobs = WeigherKnobs()
    result = weigh(stats, knobs=knobs, latency_threshold_s=0.1)
    weights = {a.ip: e.weight for a, e in result.endpoints.items()}
    floor = math.ceil(MAX_WEIGHT / knobs.max_weight_ratio)
    assert weights[HOSTILE] == floor, weights
    # The healthy pods are not floored. How far above the floor depends on loopback latency,
    # which a loaded machine moves (a CI run had one healthy pod at 86 of 1000): not asserted.
    assert all(weights[ip] > floor for ip in HEALTHY), weights
    assert all(e.health is Health.HEALTHY for a, e in result.endpoints.items() if a.ip != HOSTILE)
    assert result.hot == {EndpointAddress(HOSTILE, targets[HOSTILE].port)}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("connection reset", "connection reset"),
        ("\x1b[2J\x00line\r\nnext é", "\\x1b[2J\\x00line\\r\\nnext \\xe9"),
        ("x" * MAX_DETAIL, "x" * MAX_DETAIL),
        ("x" * 10_000, "x" * (MAX_DETAIL - 22) + "... (10000 characters)"),
        ("\x00" * MAX_DETAIL, "\\x00" * ((MAX_DETAIL - 20) // 4) + "... (240 characters)"),
    ],
)
def test_a_detail_is_short_printable_ascii(text: str, shown: str) -> None:
    detail = bounded_detail(text)
    assert detail == shown
    assert len(detail) <= MAX_DETAIL
