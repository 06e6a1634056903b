"""The prober with its default HTTP transport against real (aiohttp) servers on 127.0.0.x.

Real time here (sockets cannot run on fake loop time without racing the fake clock against
real I/O): short intervals, waits on conditions with an upper bound, no timing assertions.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from aiohttp import web
from aviator_agent import LoadTracker, setup_aiohttp

from aviator.model import EndpointAddress
from aviator.probing.estimator import Estimator
from aviator.probing.prober import Prober
from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.weigher import weigh
from tests.integration.probing.servers import aiohttp_server, free_socket


class Backend:
    """An aiohttp app on its own loopback IP that records the client connections it sees."""

    def __init__(
        self,
        *,
        agent: bool = True,
        probe_status: int = 200,
        hang: bool = False,
        work_s: float = 0.0,
    ) -> None:
        self.transports: set[asyncio.BaseTransport] = set()
        self.tracker: LoadTracker | None = None
        self.app = web.Application()

        @web.middleware
        async def record(
            request: web.Request, handler: Callable[..., object]
        ) -> web.StreamResponse:
            if request.transport is not None:
                self.transports.add(request.transport)
            return await handler(request)  # type: ignore[no-any-return, operator]

        async def probe(request: web.Request) -> web.Response:
            if hang:
                await asyncio.Event().wait()
            return web.Response(status=probe_status, text="plain")

        async def work(request: web.Request) -> web.Response:
            await asyncio.sleep(work_s)
            return web.Response(text="ok")

        self.app.router.add_get("/aviator/probe", probe)
        self.app.router.add_get("/work", work)
        if agent:
            self.tracker = setup_aiohttp(self.app)
        self.app.middlewares.insert(0, record)

    def open_connections(self) -> int:
        return sum(1 for t in self.transports if not t.is_closing())


class Sink:
    def __init__(self) -> None:
        self.results: dict[str, list[ProbeResult]] = defaultdict(list)
        self.changed = asyncio.Event()

    def __call__(self, key: str, result: ProbeResult) -> None:
        self.results[key].append(result)
        self.changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll state changed by the event loop's I/O (bounded: fails after 10 s)."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 (socket state has no event to wait on)
            await asyncio.sleep(0.01)


@asynccontextmanager
async def serve(backends: dict[str, Backend]) -> AsyncIterator[dict[str, int]]:
    async with AsyncExitStack() as stack:
        ports = {}
        for ip, backend in backends.items():
            # Handlers of dropped connections (timed-out probes) are cancelled, not awaited.
            server = aiohttp_server(backend.app, host=ip, handler_cancellation=True)
            ports[ip] = await stack.enter_async_context(server)
        yield ports


@asynccontextmanager
async def probing(prober: Prober[str]) -> AsyncIterator[None]:
    task = asyncio.create_task(prober.run())
    try:
        yield
    finally:
        await prober.close()
        await task


async def test_outcomes_load_reports_and_keep_alive_against_real_servers() -> None:
    backends = {
        "127.0.0.2": Backend(agent=True),
        "127.0.0.3": Backend(agent=False, probe_status=503),
        "127.0.0.4": Backend(agent=False, hang=True),
        "127.0.0.5": Backend(agent=False, probe_status=200),
    }
    closed = free_socket("127.0.0.6")  # bound, never listening: connection refused
    sink = Sink()
    prober: Prober[str] = Prober(sink, max_in_flight=16)
    async with serve(backends) as ports:
        targets = {
            ip: ProbeTarget(ip, port, interval_s=0.05, timeout_s=0.3) for ip, port in ports.items()
        }
        targets["127.0.0.6"] = ProbeTarget(
            "127.0.0.6", closed.getsockname()[1], interval_s=0.05, timeout_s=0.3
        )
        prober.set_targets(targets)
        async with probing(prober):
            await sink.until(lambda: all(len(sink.results[ip]) >= 3 for ip in targets))
            # Every probe reused one keep-alive connection per target.
            assert len(backends["127.0.0.2"].transports) == 1
            assert len(backends["127.0.0.5"].transports) == 1
        closed.close()
        await until(lambda: all(b.open_connections() == 0 for b in backends.values()))

    agent = sink.results["127.0.0.2"]
    assert {r.outcome for r in agent} == {ProbeOutcome.OK}
    assert all(r.load is not None and r.load.rif == 0 for r in agent)
    assert {(r.outcome, r.status) for r in sink.results["127.0.0.3"]} == {
        (ProbeOutcome.HTTP_ERROR, 503)
    }
    assert {r.outcome for r in sink.results["127.0.0.4"]} == {ProbeOutcome.TIMEOUT}
    plain = sink.results["127.0.0.5"]
    assert {r.outcome for r in plain} == {ProbeOutcome.OK}
    assert all(r.load is None for r in plain)
    assert {r.outcome for r in sink.results["127.0.0.6"]} == {ProbeOutcome.CONNECT_ERROR}


async def test_removing_a_target_closes_its_connection_and_stops_its_probes() -> None:
    backends = {"127.0.0.7": Backend(), "127.0.0.8": Backend()}
    sink = Sink()
    prober: Prober[str] = Prober(sink)
    async with serve(backends) as ports:
        targets = {ip: ProbeTarget(ip, port, interval_s=0.02) for ip, port in ports.items()}
        prober.set_targets(targets)
        async with probing(prober):
            await sink.until(lambda: all(len(sink.results[ip]) >= 3 for ip in targets))
            assert backends["127.0.0.8"].open_connections() == 1
            prober.set_targets({"127.0.0.7": targets["127.0.0.7"]})
            await until(lambda: backends["127.0.0.8"].open_connections() == 0)
            count = len(sink.results["127.0.0.8"])
            kept = len(sink.results["127.0.0.7"])
            await sink.until(lambda: len(sink.results["127.0.0.7"]) >= kept + 5)
            assert len(sink.results["127.0.0.8"]) == count
            assert prober.running_tasks == 1
        await until(lambda: backends["127.0.0.7"].open_connections() == 0)


async def test_prober_estimator_weigher_rank_a_slow_backend_below_a_fast_one() -> None:
    backends = {"127.0.0.9": Backend(work_s=0.002), "127.0.0.10": Backend(work_s=0.040)}
    loop = asyncio.get_running_loop()
    estimator: Estimator[str] = Estimator()
    sink = Sink()

    def feed(key: str, result: ProbeResult) -> None:
        estimator.observe(key, result, loop.time())
        sink(key, result)

    prober: Prober[str] = Prober(feed)
    async with serve(backends) as ports:
        # Application traffic, so each agent has latencies to report.
        async with aiohttp.ClientSession() as client:
            for ip, port in ports.items():
                for _ in range(10):
                    async with client.get(f"http://{ip}:{port}/work") as r:
                        assert r.status == 200
        prober.set_targets(
            {ip: ProbeTarget(ip, port, interval_s=0.02) for ip, port in ports.items()}
        )
        async with probing(prober):
            await sink.until(lambda: all(len(sink.results[ip]) >= 3 for ip in ports))
            now = loop.time()
            stats = {EndpointAddress(ip, ports[ip]): estimator.stats(ip, now) for ip in ports}
    fast = stats[EndpointAddress("127.0.0.9", ports["127.0.0.9"])]
    slow = stats[EndpointAddress("127.0.0.10", ports["127.0.0.10"])]
    assert fast is not None
    assert fast.reported_latency_s is not None
    assert slow is not None
    assert slow.reported_latency_s is not None
    assert slow.reported_latency_s > fast.reported_latency_s
    result = weigh(stats)
    weights = {a.ip: e.weight for a, e in result.endpoints.items()}
    assert weights["127.0.0.9"] > weights["127.0.0.10"]


async def test_a_probe_is_a_plain_get_and_a_closed_connection_is_opened_again() -> None:
    """What the default transport sends (path, Host, User-Agent), and that a pod closing the
    connection (``Connection: close`` or going away between probes) costs the next probe only
    a new connection, not a failure."""
    seen: list[tuple[str, str, str]] = []
    peers: list[asyncio.BaseTransport] = []

    async def probe(request: web.Request) -> web.Response:
        seen.append((request.path_qs, request.host, request.headers.get("User-Agent", "")))
        if request.transport is not None:
            peers.append(request.transport)
        closing = len(seen) % 2 == 0  # every second answer closes its connection
        return web.Response(text="ok", headers={"Connection": "close"} if closing else {})

    app = web.Application()
    app.router.add_get("/healthz", probe)
    sink = Sink()
    prober: Prober[str] = Prober(sink)
    async with aiohttp_server(app, host="127.0.0.11") as port:
        prober.set_targets(
            {"a": ProbeTarget("127.0.0.11", port, path="/healthz?from=aviator", interval_s=0.02)}
        )
        async with probing(prober):
            await sink.until(lambda: len(sink.results["a"]) >= 6)
    assert {r.outcome for r in sink.results["a"]} == {ProbeOutcome.OK}
    assert set(seen) == {("/healthz?from=aviator", f"127.0.0.11:{port}", "aviator-prober")}
    # Two probes per connection: the second answer of each closed it, the next probe opened one.
    assert len(set(map(id, peers))) == (len(peers) + 1) // 2
