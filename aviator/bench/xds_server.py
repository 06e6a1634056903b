"""The ADS server process of ``aviator bench xds``, and the fleet both sides replay.

Run as ``python -m aviator.bench.xds_server``; commands arrive one JSON object per line on
stdin (see :mod:`aviator.bench.xds_child`):

- ``{"op": "setup", "workloads": W, "per_workload": P}``: build the fleet, publish its
  snapshot, listen on a free loopback port; reply ``{"port": ..., <usage>}``.
- ``{"op": "change", "seq": k, "which": "one" | "all"}``: apply change ``k`` of the fleet,
  rebuild the snapshot from every workload (with a ``SnapshotBuilder``, as the control plane
  does on every weight change: only changed workloads are rebuilt)
  and publish it; reply with the server-side timestamps: ``t_change`` (``time.time()`` when
  the command was read: the start of the measured interval), build and publish seconds, and the
  CPU time at ``t_change``.
- ``{"op": "quiet", "timeout": s}``: wait until every push sent has been ACKed or NACKed;
  reply with the CPU time then (so a change's CPU cost includes the ACKs it caused), the
  event loop's lag since the change (every sample of a 1 ms timer's lateness) and the
  server's budget of response bytes in flight.
- ``{"op": "usage"}``: CPU seconds, resident and peak resident MB, open streams.

With ``"probe_timing": true`` in ``setup`` (``aviator bench xds --probe-timing``; issue 13,
item 6) the server also probes a backend in a process of its own, as ``aviator run`` probes
pods: :data:`PROBE_TARGETS` targets every :data:`PROBE_INTERVAL_S` with the prober in a child
process (``ProberProcess``, the default of ``aviator run``), as many with it on a thread of its
own (``ProberThread``, ``--probe-in thread``) and as many on the serving loop (``--probe-in
loop``), at ``aviator run``'s switch interval. ``setup`` then replies
with each one's round trips at rest (``probe_quiet_s``), and ``quiet`` with the round trips of
the probes started since the change (``probe_s``): a probe's inflation during the fan-out is
the difference.

With ``AVIATOR_BENCH_TRACEMALLOC=FILE`` in its environment the server traces its Python
allocations (``tracemalloc``; several times slower) and appends the 25 largest live
allocation sites, and the traced peak, to ``FILE`` at every ``usage`` command: where the memory
goes. What C code allocates (gRPC's buffers, upb's arenas) is not traced; RSS minus the
traced total is that.

The server is the production one (``aviator.xds``), with the production log setup at
``info`` (the bench's own log file), fed directly: no debounce, so the figures are the fan-out
alone (``aviator run`` adds its publish debounce, ``publish_quiet`` .. ``publish_max_delay``).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

from aviator.model import EndpointAddress, Health, WeightedEndpoint, WeightedWorkload, WorkloadKey

NAMESPACE = "bench"
PORT = 8080
IDENTIFIER = "aviator-bench"
MAX_SEQ = 999  # weights of change k and k + 1000 coincide: a run stays below that
PROBE_TARGETS = 4  # per prober (--probe-timing)
PROBE_INTERVAL_S = 0.02
PROBE_QUIET_S = 2.0  # round trips at rest, sampled after setup


@dataclass(frozen=True, slots=True)
class FleetShape:
    """``workloads`` workloads of ``per_workload`` endpoints each."""

    workloads: int
    per_workload: int

    def __post_init__(self) -> None:
        if self.workloads < 1 or self.per_workload < 1:
            raise ValueError(f"need at least one workload and one endpoint each, got {self}")
        if self.endpoints >= 1 << 24:
            raise ValueError(f"at most {(1 << 24) - 1} endpoints (10.x.y.z), got {self.endpoints}")

    @property
    def endpoints(self) -> int:
        return self.workloads * self.per_workload

    @classmethod
    def for_endpoints(cls, endpoints: int, per_workload: int) -> FleetShape:
        """The shape with ``endpoints`` in total (rounded up to whole workloads)."""
        if endpoints < 1 or per_workload < 1:
            raise ValueError(f"need endpoints >= 1 and per_workload >= 1, got {endpoints}")
        per = min(per_workload, endpoints)
        return cls(-(-endpoints // per), per)


def weight(seq: int, workload: int, endpoint: int) -> int:
    """The weight of one endpoint after change ``seq`` touched its workload (0: initial).

    For a given workload, two changes give the same pattern only if their ``seq`` differ by a
    multiple of 1000 (761 is prime to 1000): every change below :data:`MAX_SEQ` is material.
    """
    return 1 + (seq * 761 + workload * 40503 + endpoint * 97) % 1000


def _ip(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


class Fleet:
    """The workloads and their current weights. The server and the coordinator each hold one
    and apply the same changes, so the coordinator knows what every stream should receive."""

    def __init__(self, shape: FleetShape) -> None:
        self.shape = shape
        self._workloads = [self._build(w, 0) for w in range(shape.workloads)]

    def _build(self, w: int, seq: int) -> WeightedWorkload:
        per = self.shape.per_workload
        return WeightedWorkload(
            WorkloadKey(NAMESPACE, f"w{w:05d}"),
            PORT,
            tuple(
                WeightedEndpoint(
                    EndpointAddress(_ip(w * per + j + 1), PORT), weight(seq, w, j), Health.HEALTHY
                )
                for j in range(per)
            ),
        )

    def workloads(self) -> list[WeightedWorkload]:
        return list(self._workloads)

    def target(self, seq: int) -> int:
        """The workload a one-workload change ``seq`` touches (spread over the fleet)."""
        return (seq * 7919) % self.shape.workloads

    def change(self, seq: int, which: str) -> list[WeightedWorkload]:
        """Apply change ``seq`` (``which``: ``one`` workload or ``all``); return the changed
        workloads, sorted by cluster name."""
        if not 1 <= seq <= MAX_SEQ:
            raise ValueError(f"change numbers run from 1 to {MAX_SEQ}, got {seq}")
        if which == "one":
            targets = [self.target(seq)]
        elif which == "all":
            targets = list(range(self.shape.workloads))
        else:
            raise ValueError(f"which must be 'one' or 'all', got {which!r}")
        for w in targets:
            self._workloads[w] = self._build(w, seq)
        return sorted((self._workloads[w] for w in targets), key=lambda x: x.key)


def cla_bytes(workload: WeightedWorkload) -> bytes:
    """The serialised ClusterLoadAssignment the server sends for ``workload``: the bytes a
    client finds inside the response that carries it (the snapshot serialises the same way)."""
    from aviator.xds.resources import build_load_assignment

    data: bytes = build_load_assignment(workload).SerializeToString(deterministic=True)
    return data


# -- the server process --------------------------------------------------------------------------


def _counter_total(counter: Any) -> float:
    return float(
        sum(
            s.value
            for metric in counter.collect()
            for s in metric.samples
            if s.name.endswith("_total")
        )
    )


def _trace_report(path: str, label: str) -> None:
    """Append the largest live Python allocation sites to ``path`` (see the module doc)."""
    import tracemalloc

    current, peak = tracemalloc.get_traced_memory()
    top = tracemalloc.take_snapshot().statistics("lineno")[:25]
    with open(path, "a") as f:
        f.write(f"== {label}: traced {current / 2**20:.1f} MB, peak {peak / 2**20:.1f} MB\n")
        for stat in top:
            f.write(f"{stat.size / 2**20:8.1f} MB {stat.count:9d} {stat.traceback}\n")


# A backend that answers every GET at once, HTTP/1.1 keep-alive, in a process of its own (so
# the server's loop and interpreter lock are not its own).
_PROBE_BACKEND = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class _ProbeTiming:
    """Real probes to a real backend from this process: from a child process, from a thread of
    their own and on the serving loop (see the module doc); round trips kept with their start
    (loop time)."""

    KINDS = ("process", "thread", "loop")

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[float, float]]] = {k: [] for k in self.KINDS}
        self._backend: asyncio.subprocess.Process | None = None
        self._probers: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        import sys

        from aviator.controlplane import SWITCH_INTERVAL_S
        from aviator.probing.prober import Prober
        from aviator.probing.process import ProberProcess, ProberSpec
        from aviator.probing.results import ProbeTarget
        from aviator.probing.thread import ProberThread

        sys.setswitchinterval(SWITCH_INTERVAL_S)  # as aviator run sets it
        self._backend = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROBE_BACKEND, stdout=asyncio.subprocess.PIPE
        )
        assert self._backend.stdout is not None
        port = int((await self._backend.stdout.readline()).decode())
        targets = {
            i: ProbeTarget("127.0.0.1", port, interval_s=PROBE_INTERVAL_S, timeout_s=5.0)
            for i in range(PROBE_TARGETS)
        }
        for kind in self.KINDS:

            def sink(key: int, result: Any, kind: str = kind) -> None:
                if result.ok:
                    self.samples[kind].append((result.started_at, result.rtt_s))

            prober: Any = (
                ProberProcess(sink, ProberSpec(addresses=False))
                if kind == "process"
                else ProberThread(sink, lambda s: Prober(s))
                if kind == "thread"
                else Prober(sink)
            )
            prober.set_targets(targets)
            self._probers.append(prober)
            self._tasks.append(asyncio.create_task(prober.run()))

    def between(self, start: float, end: float = math.inf) -> dict[str, list[float]]:
        """Round trips of the probes started from loop time ``start`` to ``end``, per kind."""
        return {k: [rtt for t, rtt in v if start <= t <= end] for k, v in self.samples.items()}

    async def stop(self) -> None:
        for prober in self._probers:
            await prober.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._backend is not None:
            self._backend.kill()
            await self._backend.wait()


async def _serve() -> None:
    import os

    from aviator.bench.xds_child import ParentLink, proc_usage, raise_nofile_limit
    from aviator.log import configure
    from aviator.xds.cache import Cache
    from aviator.xds.server import AdsServer
    from aviator.xds.snapshot import SnapshotBuilder

    link = await ParentLink.open()
    trace = os.environ.get("AVIATOR_BENCH_TRACEMALLOC")
    if trace:
        import tracemalloc

        tracemalloc.start()
    configure("info")
    raise_nofile_limit()
    lag = _LoopLag()
    lag_task = asyncio.create_task(lag.run())
    cache = Cache()
    builder = SnapshotBuilder()  # as the control plane builds them
    server: AdsServer | None = None
    fleet: Fleet | None = None
    probes: _ProbeTiming | None = None
    loop = asyncio.get_running_loop()
    changed_at = loop.time()
    try:
        async for command in link.commands():
            op = command["op"]
            if op == "setup":
                fleet = Fleet(FleetShape(int(command["workloads"]), int(command["per_workload"])))
                cache.publish(builder.build(fleet.workloads()))
                server = AdsServer(cache, identifier=IDENTIFIER)
                port = await server.start("127.0.0.1:0")
                extra: dict[str, Any] = {}
                if command.get("probe_timing"):
                    probes = _ProbeTiming()
                    await probes.start()
                    at = loop.time()
                    await asyncio.sleep(PROBE_QUIET_S)
                    extra["probe_quiet_s"] = probes.between(at)
                link.send({"port": port, **proc_usage(), **extra})
            elif op == "change":
                t_change, cpu = time.time(), time.process_time()
                lag.take()
                lag.on = True
                changed_at = loop.time()
                assert fleet is not None, "setup first"
                fleet.change(int(command["seq"]), str(command["which"]))
                t0 = time.perf_counter()
                snapshot = builder.build(fleet.workloads())
                t1 = time.perf_counter()
                changes = cache.publish(snapshot)
                t2 = time.perf_counter()
                link.send(
                    {
                        "seq": command["seq"],
                        "t_change": t_change,
                        "cpu_s": cpu,
                        "build_s": t1 - t0,
                        "publish_s": t2 - t1,
                        "changed": sum(len(n) for n in changes.changed.values()),
                    }
                )
            elif op == "quiet":
                assert server is not None, "setup first"
                quiet = await _wait_quiet(server, float(command.get("timeout", 10.0)))
                lag.on = False
                extra = {}
                if probes is not None:
                    quiet_at = loop.time()
                    # Results made on the probe thread reach this loop in batches: let the
                    # last ones in, then keep the probes started between change and quiet.
                    await asyncio.sleep(5 * PROBE_INTERVAL_S)
                    extra["probe_s"] = probes.between(changed_at, quiet_at)
                    for samples in probes.samples.values():
                        samples.clear()  # the bench's memory figures must not grow with them
                link.send(
                    {
                        "quiet": quiet,
                        "loop_lag_s": lag.take(),
                        **proc_usage(),
                        **_budget(server),
                        **extra,
                    }
                )
            elif op == "usage":
                streams = len(server.servicer.streams()) if server is not None else 0
                if trace:
                    _trace_report(trace, f"usage, {streams} streams")
                link.send({"streams": streams, **proc_usage()})
            else:
                link.send({"error": f"unknown command {op!r}"})
    finally:
        lag_task.cancel()
        if probes is not None:
            await probes.stop()
        if server is not None:
            await server.stop(0)


class _LoopLag:
    """How late this process's event loop runs a 1 ms timer, sampled while ``on``: a probe
    whose response arrives on this loop waits as long before it is read (issue 13, item 6:
    probes share the loop of ``aviator run`` with the xDS fan-out)."""

    PERIOD_S = 0.001

    def __init__(self) -> None:
        self.on = False
        self.samples: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.PERIOD_S)
            if self.on:
                self.samples.append(max(0.0, loop.time() - started - self.PERIOD_S))

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples


def _budget(server: Any) -> dict[str, float]:
    """The server's budget of response bytes in flight: its limit, the most used at once,
    and how many responses waited for their turn (since the start)."""
    budget = server.servicer.budget
    return {
        "budget_mb": budget.limit / 2**20,
        "budget_peak_mb": budget.peak / 2**20,
        "budget_waited": budget.waited,
    }


async def _wait_quiet(server: Any, within: float) -> bool:
    """Wait until every response sent was answered (ACK or NACK); False after ``within`` seconds."""
    metrics = server.metrics
    deadline = time.monotonic() + within
    while True:
        answered = _counter_total(metrics.acks) + _counter_total(metrics.nacks)
        if answered >= _counter_total(metrics.pushes):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.001)


def main() -> None:
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
