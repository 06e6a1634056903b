"""The prober in a process of its own (issue 13, item 6), against real HTTP servers.

As for the thread (``test_prober_thread``): real time, conditions waited on with an upper
bound, no timing assertion. What the process adds is asserted by *where* probes ran: inside a
window in which this interpreter ran Python without a pause (holding the GIL, as an xDS
fan-out does), which a prober thread cannot do.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aviator_agent.orca import ORCA_HEADER, OrcaLoadReport, format_orca_text

from aviator.probing import process
from aviator.probing.process import ProberProcess, ProberSpec
from aviator.probing.results import ProbeOutcome, ProbeResult, ProbeTarget
from tests.integration.probing.test_prober_thread import _Sink, _targets, backends, until

# The backends are on loopback: no address policy (the control plane's refuses loopback
# unless told otherwise).
OPEN = ProberSpec(addresses=False, max_in_flight=8)


async def test_results_reach_the_sink_on_the_home_loop_and_close_leaves_nothing() -> None:
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    with backends({"127.0.0.2": 200, "127.0.0.3": 503}) as servers:
        targets = _targets(servers, 0.02)
        prober.set_targets(targets)  # before run: sent when the child starts
        assert dict(prober.targets) == targets
        run = asyncio.create_task(prober.run())
        await until(lambda: all(len(sink.of(ip)) >= 3 for ip in targets))
        child = prober._child
        assert child is not None
        assert child.returncode is None
        assert {ident for _, _, ident in sink.results} == {threading.get_ident()}
        assert {r.outcome for r in sink.of("127.0.0.2")} == {ProbeOutcome.OK}
        assert {r.outcome for r in sink.of("127.0.0.3")} == {ProbeOutcome.HTTP_ERROR}
        assert servers["127.0.0.2"].connections == 1  # one keep-alive connection per target
        # The child's clock is this loop's (both read the system's monotonic clock).
        now = asyncio.get_running_loop().time()
        assert all(r.finished_at <= now for _, r, _ in sink.results)
        assert max(r.finished_at for _, r, _ in sink.results) > now - 1.0

        # A target removed while running: its task stops and its connection closes.
        prober.set_targets({"127.0.0.2": targets["127.0.0.2"]})
        await until(lambda: servers["127.0.0.3"].open == 0)
        count = len(sink.of("127.0.0.2"))
        await until(lambda: len(sink.of("127.0.0.2")) >= count + 3)

        await prober.close()
        await run
        assert child.returncode == 0
        await until(lambda: all(s.open == 0 for s in servers.values()))
    with pytest.raises(RuntimeError, match="closed"):
        prober.set_targets(targets)


async def test_probes_are_made_and_timed_while_this_interpreter_runs_python() -> None:
    """For 0.5 s this process runs Python without a pause (no sleep, no I/O: the GIL is
    held, as during an xDS fan-out): the child makes, answers and times probes inside that
    window, delivered after it."""
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    loop = asyncio.get_running_loop()
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.01))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(sink.results) >= 3)
        busy_from = loop.time()
        spins = 0
        while time.monotonic() < busy_from + 0.5:
            spins += 1
        busy_to = loop.time()
        delivered = len(sink.results)
        await until(lambda: len(sink.results) > delivered)
        await prober.close()
        await run
    made = [r for _, r, _ in sink.results]
    inside = [i for i, r in enumerate(made) if busy_from < r.started_at < r.finished_at < busy_to]
    assert inside, "no probe was made while this interpreter ran Python"
    assert all(made[i].ok for i in inside)
    assert min(inside) >= delivered


REPORT = OrcaLoadReport(
    cpu_utilization=0.25, named_metrics={"rif": 3.0, "latency_ms": 12.5}, utilization={"gpu": 0.5}
)


class _Reporting(BaseHTTPRequestHandler):
    """Answers with the agent's load report (its read-only maps must cross the pipe)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header(ORCA_HEADER, format_orca_text(REPORT))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def reporting_backend() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.4", 0), _Reporting)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_load_report_pickles_as_a_value() -> None:
    again = pickle.loads(pickle.dumps(REPORT))
    assert again == REPORT
    assert again.rif == 3.0
    with pytest.raises(TypeError):
        again.named_metrics["rif"] = 9.0  # type: ignore[index]  # still read-only


async def test_load_reports_reach_the_sink_whole() -> None:
    """Seen first in the latency benchmark: a result carrying the agent's report did not
    pickle (its maps are read-only proxies), the child's batch never went out, and the
    weigher had no sample at all."""
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    with reporting_backend() as server:
        port = server.server_address[1]
        prober.set_targets({"agent": ProbeTarget("127.0.0.4", port, interval_s=0.02)})
        run = asyncio.create_task(prober.run())
        await until(lambda: len(sink.of("agent")) >= 3)
        await prober.close()
        await run
    assert all(r.load == REPORT for r in sink.of("agent"))


async def test_refused_targets_are_screened_here_and_never_probed() -> None:
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, ProberSpec())  # refuses loopback
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.01))
        assert set(prober.refused) == {"127.0.0.2"}
        assert "loopback" in prober.refused["127.0.0.2"]
        assert dict(prober.targets) == {}
        run = asyncio.create_task(prober.run())
        await until(lambda: prober._child is not None)
        await asyncio.sleep(0.2)  # several intervals of the refused target: nothing is made
        await prober.close()
        await run
        assert servers["127.0.0.2"].connections == 0
    assert sink.results == []


async def test_a_child_that_dies_is_started_again_and_probing_resumes() -> None:
    """A killed child once ended run(), and with it the whole control plane."""
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.02))
        run = asyncio.create_task(prober.run())
        pids = []
        for restarts in (1, 2):
            await until(lambda: len(sink.results) >= 2 and prober.pid not in (None, *pids))
            child = prober._child
            assert child is not None
            pids.append(child.pid)
            sink.results.clear()
            child.kill()
            await until(lambda: prober.restarts == restarts)  # noqa: B023 (awaited here)
        # The third child probes the same targets; nothing asked the run to end.
        await until(lambda: len(sink.results) >= 2 and prober.pid not in (None, *pids))
        assert not run.done()
        assert {k for k, _, _ in sink.results} == {"127.0.0.2"}
        await prober.close()
        async with asyncio.timeout(10):
            await run
        assert prober.restarts == 2


async def test_close_ends_the_wait_before_a_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "RESTART_FIRST_S", 3600.0)
    prober: ProberProcess[str] = ProberProcess(_Sink(), OPEN)
    run = asyncio.create_task(prober.run())
    await until(lambda: prober._child is not None)
    child = prober._child
    assert child is not None
    child.kill()
    await until(lambda: prober.restarts == 1)
    async with asyncio.timeout(10):  # not the hour of the delay
        await prober.close()
        await run
    assert prober._child is None


async def test_a_failing_sink_is_logged_and_probing_goes_on() -> None:
    calls: list[str] = []

    def sink(key: str, result: ProbeResult) -> None:
        calls.append(key)
        raise ValueError("sink bug")

    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.05))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(calls) >= 3)
        await prober.close()
        await run


async def test_cancelling_run_stops_the_child_and_closes_connections() -> None:
    sink = _Sink()
    prober: ProberProcess[str] = ProberProcess(sink, OPEN)
    with backends({"127.0.0.2": 200}) as servers:
        prober.set_targets(_targets(servers, 0.01))
        run = asyncio.create_task(prober.run())
        await until(lambda: len(sink.results) >= 2)
        child = prober._child
        assert child is not None
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert child.returncode == 0
        await until(lambda: servers["127.0.0.2"].open == 0)


async def test_cancelled_while_the_child_starts_close_still_returns() -> None:
    """Seen with `aviator run` stopped by SIGTERM right after start-up: run() was cancelled
    inside the child's spawn, never marked itself done, and close() waited for good."""
    prober: ProberProcess[str] = ProberProcess(_Sink(), OPEN)
    run = asyncio.create_task(prober.run())
    await asyncio.sleep(0)  # run() is now inside the spawn
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    async with asyncio.timeout(10):
        await prober.close()
    assert prober._child is None
