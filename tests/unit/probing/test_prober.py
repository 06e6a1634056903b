"""The prober on fake loop time (looptime) with an injected in-memory transport.

Nothing here opens a socket: ``FakeNetwork`` stands in for the HTTP transport so every delay
is a loop timer and the schedule is exact. The same prober against real aiohttp servers on
loopback is in tests/integration/probing/test_prober_http.py.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from aviator.probing.estimator import Estimator
from aviator.probing.prober import Prober, spread_probe_budget
from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from aviator.probing.transport import ProbeConnectError, ProbeResponse

Behaviour = Callable[[], Awaitable[ProbeResponse]]

pytestmark = pytest.mark.looptime


def respond(
    status: int = 200, headers: dict[str, str] | None = None, delay: float = 0.002
) -> Behaviour:
    async def behaviour() -> ProbeResponse:
        await asyncio.sleep(delay)
        return ProbeResponse(status, headers or {})

    return behaviour


async def hang() -> ProbeResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def refuse() -> ProbeResponse:
    raise ProbeConnectError("connection refused")


async def explode() -> ProbeResponse:
    raise RuntimeError("bad status line")


class FakeNetwork:
    """Transports keyed by target IP; records every call, its loop time and concurrency."""

    def __init__(self) -> None:
        self.behaviour: dict[str, Behaviour] = {}
        self.calls: list[tuple[str, float]] = []
        self.open: list[FakeTransport] = []
        self.created = 0
        self.concurrent = 0
        self.max_concurrent = 0

    def factory(self, target: ProbeTarget) -> FakeTransport:
        transport = FakeTransport(self)
        self.created += 1
        self.open.append(transport)
        return transport

    def times(self, ip: str) -> list[float]:
        return [t for i, t in self.calls if i == ip]


class FakeTransport:
    def __init__(self, network: FakeNetwork) -> None:
        self.network = network

    async def get(self, target: ProbeTarget) -> ProbeResponse:
        net = self.network
        net.calls.append((target.ip, asyncio.get_running_loop().time()))
        net.concurrent += 1
        net.max_concurrent = max(net.max_concurrent, net.concurrent)
        try:
            return await net.behaviour.get(target.ip, respond())()
        finally:
            net.concurrent -= 1

    async def aclose(self) -> None:
        self.network.open.remove(self)


def target(i: int, interval: float = 1.0, timeout: float = 0.5) -> ProbeTarget:
    return ProbeTarget(f"127.0.0.{i}", 8080, interval_s=interval, timeout_s=timeout)


class Collector:
    def __init__(self) -> None:
        self.results: list[tuple[str, ProbeResult]] = []

    def __call__(self, key: str, result: ProbeResult) -> None:
        self.results.append((key, result))

    def of(self, key: str) -> list[ProbeResult]:
        return [r for k, r in self.results if k == key]


@asynccontextmanager
async def running(prober: Prober[str]) -> AsyncIterator[None]:
    task = asyncio.create_task(prober.run())
    await asyncio.sleep(0)
    try:
        yield
    finally:
        await prober.close()
        await task


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []


def make(
    net: FakeNetwork, sink: Collector, *, jitter: float = 0.1, **kwargs: object
) -> Prober[str]:
    return Prober(
        sink,
        transport_factory=net.factory,
        jitter=jitter,
        rng=random.Random(7),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_every_target_is_probed_every_interval_with_jitter() -> None:
    net, sink = FakeNetwork(), Collector()
    prober = make(net, sink, jitter=0.1)
    prober.set_targets({f"t{i}": target(i) for i in range(1, 51)})
    async with running(prober):
        await asyncio.sleep(20.0)
    for i in range(1, 51):
        times = net.times(f"127.0.0.{i}")
        assert 18 <= len(times) <= 22
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.9 - 1e-9 <= g <= 1.1 + 1e-9 for g in gaps), gaps
        assert len({round(g, 9) for g in gaps}) > 1  # jittered, not a fixed beat
    assert len(sink.results) == len(net.calls)


async def test_jitter_spreads_targets_added_together() -> None:
    net, sink = FakeNetwork(), Collector()
    prober = make(net, sink)
    prober.set_targets({f"t{i}": target(i) for i in range(1, 101)})
    async with running(prober):
        await asyncio.sleep(5.0)
    # 100 targets added at t=0 with a 1 s interval: no 50 ms window holds more than ~5 + slack
    # of the 100 probes/s (a herd would put all 100 in one window).
    times = sorted(t for _, t in net.calls)
    window = max(sum(1 for u in times if t <= u < t + 0.05) for t in times)
    assert window <= 15
    first = sorted(net.times(f"127.0.0.{i}")[0] for i in range(1, 101))
    assert first[0] < 0.1
    assert first[-1] > 0.9


async def test_timeout_and_failures_are_results_not_gaps() -> None:
    net, sink = FakeNetwork(), Collector()
    net.behaviour = {
        "127.0.0.1": hang,
        "127.0.0.2": refuse,
        "127.0.0.3": respond(status=503),
        "127.0.0.4": respond(status=429),
        "127.0.0.5": explode,
        "127.0.0.6": respond(status=404),
    }
    prober = make(net, sink, backoff_after=100)
    prober.set_targets({f"t{i}": target(i, timeout=0.5) for i in range(1, 7)})
    async with running(prober):
        await asyncio.sleep(5.0)
    hung = sink.of("t1")
    assert len(hung) >= 4
    assert {r.outcome for r in hung} == {ProbeOutcome.TIMEOUT}
    assert all(r.rtt_s == pytest.approx(0.5) for r in hung)
    assert {r.outcome for r in sink.of("t2")} == {ProbeOutcome.CONNECT_ERROR}
    assert {(r.outcome, r.status) for r in sink.of("t3")} == {(ProbeOutcome.HTTP_ERROR, 503)}
    assert {(r.outcome, r.status) for r in sink.of("t4")} == {(ProbeOutcome.HTTP_ERROR, 429)}
    assert {r.outcome for r in sink.of("t5")} == {ProbeOutcome.ERROR}
    assert "bad status line" in sink.of("t5")[0].detail
    assert {(r.outcome, r.status) for r in sink.of("t6")} == {(ProbeOutcome.OK, 404)}


async def test_a_hanging_endpoint_does_not_delay_the_others() -> None:
    net, sink = FakeNetwork(), Collector()
    for i in range(1, 4):
        net.behaviour[f"127.0.0.{i}"] = hang
    prober = make(net, sink, max_in_flight=4, jitter=0.0, backoff_after=100)
    prober.set_targets({f"t{i}": target(i, timeout=0.9) for i in range(1, 9)})
    async with running(prober):
        await asyncio.sleep(10.0)
    for i in range(4, 9):  # the healthy ones keep their exact 1 s beat
        results = sink.of(f"t{i}")
        assert {r.outcome for r in results} == {ProbeOutcome.OK}
        starts = [r.started_at for r in results]
        assert all(b - a == pytest.approx(1.0) for a, b in itertools.pairwise(starts))
        assert all(r.rtt_s == pytest.approx(0.002) for r in results)
    assert prober.in_flight == 0


async def test_in_flight_is_capped_globally() -> None:
    net, sink = FakeNetwork(), Collector()
    for i in range(1, 21):
        net.behaviour[f"127.0.0.{i}"] = respond(delay=0.4)
    prober = make(net, sink, max_in_flight=5)
    prober.set_targets({f"t{i}": target(i, interval=0.1, timeout=1.0) for i in range(1, 21)})
    async with running(prober):
        await asyncio.sleep(5.0)
    assert net.max_concurrent == 5
    # Waiting for a slot is not counted as latency: every RTT is the server's 0.4 s.
    assert all(r.rtt_s == pytest.approx(0.4) for _, r in sink.results)


@pytest.mark.parametrize(
    ("max_intervals", "want"),
    [
        (3.0, [1.0, 2.0, 3.0, 3.0, 3.0]),  # the default: capped at 3 intervals (issue 9)
        (100.0, [1.0, 2.0, 4.0, 8.0, 8.0]),  # then by backoff_max_s
    ],
)
async def test_failing_endpoint_backs_off_and_recovers(
    max_intervals: float, want: list[float]
) -> None:
    net, sink = FakeNetwork(), Collector()
    net.behaviour["127.0.0.1"] = refuse
    prober = make(
        net,
        sink,
        jitter=0.0,
        backoff_after=2,
        backoff_max_s=8.0,
        backoff_max_intervals=max_intervals,
    )
    prober.set_targets({"t1": target(1)})
    async with running(prober):
        await asyncio.sleep(30.0)
        failing = net.times("127.0.0.1")
        net.behaviour["127.0.0.1"] = respond()
        await asyncio.sleep(20.0)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(failing)]
    assert gaps[:5] == want
    times = net.times("127.0.0.1")
    healed = [round(b - a, 6) for a, b in itertools.pairwise(times)][-5:]
    assert healed == [1.0] * 5


async def test_orca_header_is_parsed_and_a_bad_one_ignored() -> None:
    net, sink = FakeNetwork(), Collector()
    net.behaviour["127.0.0.1"] = respond(
        headers={"endpoint-load-metrics": "TEXT named_metrics.rif:3,named_metrics.latency_ms:12"}
    )
    net.behaviour["127.0.0.2"] = respond(headers={"endpoint-load-metrics": "TEXT rif=3"})
    prober = make(net, sink)
    prober.set_targets({"good": target(1), "bad": target(2)})
    async with running(prober):
        await asyncio.sleep(3.0)
    good = sink.of("good")[-1]
    assert good.load is not None
    assert good.load.rif == 3.0
    assert good.load.latency_s == pytest.approx(0.012)
    bad = sink.of("bad")[-1]
    assert bad.ok
    assert bad.load is None


async def test_removed_targets_stop_being_probed_and_close_their_transport() -> None:
    net, sink = FakeNetwork(), Collector()
    net.behaviour["127.0.0.3"] = hang  # removed while a probe is in flight
    prober = make(net, sink)
    prober.set_targets({f"t{i}": target(i) for i in range(1, 4)})
    async with running(prober):
        await asyncio.sleep(3.0)
        assert len(net.open) == 3
        prober.set_targets({"t1": target(1)})
        removed_at = asyncio.get_running_loop().time()
        await asyncio.sleep(0.01)
        assert len(net.open) == 1
        assert prober.running_tasks == 1
        assert prober.in_flight == 0
        await asyncio.sleep(5.0)
        late = [ip for ip, t in net.calls if t > removed_at and ip != "127.0.0.1"]
        assert late == []
        assert len(net.times("127.0.0.1")) >= 7
    assert net.open == []
    assert prober.running_tasks == 0


async def test_changed_settings_apply_in_place_and_a_new_address_restarts() -> None:
    net, sink = FakeNetwork(), Collector()
    prober = make(net, sink, jitter=0.0)
    prober.set_targets({"t": target(1, interval=1.0)})
    async with running(prober):
        await asyncio.sleep(3.0)
        prober.set_targets({"t": target(1, interval=0.25)})
        await asyncio.sleep(3.0)
        assert net.created == 1
        times = net.times("127.0.0.1")
        assert times[-1] - times[-2] == pytest.approx(0.25)
        prober.set_targets({"t": target(2, interval=0.25)})
        await asyncio.sleep(1.0)
        assert net.created == 2
        assert len(net.open) == 1
        assert net.times("127.0.0.2")


async def test_a_failing_sink_does_not_stop_probing() -> None:
    net = FakeNetwork()
    seen: list[ProbeResult] = []

    def sink(key: str, result: ProbeResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("bug in the sink")

    prober: Prober[str] = Prober(sink, transport_factory=net.factory, rng=random.Random(1))
    prober.set_targets({"t": target(1)})
    async with running(prober):
        await asyncio.sleep(5.0)
    assert len(seen) >= 4


async def test_targets_set_before_run_start_with_run_and_close_is_final() -> None:
    net, sink = FakeNetwork(), Collector()
    prober = make(net, sink)
    prober.set_targets({"t": target(1)})
    await asyncio.sleep(2.0)
    assert net.calls == []  # nothing happens before run()
    async with running(prober):
        await asyncio.sleep(2.0)
        with pytest.raises(RuntimeError, match="already running"):
            await prober.run()
    assert net.calls
    with pytest.raises(RuntimeError, match="closed"):
        prober.set_targets({})
    with pytest.raises(RuntimeError, match="closed"):
        await prober.run()


async def test_cancelling_run_closes_everything() -> None:
    net, sink = FakeNetwork(), Collector()
    net.behaviour["127.0.0.2"] = hang
    prober = make(net, sink)
    prober.set_targets({"a": target(1), "b": target(2)})
    task = asyncio.create_task(prober.run())
    await asyncio.sleep(3.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert net.open == []


async def test_prober_feeds_the_estimator_on_the_same_clock() -> None:
    net, _ = FakeNetwork(), Collector()
    net.behaviour["127.0.0.1"] = respond(delay=0.010)
    net.behaviour["127.0.0.2"] = respond(delay=0.080)
    net.behaviour["127.0.0.3"] = refuse
    loop = asyncio.get_running_loop()
    estimator: Estimator[str] = Estimator()
    prober: Prober[str] = Prober(
        lambda key, result: estimator.observe(key, result, loop.time()),
        transport_factory=net.factory,
        rng=random.Random(3),
    )
    prober.set_targets({"fast": target(1), "slow": target(2), "down": target(3)})
    async with running(prober):
        await asyncio.sleep(10.0)
        now = loop.time()
        fast, slow, down = (estimator.stats(k, now) for k in ("fast", "slow", "down"))
    assert fast is not None
    assert slow is not None
    assert down is not None
    assert fast.latency_s == pytest.approx(0.010)
    assert slow.latency_s == pytest.approx(0.080)
    assert down.latency_s == pytest.approx(1.0)  # 2 x the 0.5 s timeout
    assert down.error_rate == 1.0


# -- the probe budget (issue 9, item 6) ---------------------------------------------------------


def test_the_probe_budget_leaves_a_fleet_within_it_alone() -> None:
    targets = {i: ProbeTarget("10.0.0.1", 80, interval_s=1.0) for i in range(100)}
    spread, stretch = spread_probe_budget(targets, 100.0)
    assert stretch == 1.0
    assert spread == targets


def test_the_probe_budget_stretches_every_interval_by_one_factor() -> None:
    # 1,000 every 10 s (100/s) and 100 every 0.5 s (200/s) ask for 300/s; at 150/s each is
    # probed at half its rate, so the fast ones still get 5x the probes of the slow ones.
    targets = {i: ProbeTarget("10.0.0.1", 80, interval_s=10.0) for i in range(1000)}
    targets |= {1000 + i: ProbeTarget("10.0.0.2", 80, interval_s=0.5) for i in range(100)}
    spread, stretch = spread_probe_budget(targets, 150.0)
    assert stretch == pytest.approx(2.0)
    assert all(spread[i].interval_s == pytest.approx(20.0) for i in range(1000))
    assert all(spread[1000 + i].interval_s == pytest.approx(1.0) for i in range(100))
    assert sum(1 / t.interval_s for t in spread.values()) == pytest.approx(150.0)
    assert all(spread[k].timeout_s == targets[k].timeout_s for k in targets)


@pytest.mark.parametrize("bad", [0.0, -5.0, math.inf, math.nan])
def test_the_probe_budget_must_be_a_positive_rate(bad: float) -> None:
    with pytest.raises(ValueError, match="max_rate"):
        spread_probe_budget({}, bad)
