"""``aviator bench probe``: how many probes per second one core sustains, and CPU per probe.

The prober under test runs in this process, on one event loop (so on at most one core), with
its default transport (aviator.probing.transport): one keep-alive connection per target,
exactly as in production. Beside it, in the same run, the same prober in a process of its own
as ``aviator run`` has it by default (:class:`~aviator.probing.process.ProberProcess`): its
CPU is the child's (read from ``/proc``) plus this process's, which unpickles the results.
The backends run in a separate process (so their CPU is not counted): a minimal asyncio
HTTP/1.1 responder on ``--ports`` loopback ports, answering every request with a 200, a small
JSON body and an ORCA header in the format Aviator's agent writes (so the prober pays for
parsing it). Endpoints are spread over the ports; each is a separate target with its own
connection.

Two modes:
- saturating (default, ``--offered-rate 0``): every target re-probes as soon as it can; the
  achieved rate is what one core sustains, limited by ``--max-in-flight``.
- paced (``--offered-rate R``): targets are probed every ``endpoints / R`` seconds; shows the
  CPU cost at a realistic rate (and that the achieved rate matches the offered one).

CPU is ``time.process_time()`` (user + system of this process, all threads), plus the
prober child's for the prober in a process, over the measured window, after ``--warmup``
seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["configure", "run"]

_SATURATING_INTERVAL_S = 1e-3  # far below the time a probe takes: always due
OVERHEAD_GOAL = 1.5  # the prober's CPU per probe at most this times a bare aiohttp GET's


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoints", type=int, default=500, help="targets to probe (500)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    parser.add_argument(
        "--offered-rate",
        type=float,
        default=0.0,
        help="probes/s offered; 0 = saturate (default)",
    )
    parser.add_argument("--max-in-flight", type=int, default=256, help="prober cap (256)")
    parser.add_argument("--ports", type=int, default=50, help="backend ports (50)")
    parser.add_argument("--timeout", type=float, default=2.0, help="probe timeout, s (2)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of prober + bare aiohttp loop, alternating (3)",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write figures")


def run(args: argparse.Namespace) -> int:
    if (
        args.endpoints < 1
        or args.duration <= 0
        or args.warmup < 0
        or args.ports < 1
        or args.repeat < 1
    ):
        print(
            "aviator bench probe: need --endpoints, --ports, --repeat >= 1, --duration > 0, "
            "--warmup >= 0"
        )
        return 2
    _raise_nofile_limit()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    backend = ctx.Process(
        target=_serve_backends,
        args=(min(args.ports, args.endpoints), _orca_header(), child),
        name="aviator-bench-backends",
        daemon=True,
    )
    backend.start()
    try:
        if not parent.poll(30):
            print("aviator bench probe: the backend process did not start")
            return 1
        ports: list[int] = parent.recv()
        figures = asyncio.run(_measure(args, ports))
    finally:
        backend.terminate()
        backend.join(5)
        if backend.is_alive():
            backend.kill()
            backend.join()
    _print(figures)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _orca_header() -> bytes:
    from aviator_agent.orca import OrcaLoadReport, format_orca_text

    report = OrcaLoadReport(
        application_utilization=0.375,
        rps_fractional=123.4,
        named_metrics={"rif": 3.0, "latency_ms": 12.5},
    )
    return format_orca_text(report).encode()


def _raise_nofile_limit() -> None:
    # One socket per target on each side: lift the soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- backend process ---------------------------------------------------------------------------


class _Responder(asyncio.Protocol):
    """Answers each HTTP/1.1 request (headers only, no body expected) with one fixed response."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        requests = self._buffer.count(b"\r\n\r\n")
        if requests:
            self._buffer = self._buffer[self._buffer.rfind(b"\r\n\r\n") + 4 :]
            self._transport.write(self._response * requests)


def _serve_backends(n_ports: int, header: bytes, conn: Connection) -> None:
    _raise_nofile_limit()
    body = b'{"rif":3,"latency_ms":12.5}'
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"endpoint-load-metrics: " + header + b"\r\n\r\n" + body
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(lambda: _Responder(response), "127.0.0.1", 0, backlog=4096)
            for _ in range(n_ports)
        ]
        conn.send([s.sockets[0].getsockname()[1] for s in servers])
        await asyncio.Event().wait()  # until the parent terminates this process

    asyncio.run(main())


# -- prober process ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Window:
    """What one measured window saw: probes by outcome, their RTTs, CPU and wall time."""

    outcomes: Counter[str] = field(default_factory=Counter)
    rtts: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    cpu_user_s: float = 0.0
    cpu_system_s: float = 0.0
    #: Of ``cpu_s``, what a child process doing the work spent (the prober in a process).
    child_cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def probes(self) -> int:
        return sum(self.outcomes.values())

    def add(self, other: _Window) -> None:
        self.outcomes.update(other.outcomes)
        self.rtts.extend(other.rtts[: max(0, _MAX_RTTS - len(self.rtts))])
        self.cpu_s += other.cpu_s
        self.cpu_user_s += other.cpu_user_s
        self.cpu_system_s += other.cpu_system_s
        self.child_cpu_s += other.child_cpu_s
        self.wall_s += other.wall_s


_MAX_RTTS = 1_000_000


def _child_cpu(pid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``); none
    without one."""
    if pid is None:
        return 0.0, 0.0
    with open(f"/proc/{pid}/stat", "rb") as f:
        # Fields after the command (in parentheses, which may hold spaces): utime is the
        # 14th field of the line, stime the 15th.
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _measured(
    args: argparse.Namespace,
    outcomes: Counter[str],
    measuring: list[bool],
    child_cpu: Callable[[], tuple[float, float]] = _child_cpu,
) -> _Window:
    """Wait out the warm-up, then measure one window of ``args.duration`` seconds of whatever
    is filling ``outcomes``; ``measuring[0]`` tells the sink when to keep RTTs.
    ``child_cpu()``: the (user, system) CPU seconds of a child doing the work, counted too."""
    await asyncio.sleep(args.warmup)
    before = Counter(outcomes)
    measuring[0] = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    usage0, child0 = resource.getrusage(resource.RUSAGE_SELF), child_cpu()
    await asyncio.sleep(args.duration)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    usage1, child1 = resource.getrusage(resource.RUSAGE_SELF), child_cpu()
    measuring[0] = False
    user, system = child1[0] - child0[0], child1[1] - child0[1]
    return _Window(
        outcomes=Counter(outcomes) - before,
        cpu_s=cpu1 - cpu0 + user + system,
        cpu_user_s=usage1.ru_utime - usage0.ru_utime + user,
        cpu_system_s=usage1.ru_stime - usage0.ru_stime + system,
        child_cpu_s=user + system,
        wall_s=wall1 - wall0,
    )


def _interval(args: argparse.Namespace) -> float:
    return _SATURATING_INTERVAL_S if args.offered_rate <= 0 else args.endpoints / args.offered_rate


async def _prober_window(
    args: argparse.Namespace, ports: list[int], *, in_process: bool = False
) -> _Window:
    """One window of the production prober over the backends; ``in_process``: in a child
    process of its own (``ProberProcess``), its CPU counted with this process's."""
    from aviator.probing.prober import Prober
    from aviator.probing.process import ProberProcess, ProberSpec
    from aviator.probing.results import ProbeResult, ProbeTarget

    outcomes: Counter[str] = Counter()
    rtts: list[float] = []
    measuring = [False]

    def sink(key: int, result: ProbeResult) -> None:
        outcomes[result.outcome.value] += 1
        if measuring[0] and len(rtts) < _MAX_RTTS:
            rtts.append(result.rtt_s)

    prober: Prober[int] | ProberProcess[int]
    if in_process:
        spec = ProberSpec(max_in_flight=args.max_in_flight, addresses=False, log_level="warning")
        prober = ProberProcess(sink, spec)
    else:
        prober = Prober(sink, max_in_flight=args.max_in_flight)
    interval = _interval(args)
    prober.set_targets(
        {
            i: ProbeTarget(
                "127.0.0.1", ports[i % len(ports)], interval_s=interval, timeout_s=args.timeout
            )
            for i in range(args.endpoints)
        }
    )
    task = asyncio.create_task(prober.run())

    def child_cpu() -> tuple[float, float]:
        return _child_cpu(prober.pid if isinstance(prober, ProberProcess) else None)

    window = await _measured(args, outcomes, measuring, child_cpu)
    await prober.close()
    await task
    window.rtts = rtts
    return window


async def _bare_window(args: argparse.Namespace, ports: list[int]) -> _Window:
    """One window of the least a probe can cost with aiohttp's client (the baseline: a
    well-known client, and the prober's transport until issue 9's item 6): per target a
    keep-alive session and a loop of ``GET`` + read the body, paced like the prober and under
    the same cap in flight; no timeout, no ORCA parse, no result."""
    import random

    import aiohttp
    import yarl

    from aviator.probing.results import ProbeTarget

    outcomes: Counter[str] = Counter()
    rtts: list[float] = []
    measuring = [False]
    interval = _interval(args)
    cap = asyncio.Semaphore(args.max_in_flight)
    loop = asyncio.get_running_loop()

    async def target(i: int) -> None:
        url = yarl.URL(ProbeTarget("127.0.0.1", ports[i % len(ports)]).url)
        connector = aiohttp.TCPConnector(limit=2, keepalive_timeout=60.0)
        async with aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            headers={"User-Agent": "aviator-prober"},  # the same request on the wire
        ) as session:
            next_at = loop.time() + random.uniform(0.0, interval)
            while True:
                if (delay := next_at - loop.time()) > 0:
                    await asyncio.sleep(delay)
                woke = loop.time()
                async with cap:
                    started = time.perf_counter()
                    try:
                        async with session.get(url, allow_redirects=False) as response:
                            await response.read()
                    except aiohttp.ClientError:
                        outcomes["error"] += 1
                        next_at = woke + interval
                        continue
                    rtt = time.perf_counter() - started
                outcomes["ok" if response.status == 200 else "http_error"] += 1
                if measuring[0] and len(rtts) < _MAX_RTTS:
                    rtts.append(rtt)
                next_at = woke + interval

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(target(i)) for i in range(args.endpoints)]
        window = await _measured(args, outcomes, measuring)
        for task in tasks:
            task.cancel()
    window.rtts = rtts
    return window


def _figures(window: _Window) -> dict[str, Any]:
    probes, wall, cpu = window.probes, window.wall_s, window.cpu_s
    rtts = sorted(window.rtts)

    def pct(q: float) -> float | None:
        return rtts[min(len(rtts) - 1, math.floor(q * len(rtts)))] * 1000 if rtts else None

    return {
        "duration_s": wall,
        "probes": probes,
        "probes_per_s": probes / wall,
        "cpu_s": cpu,
        "cpu_user_s": window.cpu_user_s,
        "cpu_system_s": window.cpu_system_s,
        "child_cpu_s": window.child_cpu_s,
        "cpu_s_per_probe": cpu / probes if probes else None,
        # What one core would sustain if the prober had it to itself: on a shared machine the
        # achieved rate is lower whenever cpu_utilisation is below 1.
        "probes_per_cpu_s": probes / cpu if cpu > 0 else None,
        "cpu_utilisation": cpu / wall,
        "outcomes": dict(window.outcomes),
        "rtt_ms_p50": pct(0.5),
        "rtt_ms_p99": pct(0.99),
        "rtt_ms_mean": statistics.fmean(rtts) * 1000 if rtts else None,
    }


def _overhead(prober: _Window, bare: _Window) -> float | None:
    """CPU per probe of the prober over that of the bare loop (1.0: no overhead)."""
    if not (prober.probes and bare.probes and bare.cpu_s > 0):
        return None
    return (prober.cpu_s / prober.probes) / (bare.cpu_s / bare.probes)


_KINDS = ("prober", "process", "bare")


async def _window(kind: str, args: argparse.Namespace, ports: list[int]) -> _Window:
    if kind == "bare":
        return await _bare_window(args, ports)
    return await _prober_window(args, ports, in_process=kind == "process")


async def _measure(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    """``--repeat`` rounds of one window each of the prober, the prober in its process and
    the bare loop on the same backends, the order rotating (so a change in the machine's load
    falls on all alike)."""
    totals = {kind: _Window() for kind in _KINDS}
    ratios: dict[str, list[float]] = {"prober": [], "process": []}
    for rep in range(args.repeat):
        windows: dict[str, _Window] = {}
        for kind in _KINDS[rep % 3 :] + _KINDS[: rep % 3]:
            windows[kind] = await _window(kind, args, ports)
        for kind, window in windows.items():
            totals[kind].add(window)
        for kind, kept in ratios.items():
            if (ratio := _overhead(windows[kind], windows["bare"])) is not None:
                kept.append(ratio)
    saturating = args.offered_rate <= 0
    process = _figures(totals["process"])
    process["overhead"] = _overhead(totals["process"], totals["bare"])
    process["overhead_per_repeat"] = ratios["process"]
    return {
        "endpoints": args.endpoints,
        "backend_ports": len(ports),
        "mode": "saturating" if saturating else "paced",
        "offered_rate": None if saturating else args.offered_rate,
        "interval_s": _interval(args),
        "max_in_flight": args.max_in_flight,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        # The prober's figures over every repetition (top level, as before), then the bare
        # aiohttp loop's over the same backends in the same run, and the ratio; then the
        # prober in a process of its own, with its ratio to the same bare loop.
        **_figures(totals["prober"]),
        "bare": _figures(totals["bare"]),
        "overhead": _overhead(totals["prober"], totals["bare"]),
        "overhead_per_repeat": ratios["prober"],
        "overhead_goal": OVERHEAD_GOAL,
        "process": process,
        "load_average": list(os.getloadavg()),
        "python": sys.version.split()[0],
    }


def _print(f: dict[str, Any]) -> None:
    offered = (
        "saturating" if f["mode"] == "saturating" else f"{f['offered_rate']:,.0f} probes/s offered"
    )
    load = ", ".join(f"{x:.1f}" for x in f["load_average"])
    print(
        f"aviator bench probe: {f['endpoints']} endpoints on {f['backend_ports']} backend ports, "
        f"{offered}, max {f['max_in_flight']} in flight, {f['repeat']} x (prober, prober in a "
        f"process, bare aiohttp loop) of {f['duration_s'] / f['repeat']:.1f} s after "
        f"{f['warmup_s']:.1f} s warm-up; load average {load}"
    )
    bare, process = f["bare"], f["process"]

    def row(label: str, key: str, fmt: str, scale: float = 1.0) -> None:
        cells = [
            "-" if (v := x[key]) is None else format(v * scale, fmt) for x in (f, process, bare)
        ]
        print(f"  {label:<22}{cells[0]:>14}{cells[1]:>14}{cells[2]:>14}")

    print(f"  {'':<22}{'prober':>14}{'in a process':>14}{'bare aiohttp':>14}")
    row("probes/s", "probes_per_s", ",.0f")
    row("CPU µs / probe", "cpu_s_per_probe", ",.0f", 1e6)
    row("probes per CPU second", "probes_per_cpu_s", ",.0f")
    row("CPU utilisation %", "cpu_utilisation", ".1f", 100)
    row("RTT p50 ms", "rtt_ms_p50", ".2f")
    row("RTT p99 ms", "rtt_ms_p99", ".2f")
    for label, x in (("prober", f), ("process", process), ("bare", bare)):
        outcomes = ", ".join(f"{k}={v}" for k, v in sorted(x["outcomes"].items()))
        print(f"  outcomes ({label}){'':<{13 - len(label)}}{outcomes}")
    for label, x in (("prober", f), ("prober in a process", process)):
        if x["overhead"] is None:
            continue
        spread = ", ".join(f"{r:.2f}" for r in x["overhead_per_repeat"])
        verdict = "met" if x["overhead"] <= f["overhead_goal"] else "NOT met"
        print(
            f"  {label} CPU per probe / bare loop's: {x['overhead']:.2f}x (per round: "
            f"{spread}); goal <= {f['overhead_goal']:.1f}x: {verdict}"
        )
