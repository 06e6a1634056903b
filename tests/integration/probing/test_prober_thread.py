"""The prober on a thread and loop of its own (issue 13, item 6), against real HTTP servers.

The backends are stdlib ``ThreadingHTTPServer``s on threads of their own, so that they answer
while the test's event loop is blocked on purpose: the point of :class:`ProberThread` is that
probes are made, timed and read while the loop that serves xDS is busy. Real time, conditions
waited on with an upper bound, no timing assertion: what is asserted is *where* probes ran
(inside a window in which the home loop ran nothing), not how fast.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aviator.probing.prober import Prober
from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.thread import ProberThread
from aviator.probing.transport import ProbeTransport


class _Backend(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, status: int) -> None:
        self.status = status
        self.connections = 0
        self.open = 0
        self.lock = threading.Lock()
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the prober's transport expects
    disable_nagle_algorithm = True  # headers and body in two writes: no 40 ms delayed ACK
    server: _Backend

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1
            self.server.open += 1

    def finish(self) -> None:
        super().finish()
        with self.server.lock:
            self.server.open -= 1

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def backends(statuses: dict[str, int]) -> Iterator[dict[str, _Backend]]:
    servers = {ip: _Backend(ip, status) for ip, status in statuses.items()}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()
    try:
        yield servers
    finally:
        for s in servers.values():
            s.shutdown()
            s.server_close()


def _targets(servers: dict[str, _Backend], interval_s: float) -> dict[str, ProbeTarget]:
    return {
        ip: ProbeTarget(ip, s.server_address[1], interval_s=interval_s, timeout_s=1.0)
        for ip, s in servers.items()
    }


class _Sink:
    """Results, with the thread each reached the sink on."""

    def __init__(self) -> None:
        self.results: list[tuple[str, ProbeResult, int]] = []

    def __call__(self, key: str, result: ProbeResult) -> None:
        self.results.append((key, result, threading.get_ident()))

    def of(self, key: str) -> list[ProbeResult]:
        return [r for k, r, _ in self.results if k == key]


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (results and sockets have no event to wait on)
            await asyncio.sleep(0.01)


def _prober_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prober"]


async def test_results_reach_the_sink_on_the_home_loop_and_close_leaves_nothing() -> None:
    sink = _Sink()
    prober: ProberThread[str] = ProberThread(sink, lambda s: Prober(s, max_in_flight=8))
    with backends({"127.0.0.2": 200, "127.0.0.3": 503}) as servers:
        targets = _targets(servers, 0.02)
        prober.set_targets(targets)  # before run: kept until the thread starts
        assert dict(prober.targets) == targets
        run = asyncio.create_task(prober.run())
        await until(lambda: all(len(sink.of(ip)) >= 3 for ip in targets))
        assert _prober_threads()
        assert {ident for _, _, ident in sink.results} == {threading.get_ident()}
        assert {r.outcome for r in sink.of("127.0.0.2")} == {ProbeOutcome.OK}
        assert {r.outcome for r in sink.of("127.0.0.3")} == {ProbeOutcome.HTTP_ERROR}
        assert servers["127.0.0.2"].connections == 1  # one keep-alive connection per target

        # A target removed while running: its task stops and its connection closes.
        prober.set_targets({"127.0.0.2": targets["127.0.0.2"]})
        await until(lambda: servers["127.0.0.3"].open == 0)
        count = len(sink.of("127.0.0.2"))
        await until(lambda: len(sink.of("127.0.0.2")) >= count + 3)

        await prober.close()
        await run
        await until(lambda: all(s.open == 0 for s in servers.values()))
    assert not _prober_threads()
    with pytest.raises(RuntimeError, match="closed"):
        prober.set_targets(targets)


@pytest.mark.parametrize("threaded", [True, False], ids=["thread", "on-loop"])
async def test_probes_are_made_and_timed_while_the_home_loop_is_blocked(threaded: bool) -> None:
    """The home loop blocked for 0.5 s (as a long snapshot build would block it): probes on
    the thread are made, answered and timed inside that window, and delivered after it. The
    on-loop prober, the control, makes none there."""
    sink = _Sink()

    def make(s: Callable[[str, ProbeResult], None]) -> Prober[str]:
        return Prober(s, max_in_flight=8)

    prober: Prober[str] | ProberThread[str] = ProberThread(sink, make) if threaded else make(sink)
    loop = asyncio.get_running_loop()
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.01))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(sink.results) >= 3)
        blocked_at = loop.time()
        time.sleep(0.5)  # noqa: ASYNC251 (on purpose: the loop runs nothing meanwhile)
        unblocked_at = loop.time()
        delivered = len(sink.results)
        await until(lambda: len(sink.results) > delivered)
        await prober.close()
        await run
    made = [r for _, r, _ in sink.results]
    inside = [
        i for i, r in enumerate(made) if blocked_at < r.started_at < r.finished_at < unblocked_at
    ]
    if threaded:
        assert inside, "no probe was made while the home loop was blocked"
        assert all(made[i].ok for i in inside)
        # They reached the sink on the home loop, so only once it ran again.
        assert min(inside) >= delivered
    else:
        assert inside == []


class _Exploding:
    def __init__(self, target: ProbeTarget) -> None:
        raise OSError("no sockets today")

    async def get(self, target: ProbeTarget) -> None:  # pragma: no cover - never built
        raise AssertionError

    async def aclose(self) -> None:  # pragma: no cover - never built
        pass


async def test_a_failure_on_the_probe_thread_ends_run_with_it() -> None:
    def factory(target: ProbeTarget) -> ProbeTransport:
        return _Exploding(target)  # type: ignore[return-value]

    prober: ProberThread[str] = ProberThread(
        _Sink(), lambda s: Prober(s, transport_factory=factory)
    )
    prober.set_targets({"a": ProbeTarget("127.0.0.2", 9, interval_s=0.01, timeout_s=0.1)})
    with pytest.raises(ExceptionGroup) as caught:
        async with asyncio.timeout(10):
            await prober.run()
    assert caught.group_contains(OSError, match="no sockets today")
    await until(lambda: not _prober_threads())


async def test_a_failing_sink_is_logged_and_probing_goes_on() -> None:
    calls: list[str] = []

    def sink(key: str, result: ProbeResult) -> None:
        calls.append(key)
        raise ValueError("sink bug")

    prober: ProberThread[str] = ProberThread(sink, lambda s: Prober(s))
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.05))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(calls) >= 3)
        await prober.close()
        await run


async def test_cancelling_run_stops_the_thread_and_closes_connections() -> None:
    sink = _Sink()
    prober: ProberThread[str] = ProberThread(sink, lambda s: Prober(s))
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.01))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(sink.results) >= 2)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert not _prober_threads()
        await until(lambda: servers["127.0.0.2"].open == 0)


async def test_a_drain_hands_over_what_was_queued_when_it_began_and_no_more() -> None:
    """A sink slower than the probes must not hold the home loop: results that arrive while
    a drain runs wait for the next drain (which their arrival scheduled). Seen before: a
    sink logging a traceback per result kept one drain going for minutes."""
    seen: list[int] = []
    prober: ProberThread[int]

    def sink(key: int, result: ProbeResult) -> None:
        seen.append(key)
        if key < 300:  # (bounded, so that a drain that never stops fails rather than hangs)
            prober._collect(key + 100, result)  # as the probe thread would, meanwhile

    prober = ProberThread(sink, lambda s: Prober(s))
    result = ProbeResult(ProbeOutcome.OK, 0.0, 0.001, 1.0, status=200)
    for key in range(3):
        prober._collect(key, result)  # no home loop yet: queued, no drain scheduled
    prober._home = asyncio.get_running_loop()
    prober._drain()
    assert seen == [0, 1, 2]
    await asyncio.sleep(0)  # the drain the sink's results scheduled
    assert seen == [0, 1, 2, 100, 101, 102]
