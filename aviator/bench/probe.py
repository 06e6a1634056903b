"""``aviator bench probe``: how many probes per second one core sustains, and CPU per probe.

The prober under test runs in this process, on one event loop (so on at most one core), with
its default aiohttp transport: one keep-alive connection per target, exactly as in
production. The backends run in a separate process (so their CPU is not counted): a minimal
asyncio HTTP/1.1 responder on ``--ports`` loopback ports, answering every request with a
200, a small JSON body and an ORCA header in the format Aviator's agent writes (so the
prober pays for parsing it). Endpoints are spread over the ports; each is a separate target
with its own connection.

Two modes:
- saturating (default, ``--offered-rate 0``): every target re-probes as soon as it can; the
  achieved rate is what one core sustains, limited by ``--max-in-flight``.
- paced (``--offered-rate R``): targets are probed every ``endpoints / R`` seconds; shows the
  CPU cost at a realistic rate (and that the achieved rate matches the offered one).

CPU is ``time.process_time()`` (user + system of this process, all threads) over the
measured window, after ``--warmup`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import resource
import statistics
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["configure", "run"]

_SATURATING_INTERVAL_S = 1e-3  # far below the time a probe takes: always due


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
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write figures")


def run(args: argparse.Namespace) -> int:
    if args.endpoints < 1 or args.duration <= 0 or args.warmup < 0 or args.ports < 1:
        print("aviator bench probe: need --endpoints, --ports >= 1, --duration > 0, --warmup >= 0")
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


async def _measure(args: argparse.Namespace, ports: list[int]) -> dict[str, Any]:
    from aviator.probing.prober import Prober
    from aviator.probing.results import ProbeResult, ProbeTarget

    n = args.endpoints
    saturating = args.offered_rate <= 0
    interval = _SATURATING_INTERVAL_S if saturating else n / args.offered_rate
    outcomes: Counter[str] = Counter()
    rtts: list[float] = []
    measuring = False

    def sink(key: int, result: ProbeResult) -> None:
        outcomes[result.outcome.value] += 1
        if measuring and len(rtts) < 1_000_000:
            rtts.append(result.rtt_s)

    prober: Prober[int] = Prober(sink, max_in_flight=args.max_in_flight)
    prober.set_targets(
        {
            i: ProbeTarget(
                "127.0.0.1", ports[i % len(ports)], interval_s=interval, timeout_s=args.timeout
            )
            for i in range(n)
        }
    )
    task = asyncio.create_task(prober.run())
    await asyncio.sleep(args.warmup)
    before = Counter(outcomes)
    measuring = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(args.duration)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    measuring = False
    after = Counter(outcomes)
    await prober.close()
    await task

    window = after - before
    probes = sum(window.values())
    wall, cpu = wall1 - wall0, cpu1 - cpu0
    rtts.sort()

    def pct(q: float) -> float | None:
        return rtts[min(len(rtts) - 1, math.floor(q * len(rtts)))] * 1000 if rtts else None

    return {
        "endpoints": n,
        "backend_ports": len(ports),
        "mode": "saturating" if saturating else "paced",
        "offered_rate": None if saturating else args.offered_rate,
        "interval_s": interval,
        "max_in_flight": args.max_in_flight,
        "duration_s": wall,
        "warmup_s": args.warmup,
        "probes": probes,
        "probes_per_s": probes / wall,
        "cpu_s": cpu,
        "cpu_user_s": usage1.ru_utime - usage0.ru_utime,
        "cpu_system_s": usage1.ru_stime - usage0.ru_stime,
        "cpu_s_per_probe": cpu / probes if probes else None,
        # What one core would sustain if the prober had it to itself: on a shared machine the
        # achieved rate is lower whenever cpu_utilisation is below 1.
        "probes_per_cpu_s": probes / cpu if cpu > 0 else None,
        "cpu_utilisation": cpu / wall,
        "outcomes": dict(window),
        "rtt_ms_p50": pct(0.5),
        "rtt_ms_p99": pct(0.99),
        "rtt_ms_mean": statistics.fmean(rtts) * 1000 if rtts else None,
        "python": sys.version.split()[0],
    }


def _print(f: dict[str, Any]) -> None:
    offered = (
        "saturating" if f["mode"] == "saturating" else f"{f['offered_rate']:,.0f} probes/s offered"
    )
    per_probe = f["cpu_s_per_probe"]
    print(
        f"aviator bench probe: {f['endpoints']} endpoints on {f['backend_ports']} backend ports, "
        f"{offered}, max {f['max_in_flight']} in flight, {f['duration_s']:.1f} s measured "
        f"after {f['warmup_s']:.1f} s warm-up"
    )
    print(f"  probes/s              {f['probes_per_s']:,.0f}")
    if per_probe is not None:
        print(f"  CPU s / probe         {per_probe:.6f}  ({per_probe * 1e6:.0f} µs)")
    print(f"  CPU utilisation       {f['cpu_utilisation'] * 100:.1f} % of one core")
    if f["probes_per_cpu_s"] is not None:
        print(f"  probes per CPU second {f['probes_per_cpu_s']:,.0f}  (one whole core's worth)")
    print(
        "  outcomes              " + ", ".join(f"{k}={v}" for k, v in sorted(f["outcomes"].items()))
    )
    if f["rtt_ms_p50"] is not None:
        print(f"  RTT p50 / p99         {f['rtt_ms_p50']:.2f} ms / {f['rtt_ms_p99']:.2f} ms")
